"""Write a whole virtual disk as a sparse raw file (`rescue convert`): the
output side of the disk layer, as the other writers are of the filesystem layer.

Zero runs become holes (we seek over them and set the size at the end), data
is copied in large reads, and the output appears under its name only once it
is complete (written to NAME.part, then renamed). A damaged range (a bad
compressed cluster, a table past the end) is written as zeros and listed in
the stats, so one bad cluster does not cost the whole disk.

Reading (and decompressing) runs in one thread while the caller's thread
writes, a few chunks apart: both release the GIL in pread/pwrite/zlib, so the
two overlap the way qemu-img's parallel requests do. Memory stays bounded by
the queue (AHEAD chunks).
"""

from __future__ import annotations

import errno
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Union

from ..disk.base import DiskImage
from ..errors import DamagedRange, TargetError
from .copy import write_all_at

CHUNK = 8 << 20          # bytes per read: large and few
RETRY_CHUNK = 64 << 10   # granularity used to isolate a damaged range
AHEAD = 3                # chunks read ahead of the writer

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


# One unit of work from the reader: (offset, length, what, reason if damaged)
# where `what` is the bytes, None for a hole, or (fd, host offset) for a range
# stored verbatim in a local file.
Piece = tuple[int, int, Union[bytes, tuple[int, int], None], Optional[str]]


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
    reader = _ReadAhead(_pieces(disk, chunk))
    try:
        for pos, n, data, damaged in reader:
            if damaged is not None:
                _note_damage(stats, pos, n, damaged)
            if data is None:
                stats.holes += n
            else:
                if isinstance(data, tuple):
                    _kernel_copy(data[0], data[1], fd, pos, n, part)
                else:
                    _pwrite(fd, data, pos, part)
                stats.written += n
            done += n
            if progress:
                progress(done, stats.total)
        try:
            os.ftruncate(fd, disk.size)
            os.fsync(fd)
        except OSError as exc:
            raise TargetError(f"writing failed: {exc.strerror or exc}", file=part) from None
    except BaseException:
        reader.stop()
        os.close(fd)
        _remove(part)
        raise
    os.close(fd)
    os.replace(part, out)
    stats.seconds = time.monotonic() - started
    return stats


def _pieces(disk: DiskImage, chunk: int) -> Iterator[Piece]:
    extents = getattr(disk, "file_extents", None) if hasattr(os, "copy_file_range") else None
    for run in disk.runs(0, disk.size):
        if run.kind == "zero":
            yield run.offset, run.length, None, None
            continue
        end = run.offset + run.length
        for pos in range(run.offset, end, chunk):
            n = min(chunk, end - pos)
            located = extents(pos, n) if extents and _kernel_copy_works else None
            if located:  # stored verbatim in a local file: the kernel copies it
                for off, m, src_fd, host in located:
                    yield off, m, (src_fd, host), None
            else:
                yield from _read(disk, pos, n)


def _read(disk: DiskImage, pos: int, n: int) -> Iterator[Piece]:
    try:
        data = disk.read(pos, n)
        if len(data) != n:
            raise DamagedRange(f"{disk.name}: short read at {pos}: {len(data)} of {n} bytes")
    except DamagedRange as exc:
        if n <= RETRY_CHUNK:
            yield pos, n, None, str(exc)
            return
        # Narrow the damage down so the healthy part of this chunk is kept.
        for sub in range(pos, pos + n, RETRY_CHUNK):
            yield from _read(disk, sub, min(RETRY_CHUNK, pos + n - sub))
        return
    # Zero data becomes a hole too, like qemu-img convert.
    yield pos, n, (None if data == bytes(n) else data), None


def _note_damage(stats: ConvertStats, pos: int, n: int, why: str) -> None:
    last = stats.damaged[-1] if stats.damaged else None
    if last and last[0] + last[1] == pos:  # one entry per damaged stretch
        stats.damaged[-1] = (last[0], last[1] + n, last[2])
    else:
        stats.damaged.append((pos, n, why))


class _ReadAhead:
    """Runs an iterator in a thread, AHEAD items ahead; errors re-raise here."""

    _END = object()

    def __init__(self, items: Iterator[Piece]) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=AHEAD)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items,), daemon=True,
                                        name="rescue-convert-read")
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stopped.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, items: Iterator[Piece]) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
        except BaseException as exc:  # handed to the writer's thread
            self._put(exc)
            return
        self._put(self._END)

    def __iter__(self) -> Iterator[Piece]:
        while True:
            item = self._queue.get()
            if item is self._END:
                self._thread.join()
                return
            if isinstance(item, BaseException):
                self._thread.join()
                raise item
            yield item

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=30)


_kernel_copy_works = True


def _kernel_copy(src_fd: int, host: int, fd: int, pos: int, n: int, name: str) -> None:
    """copy_file_range: no trip through Python's memory (falls back to
    pread/pwrite where the kernel or filesystem cannot do it)."""
    global _kernel_copy_works
    while n > 0:
        try:
            k = os.copy_file_range(src_fd, fd, n, host, pos)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
                raise TargetError(f"writing at offset {pos} failed: {exc.strerror or exc}",
                                  file=name) from None
            _kernel_copy_works = False
            k = 0
        if k <= 0:  # unsupported, or the source ended early: copy by hand
            data = os.pread(src_fd, n, host)
            if len(data) < n:
                data += bytes(n - len(data))
            _pwrite(fd, data, pos, name)
            return
        n, host, pos = n - k, host + k, pos + k


def _pwrite(fd: int, data: bytes, pos: int, name: str) -> None:
    try:
        write_all_at(fd, data, pos)
    except OSError as exc:
        raise TargetError(f"writing at offset {pos} failed: {exc.strerror or exc}", file=name) from None


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
