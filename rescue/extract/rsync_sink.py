"""Send extracted items to an rsync daemon or over ssh with rsync.

    rsync://HOST[:PORT]/MODULE/PATH/     rsync daemon (password: RSYNC_PASSWORD)
    [USER@]HOST:PATH/                    rsync over ssh (-e via rsync_opts)

How: items are staged in a private scratch dir (`staging.Staging`) until the
batch reaches `scratch_limit` bytes, then `rsync -a -H -X -S --numeric-ids
--fake-super` sends the batch and the batch's files are removed. Every batch
carries the directory skeleton, so the last run sets directory mtimes.

- Owners/modes/devices/trusted+security xattrs travel through rsync's
  --fake-super on the sending side (user.rsync.%stat on the staged files), so
  staging needs no root. They are applied only where the receiver may: a
  daemon module with `uid = 0` (or `fake super = yes`) and `numeric ids = yes`,
  or ssh as root.
- A file bigger than the limit is staged alone (the limit is exceeded for that
  one file, with a warning): rsync needs a real file it can stat and re-read;
  a named pipe would be sent as a pipe.
- Hard links across batches: a later name of a file sent in an earlier batch is
  sent with a sparse placeholder of the first name (same size, mtime, owner,
  xattrs): rsync's quick check finds the receiver's copy up to date and -H links
  the new name to it. That relies on size+mtime, so it is switched off (with a
  warning per link) when rsync_opts ask for --checksum/--ignore-times.
- Re-running an interrupted transfer: rsync's quick check (size + mtime, both
  set on staged files) skips what arrived; `--partial-dir` keeps a half-sent
  file out of its final name and lets the next run resume it.
- What arrived: exit code 0 means the whole batch; on 23/24 (partial) a dry
  run of the same batch lists what still differs, and only the rest counts.
  Any other failure raises TargetError saying how much arrived before it.
"""

from __future__ import annotations

import os

from ..errors import TargetError
from ..fs.base import FILE, Entry, FileReadError
from .base import Item
from .remote_run import StagedTreeSink, error_lines, require_tool, run_tool, scrub, unescape_rsync
from .remote_target import RSYNC_DAEMON, RSYNC_SSH, RemoteTarget, parse_remote_target
from .staging import Staging

__all__ = ["RsyncSink", "parse_remote_target", "RemoteTarget"]

DEFAULT_SCRATCH_LIMIT = 1 << 30
_OUT_FORMAT = "--out-format=%i\t%l\t%n"
_CONTENT_OPTS = {"-c", "--checksum", "-I", "--ignore-times"}


class RsyncSink(StagedTreeSink):
    keeps = frozenset({"content", "owners", "modes", "mtimes", "symlinks", "hardlinks", "xattrs",
                       "devices", "sparse", "empty dirs"})

    def __init__(self, target: str | RemoteTarget, *, scratch_limit: int = DEFAULT_SCRATCH_LIMIT,
                 rsync_opts: list[str] | tuple[str, ...] = (), scratch_dir: str | None = None,
                 fake_super: bool | None = None, io_timeout: int = 300, xattrs: bool = True,
                 devices: bool = False, keep_setuid: bool = True) -> None:
        parsed = parse_remote_target(target) if isinstance(target, str) else target
        if parsed is None or parsed.kind not in (RSYNC_DAEMON, RSYNC_SSH):
            raise TargetError(f"{target!r} is not an rsync target",
                              hint="write rsync://HOST/MODULE/PATH/ or USER@HOST:PATH/")
        self.rsync = require_tool("rsync", "install rsync (apt install rsync / brew install rsync)")
        super().__init__(parsed, Staging(scratch_dir, fake_super=fake_super, devices=devices,
                                         keep_setuid=keep_setuid), scratch_limit)
        self.rsync_opts = list(rsync_opts)
        self.io_timeout = io_timeout
        self.xattrs = xattrs
        self.secrets = [os.environ.get("RSYNC_PASSWORD", ""), parsed.password or ""]
        self.env = os.environ.copy()
        if parsed.password:                 # rsync://user:PASS@ -> RSYNC_PASSWORD, never argv
            self.env["RSYNC_PASSWORD"] = parsed.password
        self._placeholders_ok = not any(
            o in _CONTENT_OPTS or (o.startswith("-") and not o.startswith("--") and ("c" in o[1:] or "I" in o[1:])
                                   and not o.startswith("-e"))
            for o in self.rsync_opts)
        self._leaders: dict[str, Entry] = {}      # name -> Entry of multi-link files sent earlier
        self.unchanged_files = 0   # files the receiver already had

    # -- the batch flow's rsync parts -------------------------------------------

    def _staged(self, item: Item, name: str) -> None:
        if item.entry.kind == FILE and item.entry.nlink > 1:
            self._leaders[name] = item.entry

    def _add_hardlink(self, item: Item, leader: str, name: str) -> None:
        if leader in self._batch_names and self.staging.exists(leader):
            self.staging.link(leader, name)
        elif leader in self._leaders and leader not in self._failed and self._placeholders_ok:
            self.staging.placeholder(leader, self._leaders[leader])
            self._batch.append((leader, -2))                          # -2: not counted again
            self.staging.link(leader, name)
        else:   # the engine lists it as skipped: nothing to link to
            why = ("it did not arrive" if leader in self._failed else
                   "it went in an earlier batch and --checksum/--ignore-times rule out the placeholder")
            raise FileReadError(f"hard link to {leader} not sent: {why}")
        self._batch.append((name, 0))            # a name, not more bytes

    def _argv(self, dry_run: bool = False) -> list[str]:
        argv = [self.rsync, "-a", "-H", "-S", "--numeric-ids", "--mkpath", "--partial-dir=.rescue-partial",
                f"--timeout={self.io_timeout}", "-ii", _OUT_FORMAT]
        if self.xattrs:
            argv.append("-X")
        if self.staging.fake_super:
            argv.append("--fake-super")
        if self.target.kind == RSYNC_DAEMON:
            argv.append(f"--contimeout={min(self.io_timeout, 60)}")
        if dry_run:
            argv.append("--dry-run")
        return argv + self.rsync_opts + [self.staging.root + "/", self.target.dest]

    def _run(self, dry_run: bool = False) -> tuple[int, str, set[str]]:
        """Run rsync over the staged tree. Counts sent/unchanged files; for a
        dry run returns the names that would still be sent (= did not arrive)."""
        pending: set[str] = set()
        counts = [0, 0]

        def on_line(line: str) -> None:
            parts = line.split("\t", 2)
            if len(parts) != 3 or len(parts[0]) != 11 or parts[2].endswith("/"):
                return
            flags = parts[0]
            if dry_run:
                if flags[0] in "<>ch":
                    pending.add(unescape_rsync(parts[2]))
            elif flags[1] == "f":
                counts[0 if flags[0] in "<>" else 1] += 1

        code, stderr = run_tool(self._argv(dry_run), on_line=on_line, env=self.env)
        if not dry_run:
            self.sent_files += counts[0]
            self.unchanged_files += counts[1]
        return code, scrub(stderr, self.secrets), pending

    def _send(self) -> set[str]:
        """rsync the batch; on exit 23/24 (partial) a dry run of the same batch
        lists what still differs: those did not arrive."""
        code, stderr, _ = self._run()
        if code != 0 and self.xattrs and "xattr" in stderr.lower() and "not supported" in stderr.lower():
            self.xattrs = False
            self.result.warnings.append(f"{self.target.text}: the receiver does not support xattrs; "
                                        "sending without them")
            code, stderr, _ = self._run()
        missing: set[str] = set()
        if code in (23, 24):
            for msg in error_lines(stderr)[:20]:
                self.result.warnings.append(f"{self.target.text}: {msg}")
            code2, stderr2, missing = self._run(dry_run=True)
            if code2 not in (0, 23, 24):
                raise self._error(code2, stderr2)
        elif code != 0:
            raise self._error(code, stderr)
        return missing

    def _error(self, code: int, stderr: str) -> TargetError:
        t = self.target
        lines = error_lines(stderr)
        text = "\n".join(lines)
        low = text.lower()
        where = f"{t.host}:{t.port}" if t.port else (t.host or "?")
        arrived = (f"; {self.result.files} files ({self.result.bytes} bytes) arrived before that, "
                   "re-run to send the rest") if self.result.files else "; nothing arrived"
        hint = None
        if "auth failed" in low:
            problem = f"the rsync daemon at {where} refused the login to module {t.module!r} (auth failed)"
            hint = "set RSYNC_PASSWORD (and USER@ in the URL) or pass --rsync-opt=--password-file=FILE"
        elif "unknown module" in low:
            problem = f"the rsync daemon at {where} has no module {t.module!r}"
            hint = f"list modules with: rsync rsync://{t.host}{':%d' % t.port if t.port else ''}/"
        elif "permission denied (publickey" in low or "permission denied, please try again" in low \
                or "too many authentication failures" in low:
            problem = f"ssh to {t.user + '@' if t.user else ''}{t.host} refused the login"
            hint = "check the key/user; pass ssh options with --rsync-opt='-e ssh -i KEY -p PORT'"
        elif "no space left on device" in low or "disk quota exceeded" in low:
            problem = f"the remote is full (rsync exit {code})"
        elif code in (10, 35) or "connection refused" in low or "could not resolve" in low \
                or "no route to host" in low or "connection timed out" in low or "name or service not known" in low:
            detail = next((ln for ln in lines if "connect" in ln.lower() or "resolve" in ln.lower()), "")
            problem = f"cannot reach {where}" + (f": {_tail(detail)}" if detail else "")
        elif code == 30:
            problem = f"{where} stopped answering (timeout after {self.io_timeout} s)"
        elif "command not found" in low or code == 127:
            problem = f"rsync is not installed on {t.host}"
        else:
            last = next((ln for ln in reversed(lines) if not ln.startswith("rsync error:")), None) \
                or (lines[-1] if lines else "")
            problem = f"rsync failed (exit {code})" + (f": {_tail(last)}" if last else "")
        return TargetError(problem + arrived, file=t.text, hint=hint)


def _tail(line: str) -> str:
    return line.split("rsync: ", 1)[-1].strip()[:200]
