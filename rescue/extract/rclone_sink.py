"""Send extracted items to any rclone remote (S3, R2, B2, GCS, SFTP, WebDAV ...).

    rclone:REMOTE:PATH/              a tree of files
    rclone:REMOTE:PATH/NAME.tar.zst  one tarball (.tar, .tar.gz, .tgz too),
                                     streamed into `rclone rcat`: no local copy

Remotes come from the user's rclone config or RCLONE_CONFIG_<NAME>_* variables;
rclone's messages are scrubbed of the remote's secrets before we show them.

Tree: like the rsync sink, items are staged in bounded batches (`Staging`)
and each batch goes up with `rclone copy --links --create-empty-src-dirs`.
rclone's own check (size + modification time) makes a re-run send only what
is missing or changed. Object stores keep contents and modification times
only: owners, modes and xattrs are not kept; device nodes and FIFOs are
skipped by name (the engine lists them, exit 1; sockets, like every target,
it never sees); symlinks become
NAME.rclonelink files holding the target (rclone's --links convention, so
`rclone copy --links` brings them back as symlinks); a hard link becomes a
second copy (a server-side `rclone copyto` when the first name went up in an
earlier batch); directory mtimes are not kept (rclone 1.60 has no way).

Tarball: the tar sink writes into rclone's stdin; the tarball keeps all the
metadata a tar keeps. A failed or aborted upload is deleted from the remote
(an existing object of that name is refused unless force=True).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile

from ..errors import TargetError
from ..fs.base import BLOCK, CHAR, FIFO, FileReadError
from .base import Item, Sink, SinkResult
from .remote_run import StagedTreeSink, require_tool, run_tool, scrub
from .remote_target import RCLONE_TAR, RCLONE_TREE, RemoteTarget, parse_remote_target
from .staging import Staging

DEFAULT_SCRATCH_LIMIT = 1 << 30
_SECRET_KEY = re.compile(r"pass|secret|key|token|auth|cred|bearer|sas_url|account", re.I)
_NOT_SECRET = {"type", "provider", "region", "endpoint", "host", "port", "user", "vendor", "url",
               "key_file", "pubkey_file", "known_hosts_file", "env_auth", "key_use_agent",
               "shell_type", "md5sum_command", "sha1sum_command", "chunk_size"}


def _rclone_env() -> dict[str, str]:
    """Bounded retries so an unreachable remote fails in seconds, not minutes;
    the user's own RCLONE_* settings win."""
    env = os.environ.copy()
    env.setdefault("RCLONE_RETRIES", "2")
    env.setdefault("RCLONE_LOW_LEVEL_RETRIES", "3")
    env.setdefault("RCLONE_CONTIMEOUT", "20s")
    env.setdefault("RCLONE_TIMEOUT", "5m")
    return env


def remote_secrets(rclone: str, remote: str) -> list[str]:
    """Values of the remote's secret-looking settings (config file and env)."""
    secrets: list[str] = []
    prefix = f"RCLONE_CONFIG_{remote.upper().replace('-', '_')}_"
    for key, value in os.environ.items():
        if key.startswith(prefix) and key[len(prefix):].lower() not in _NOT_SECRET \
                and _SECRET_KEY.search(key[len(prefix):]):
            secrets.append(value)
    try:
        proc = subprocess.run([rclone, "config", "dump"], capture_output=True, timeout=30, env=_rclone_env())
        conf = json.loads(proc.stdout or b"{}").get(remote, {})
    except (OSError, ValueError, subprocess.TimeoutExpired):
        conf = {}
    for key, value in conf.items():
        if isinstance(value, str) and key.lower() not in _NOT_SECRET and _SECRET_KEY.search(key):
            secrets.append(value)
    return [s for s in secrets if s]


class RcloneSink(StagedTreeSink):
    """A tree of files on an rclone remote (see RcloneTarSink for tarballs)."""

    keeps = frozenset({"content", "mtimes", "symlinks", "empty dirs"})

    def __init__(self, target: str | RemoteTarget, *, scratch_limit: int = DEFAULT_SCRATCH_LIMIT,
                 scratch_dir: str | None = None, rclone_opts: list[str] | tuple[str, ...] = ()) -> None:
        parsed = parse_remote_target(target) if isinstance(target, str) else target
        if parsed is None or parsed.kind != RCLONE_TREE:
            raise TargetError(f"{target!r} is not an rclone tree target", hint="write rclone:REMOTE:PATH/")
        self.rclone = require_tool("rclone", "install rclone (https://rclone.org/install/)")
        check_remote(self.rclone, parsed)
        self.secrets = remote_secrets(self.rclone, parsed.remote or "")
        self.rclone_opts = list(rclone_opts)
        super().__init__(parsed, Staging(scratch_dir, fake_super=False, devices=False, fifos=False, xattrs=False),
                         scratch_limit)
        self._sent_names: set[str] = set()          # files already on the remote
        self._copies: list[tuple[str, str]] = []    # (leader, name) to copy server-side after the batch
        self._skipped: dict[str, int] = {}

    # -- the batch flow's rclone parts ------------------------------------------

    def _count(self, what: str) -> None:
        self._skipped[what] = self._skipped.get(what, 0) + 1

    def _refuse(self, item: Item) -> str | None:
        kind = item.entry.kind
        if kind in (CHAR, BLOCK, FIFO):   # named as skipped by the engine, exit 1
            what = "FIFO" if kind == FIFO else "device node"
            return f"{what} not sent: rclone stores files only (a tar target keeps it)"
        return None

    def _add_hardlink(self, item: Item, leader: str, name: str) -> None:
        if leader in self._batch_names:
            self.staging.link(leader, name)
            self._batch.append((name, item.entry.size))
            self._batch_names.add(name)
        elif leader in self._sent_names:
            self._copies.append((leader, name))
        else:
            raise FileReadError(f"hard link to {leader} not sent: it did not arrive")

    def _arrived(self, name: str) -> None:
        self._sent_names.add(name)

    def _send(self) -> set[str]:
        argv = [self.rclone, "copy", "--links", "--create-empty-src-dirs", "-v", "--stats=0",
                *self.rclone_opts, self.staging.root, self.target.dest]
        code, stderr = run_tool(argv, env=_rclone_env())
        stderr = scrub(stderr, self.secrets)
        if code != 0:
            raise rclone_error(self.target, code, stderr, self.result)
        self.sent_files += sum(1 for line in stderr.splitlines() if ": Copied (" in line)
        return set()   # rclone copy exits non-zero unless everything arrived

    def _after_batch(self) -> None:
        """Hard links to files of earlier batches: a server-side copy each."""
        copies, self._copies = self._copies, []
        for leader, name in copies:
            base = self.target.dest.rstrip("/")
            sep = "" if base.endswith(":") else "/"
            code, stderr = run_tool([self.rclone, "copyto", *self.rclone_opts, f"{base}{sep}{leader}",
                                     f"{base}{sep}{name}"], env=_rclone_env())
            if code != 0:
                raise rclone_error(self.target, code, scrub(stderr, self.secrets), self.result)
            self.result.files += 1
            self._count("hard links stored as separate copies")

    def _closing_warnings(self) -> list[str]:
        return [f"{self.target.text}: {n} {what}" for what, n in sorted(self._skipped.items())]


def check_remote(rclone: str, target: RemoteTarget) -> None:
    """The remote must exist in the rclone config or environment."""
    try:
        proc = subprocess.run([rclone, "listremotes"], capture_output=True, timeout=30, env=_rclone_env())
    except (OSError, subprocess.TimeoutExpired) as e:
        raise TargetError(f"cannot run rclone: {e}") from None
    names = {ln.strip().rstrip(":") for ln in proc.stdout.decode("utf-8", "replace").splitlines()}
    if target.remote not in names:
        raise TargetError(f"rclone has no remote named {target.remote!r}", file=target.text,
                          hint="create it with `rclone config` or set RCLONE_CONFIG_"
                               f"{(target.remote or '').upper()}_TYPE=... (see `rclone listremotes`)")


def rclone_error(target: RemoteTarget, code: int, stderr: str, result: SinkResult) -> TargetError:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and ("ERROR" in ln or "Failed" in ln
                                                                         or "CRITICAL" in ln)]
    lines = lines or [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    text = "\n".join(lines).lower()
    arrived = (f"; {result.files} files ({result.bytes} bytes) arrived before that, re-run to send the rest"
               if result.files else "; nothing arrived")
    # HTTP statuses as whole numbers: a port such as :50712 in a dial error is not "507".
    if any(s in text for s in ("unable to authenticate", "authentication failed", "permission denied",
                               "access denied", "403 forbidden", "invalidaccesskeyid",
                               "signaturedoesnotmatch", "unauthorized")) or re.search(r"\b401\b", text):
        problem = f"the rclone remote {target.remote!r} refused the login"
    elif any(s in text for s in ("no space left", "quota", "insufficient storage", "disk full",
                                 "entitytoolarge")) or re.search(r"(?<![:\d])\b507\b", text):
        problem = f"the rclone remote {target.remote!r} is full"
    elif any(s in text for s in ("connection refused", "no such host", "i/o timeout", "network is unreachable",
                                 "no route to host", "couldn't connect", "dial tcp")):
        problem = f"cannot reach the rclone remote {target.remote!r}"
    else:
        last = lines[-1] if lines else ""
        last = re.sub(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d\s+", "", last)
        problem = f"rclone failed (exit {code})" + (f": {last[:200]}" if last else "")
    return TargetError(problem + arrived, file=target.text)


class RcloneTarSink(Sink):
    """One tarball streamed into `rclone rcat REMOTE:PATH/NAME.tar.zst`."""

    keeps = frozenset({"owners", "names", "modes", "mtimes", "symlinks", "hardlinks", "xattrs",
                       "devices", "fifos", "sparse", "empty"})

    def __init__(self, target: str | RemoteTarget, *, force: bool = False,
                 rclone_opts: list[str] | tuple[str, ...] = ()) -> None:
        parsed = parse_remote_target(target) if isinstance(target, str) else target
        if parsed is None or parsed.kind != RCLONE_TAR:
            raise TargetError(f"{target!r} is not an rclone tarball target",
                              hint="write rclone:REMOTE:PATH/NAME.tar.zst")
        self.target = parsed
        self.rclone = require_tool("rclone", "install rclone (https://rclone.org/install/)")
        check_remote(self.rclone, parsed)
        self.secrets = remote_secrets(self.rclone, parsed.remote or "")
        self.rclone_opts = list(rclone_opts)
        if not force and self._exists():
            raise TargetError("the output file exists already on the remote", file=parsed.text,
                              hint="choose another name or add --force")
        self._err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([self.rclone, "rcat", *self.rclone_opts, parsed.dest],
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._err,
                                     env=_rclone_env())
        from .tar_sink import TarSink
        self.tar = TarSink(self.proc.stdin, compression=parsed.compression,  # type: ignore[arg-type]
                           label=parsed.text)
        self._done = False

    def _exists(self) -> bool:
        code, stderr = run_tool([self.rclone, "lsf", *self.rclone_opts, self.target.dest], env=_rclone_env())
        if code == 0:
            return True
        low = stderr.lower()
        if "not found" in low or "doesn't exist" in low or "no such file" in low or "not exist" in low:
            return False
        raise rclone_error(self.target, code, scrub(stderr, self.secrets), SinkResult(self.target.text))

    def _stderr(self) -> str:
        self._err.seek(0)
        return scrub(self._err.read().decode("utf-8", "replace"), self.secrets)

    def _failed(self) -> TargetError:
        self.proc.wait()
        return rclone_error(self.target, self.proc.returncode, self._stderr(), SinkResult(self.target.text))

    def add(self, item: Item) -> None:
        try:
            self.tar.add(item)
        except TargetError:
            if self.proc.poll() is not None or self._wait_exit(2):
                raise self._failed() from None
            raise

    def _wait_exit(self, seconds: float) -> bool:
        try:
            self.proc.wait(seconds)
            return True
        except subprocess.TimeoutExpired:
            return False

    def close(self) -> SinkResult:
        try:
            result = self.tar.close()
        except TargetError:
            if self._wait_exit(5):
                raise self._failed() from None
            raise
        try:
            self.proc.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass
        if self.proc.wait() != 0:
            raise self._failed()
        self._done = True
        result.target = self.target.text
        return result

    def abort(self) -> None:
        if self._done:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        # rcat may have left a partial object under the final name: remove it
        run_tool([self.rclone, "deletefile", *self.rclone_opts, self.target.dest], env=_rclone_env())
