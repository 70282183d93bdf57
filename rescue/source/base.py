"""The byte source: the one interface every layer speaks.

A byte source has a `name` (for messages), a `size`, and `read(offset, length)`
returning exactly `length` bytes, fewer only when the range runs past `size`.
Layers stack by wrapping: a disk container reads its file through a byte source
and is itself a byte source; a partition is a `Window` onto a disk.
"""

from __future__ import annotations

import os
from typing import Iterator, NamedTuple, Protocol, runtime_checkable

from ..errors import SourceError


@runtime_checkable
class ByteSource(Protocol):
    name: str
    size: int

    def read(self, offset: int, length: int) -> bytes: ...

    def close(self) -> None: ...


# Run kinds. A hole (ZERO) stores nothing; UNWRITTEN is allocated space that
# reads as zeros (preallocated extents): outputs treat both as holes.
DATA, ZERO, UNWRITTEN, COMPRESSED = "data", "zero", "unwritten", "compressed"
HOLE_KINDS = frozenset({ZERO, UNWRITTEN})


class Run(NamedTuple):
    """Where a range of bytes is and how it is stored: the one shape that
    travels up the stack (a disk's map, a file's extents, a sink's copy plan).

    `offset` is in the thing described (a disk offset for a container's runs, a
    file offset for a file's runs); `where` is the byte offset in the source
    below at which a DATA run's bytes lie as they are (None: not readable as is)."""

    offset: int
    length: int
    kind: str
    where: int | None = None


def runs(source: ByteSource, offset: int = 0, length: int | None = None) -> Iterator[Run]:
    """Where a source's data lives: sources that know their holes (qcow2,
    VMDK, sparse files) implement `runs()` themselves; others are all data."""
    if length is None:
        length = source.size - offset
    own = getattr(source, "runs", None)
    if own is not None:
        yield from own(offset, length)
    else:
        yield Run(offset, length, "data")


def open_relative(source: ByteSource, name: str) -> ByteSource:
    """Open a file named relative to `source` (a backing file, a VMDK extent).

    Sources that live somewhere (a directory, a URL, an archive) implement
    `open_relative`; others cannot have siblings."""
    opener = getattr(source, "open_relative", None)
    if opener is None:
        raise SourceError(f"cannot open {name!r} next to this source", file=source.name)
    return opener(name)


def clip_read(size: int, offset: int, length: int) -> int:
    """How many bytes of a read of `length` at `offset` a source of `size`
    bytes can return: 0 at or past its end. A negative offset is a bug above."""
    if offset < 0:
        raise ValueError("negative offset")
    return min(length, size - offset) if offset < size and length > 0 else 0


_HAS_PREAD = hasattr(os, "pread")


class DescriptorSource:
    """What a local file and a block device share: an open descriptor read
    with pread (lseek + read where there is none) until the range is whole or
    the end is reached, `fileno()`, `close()`. Subclasses open `_fd` and set
    `path`, `name`, `size`, `identity`."""

    path: str
    name: str
    size: int
    max_read = 1 << 62   # the most one pread asks for (a device asks in pieces)
    _fd = -1

    def _pread(self, n: int, pos: int) -> bytes:
        if _HAS_PREAD:
            return os.pread(self._fd, n, pos)
        os.lseek(self._fd, pos, os.SEEK_SET)   # Windows has no pread
        return os.read(self._fd, n)

    def _read_at(self, offset: int, length: int) -> bytes:
        """`length` bytes at `offset`, fewer only at the end of the file."""
        data = self._pread(min(length, self.max_read), offset)
        if len(data) == length:
            return data
        parts = [data]
        got = len(data)
        while got < length and data:
            data = self._pread(min(length - got, self.max_read), offset + got)
            parts.append(data)
            got += len(data)
        return b"".join(parts)

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"


class FileSource(DescriptorSource):
    """A local file opened read-only (never for writing: non-negotiable)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self.name = self.path
        try:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except FileNotFoundError:
            raise SourceError("no such file", file=self.path) from None
        except IsADirectoryError:
            raise SourceError("is a directory, not a snapshot file", file=self.path) from None
        except PermissionError:
            raise SourceError("permission denied", file=self.path) from None
        st = os.fstat(self._fd)
        self.size = st.st_size
        self.bytes_read = 0   # for the benchmark's "bytes read from the image"
        self.identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def read(self, offset: int, length: int) -> bytes:
        # clip_read() and _read_at() inline for the usual case: every read of a local image passes here
        if offset >= self.size or length <= 0:
            return b""
        length = min(length, self.size - offset)
        self.bytes_read += length
        if _HAS_PREAD:   # the usual case: a whole answer from one pread
            data = os.pread(self._fd, length, offset)
            if len(data) == length:
                return data
        return self._read_at(offset, length)

    def open_relative(self, name: str) -> "FileSource":
        base = os.path.dirname(os.path.abspath(self.path))
        return FileSource(name if os.path.isabs(name) else os.path.join(base, name))


class Window:
    """A byte range of another source (a partition, a logical volume segment)."""

    def __init__(self, parent: ByteSource, start: int, size: int, name: str | None = None) -> None:
        if start < 0 or size < 0:
            raise ValueError("negative window")
        self.parent = parent
        self.start = start
        # A partition table may claim more than the disk holds; reads past the
        # real end come back short rather than failing the whole volume.
        self.size = size
        self.name = name or f"{parent.name}@{start}"

    def read(self, offset: int, length: int) -> bytes:
        if offset >= self.size or length <= 0:
            return b""
        length = min(length, self.size - offset)
        return self.parent.read(self.start + offset, length)

    def runs(self, offset: int, length: int) -> Iterator[Run]:
        length = min(length, self.size - offset)
        for r in runs(self.parent, self.start + offset, length):
            yield Run(r.offset - self.start, r.length, r.kind)

    def close(self) -> None:
        pass


class BytesSource:
    """An in-memory source, for tests and tiny synthetic disks."""

    def __init__(self, data: bytes, name: str = "<bytes>") -> None:
        self.data = data
        self.size = len(data)
        self.name = name

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset:offset + max(length, 0)]

    def close(self) -> None:
        pass
