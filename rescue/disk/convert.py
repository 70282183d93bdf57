"""Write a whole virtual disk as a sparse raw file (`rescue convert`).

Zero runs become holes (we seek over them and set the size at the end), data
is copied in large reads, and the output appears under its name only once it
is complete (written to NAME.part, then renamed). A damaged range (a bad
compressed cluster, a table past the end) is written as zeros and listed in
the stats, so one bad cluster does not cost the whole disk.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import DamagedRange, TargetError
from .base import DiskImage

CHUNK = 8 << 20          # bytes per read: large and few
RETRY_CHUNK = 64 << 10   # granularity used to isolate a damaged range

Progress = Callable[[int, int], None]


@dataclass
class ConvertStats:
    total: int = 0                   # virtual disk size
    written: int = 0                 # data bytes written
    holes: int = 0                   # bytes left as holes (zero runs and zero data)
    damaged: list[tuple[int, int, str]] = field(default_factory=list)  # (offset, length, why)
    seconds: float = 0.0

    @property
    def partial(self) -> bool:
        return bool(self.damaged)


def convert(disk: DiskImage, out_path: str | os.PathLike, progress: Progress | None = None, *,
            force: bool = False, chunk: int = CHUNK) -> ConvertStats:
    """Write `disk` to `out_path` as a sparse raw image; returns what was done."""
    out = os.path.abspath(os.fspath(out_path))
    part = out + ".part"
    if os.path.lexists(out):
        if not force:
            raise TargetError("output exists; not overwriting it", file=out,
                              hint="pick another name or pass --force")
        src_path = getattr(getattr(disk, "source", None), "path", None)
        if src_path and os.path.exists(src_path) and os.path.samefile(src_path, out):
            raise TargetError("output is the snapshot itself; refusing to overwrite it", file=out)
    try:
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o644)
    except OSError as exc:
        raise TargetError(f"cannot create output: {exc.strerror}", file=part) from None
    stats = ConvertStats(total=disk.size)
    started = time.monotonic()
    done = 0
    try:
        for run in disk.runs(0, disk.size):
            if run.kind == "zero":
                stats.holes += run.length
                done += run.length
                if progress:
                    progress(done, stats.total)
                continue
            pos, end = run.offset, run.offset + run.length
            while pos < end:
                n = min(chunk, end - pos)
                _copy(disk, fd, pos, n, stats)
                pos += n
                done += n
                if progress:
                    progress(done, stats.total)
        try:
            os.ftruncate(fd, disk.size)
            os.fsync(fd)
        except OSError as exc:
            raise TargetError(f"writing failed: {exc.strerror or exc}", file=part) from None
    except BaseException:
        os.close(fd)
        _remove(part)
        raise
    os.close(fd)
    os.replace(part, out)
    stats.seconds = time.monotonic() - started
    return stats


def _copy(disk: DiskImage, fd: int, pos: int, n: int, stats: ConvertStats) -> None:
    try:
        data = disk.read(pos, n)
        if len(data) != n:
            raise DamagedRange(f"{disk.name}: short read at {pos}: {len(data)} of {n} bytes")
    except DamagedRange as exc:
        if n <= RETRY_CHUNK:
            last = stats.damaged[-1] if stats.damaged else None
            if last and last[0] + last[1] == pos:  # one entry per damaged stretch
                stats.damaged[-1] = (last[0], last[1] + n, last[2])
            else:
                stats.damaged.append((pos, n, str(exc)))
            stats.holes += n
            return
        # Narrow the damage down so the healthy part of this chunk is kept.
        for sub in range(pos, pos + n, RETRY_CHUNK):
            _copy(disk, fd, sub, min(RETRY_CHUNK, pos + n - sub), stats)
        return
    if data == bytes(n):
        stats.holes += n  # zero data becomes a hole too, like qemu-img convert
        return
    _pwrite(fd, data, pos)
    stats.written += n


def _pwrite(fd: int, data: bytes, pos: int) -> None:
    view = memoryview(data)
    try:
        while view:
            if hasattr(os, "pwrite"):
                k = os.pwrite(fd, view, pos)
            else:  # Windows
                os.lseek(fd, pos, os.SEEK_SET)
                k = os.write(fd, view)
            view = view[k:]
            pos += k
    except OSError as exc:
        raise TargetError(f"writing at offset {pos} failed: {exc.strerror or exc}") from None


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
