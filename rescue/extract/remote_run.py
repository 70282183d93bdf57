"""Run rsync/rclone as child processes: streamed stdout, scrubbed stderr; and
`StagedTreeSink`, the "stage a batch, hand it to the tool, clear it" flow
both tree targets share.

Secrets (RSYNC_PASSWORD, an rclone remote's pass/key/token values) may show up
in a tool's messages (URLs with credentials, debug dumps); everything we show
goes through `scrub` first.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import tempfile
from typing import Callable, Iterable

from ..errors import TargetError
from ..fs.base import DIR, FILE, FileReadError
from .base import Item, NotWritten, Sink, SinkResult
from .remote_target import RemoteTarget
from .staging import Staging

_URL_CREDS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@:]+:[^/\s@]+@")


class RemoteSinkResult(SinkResult):
    """SinkResult plus the (name, bytes) the sink accepted but that did not
    arrive: the engine should list them as skipped, not rescued. `files` and
    `bytes` already leave them out."""

    def __init__(self, target: str) -> None:
        super().__init__(target=target)
        self.not_arrived: list[tuple[str, int]] = []


def scrub(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret replaced by ***, and user:pass@ in URLs removed."""
    for s in sorted({s for s in secrets if s and len(s) >= 3}, key=len, reverse=True):
        text = text.replace(s, "***")
    return _URL_CREDS.sub(r"\g<scheme>***@", text)


def unescape_rsync(name: str) -> str:
    """rsync prints unprintable bytes of names as \\#ooo; undo that."""
    if "\\#" not in name:
        return name
    raw = name.encode("utf-8", "surrogateescape")
    raw = re.sub(rb"\\#([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), raw)
    return raw.decode("utf-8", "surrogateescape")


def require_tool(name: str, hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise TargetError(f"{name} is not installed (not found on PATH)", hint=hint)
    return path


def run_tool(argv: list[str], *, env: dict[str, str] | None = None,
             on_line: Callable[[str], None] | None = None,
             stdin=subprocess.DEVNULL) -> tuple[int, str]:
    """Run argv; feed each stdout line to on_line; return (exit code, stderr).
    stderr goes to a temporary file so a chatty tool cannot block on a full pipe."""
    with tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=err,
                                    env=env if env is not None else os.environ.copy())
        except FileNotFoundError:
            raise TargetError(f"{argv[0]} is not installed (not found on PATH)") from None
        assert proc.stdout is not None
        try:
            for raw in proc.stdout:
                if on_line is not None:
                    on_line(raw.decode("utf-8", "surrogateescape").rstrip("\n"))
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            proc.stdout.close()
        code = proc.wait()
        err.seek(0)
        return code, err.read().decode("utf-8", "replace")


def error_lines(stderr: str) -> list[str]:
    """The tool's own error lines, without rsync's trailing summaries."""
    out = []
    for line in stderr.splitlines():
        line = line.strip()
        if not line or line.startswith("rsync error: some files") or line.startswith("(see the rsync"):
            continue
        out.append(line)
    return out


def _norm(name: str) -> str:
    return "/".join(p for p in name.split("/") if p not in ("", "."))


def data_bytes(item: Item) -> int:
    """Bytes a file takes in scratch: its data ranges when sparse, else its size."""
    content = item.content
    if content is None:
        return 0
    if content.read_range is not None:
        try:
            ranges = content.data_ranges()
        except Exception:
            ranges = None
        if ranges is not None:
            return sum(length for _, length in ranges)
    return content.size


class StagedTreeSink(Sink):
    """A tree target fed through local staging: items are staged (`Staging`)
    until a batch reaches `scratch_limit` data bytes, the tool sends the batch
    (`_send`), the batch's files are cleared; directories stay as the
    skeleton. A file bigger than the limit is staged alone. Subclasses give
    the tool's argv and read its results; the flow is here."""

    def __init__(self, target: RemoteTarget, staging: Staging, scratch_limit: int) -> None:
        self.target = target
        self.staging = staging
        self.scratch_limit = max(1, int(scratch_limit))
        self.result = RemoteSinkResult(target.text)
        self._batch: list[tuple[str, int]] = []   # (name, size) staged in this batch: -1 not a file,
        self._batch_names: set[str] = set()        # -2 a placeholder (not the user's file)
        self._failed: set[str] = set()             # names that did not arrive
        self.batches = 0
        self.sent_files = 0        # files whose data the tool sent
        self.peak_scratch = 0      # most data bytes staged at once
        self._closed = False

    # -- what a tool adds ----------------------------------------------------------

    def _send(self) -> set[str]:
        """Run the tool over the staged batch; the names that did not arrive."""
        raise NotImplementedError

    def _add_hardlink(self, item: Item, leader: str, name: str) -> None:
        raise NotImplementedError

    def _refuse(self, item: Item) -> str | None:
        """Why this target cannot hold the entry at all (not staged; the
        engine names it as skipped and the exit code is 1), or None."""
        return None

    def _staged(self, item: Item, name: str) -> None:
        """A non-directory went into the batch."""

    def _arrived(self, name: str) -> None:
        """A file of the batch is on the target now."""

    def _after_batch(self) -> None:
        """After a batch arrived and was cleared."""

    def _closing_warnings(self) -> list[str]:
        return self.staging.lost_warnings(self.target.text)

    # -- Sink ----------------------------------------------------------------------

    def add(self, item: Item) -> None:
        entry = item.entry
        refused = self._refuse(item)
        if refused:
            raise NotWritten(refused)
        need = 0
        try:
            if item.hardlink_to is not None and entry.kind != DIR:
                self._add_hardlink(item, _norm(item.hardlink_to), _norm(item.name))
                return
            if entry.kind == FILE and item.content is not None:
                need = data_bytes(item)
                if self._batch and self.staging.batch_bytes + need > self.scratch_limit:
                    self._flush()
                if need > self.scratch_limit:
                    self.result.warnings.append(
                        f"{item.name}: {need} bytes is more than the scratch limit ({self.scratch_limit}); "
                        "staged alone")
            self.staging.stage(item)
        except FileReadError:
            raise
        except ValueError as e:            # the engine lists it as skipped
            raise FileReadError(f"refusing unsafe name: {e}") from None
        except OSError as e:
            raise self._scratch_error(e) from None
        if entry.kind != DIR:
            name = _norm(item.name)
            self._batch.append((name, entry.size if entry.kind == FILE else -1))
            self._batch_names.add(name)
            self._staged(item, name)
        if need > self.scratch_limit:
            self._flush()

    def close(self) -> SinkResult:
        if self._closed:
            return self.result
        try:
            self._flush()       # always: also sends the skeleton and fixes directory mtimes
            self.result.warnings.extend(self._closing_warnings())
        finally:
            self._closed = True
            self.staging.cleanup()
        return self.result

    def abort(self) -> None:
        self._closed = True
        self.staging.cleanup()

    def _scratch_error(self, e: OSError) -> TargetError:
        if e.errno == errno.ENOSPC:
            return TargetError(f"local scratch space is full ({self.staging.root})",
                               hint="free space, lower --scratch-limit or point TMPDIR at a roomier disk")
        return TargetError(f"cannot stage into {self.staging.root}: {e.strerror}")

    def _flush(self) -> None:
        self.peak_scratch = max(self.peak_scratch, self.staging.batch_bytes)
        self.staging.fix_dirs()
        missing = self._send()
        self.batches += 1
        for name, size in self._batch:
            if name in missing:
                self._failed.add(name)
                if size != -2:
                    self.result.not_arrived.append((name, max(size, 0)))
                    self.result.warnings.append(f"{name}: did not arrive at {self.target.text}")
                continue
            if size >= 0:
                self.result.files += 1
                self.result.bytes += size
                self._arrived(name)
        self.staging.clear_batch()
        self._batch = []
        self._batch_names = set()
        self._after_batch()
