"""A file's bytes copied inside the kernel, never through Python.

When a filesystem reader says where a file's data lies on its volume
(`file_runs`, `where`) and the byte sources below the volume are a plain
local file (a partition `Window` of a `RawDisk` of a `FileSource`, or a
container whose clusters lie verbatim in a local file: `file_extents`), the
file is a list of (fd, offset, length) pieces of image files, and the output
can take them with `os.sendfile` (into a pipe, socket or file) or
`os.copy_file_range` (into a file), on Linux. Anything else (compressed
data, a remote or archived image, another platform) answers None and the
caller reads the bytes as usual. Reads past the end of an image file answer
None too, so the buffered path reports the damage in its own words.
"""

from __future__ import annotations

import errno
import os
import sys

from ..disk.base import RawDisk
from ..fs.base import Entry, FileReadError, FileSystem
from ..source.base import DATA, HOLE_KINDS, ByteSource, FileSource, Window

HOLE = -1   # a piece's fd for zeros (a hole inside a file written densely)
AVAILABLE = hasattr(os, "pread")   # pieces are read with pread, ...
SENDFILE = sys.platform.startswith("linux") and hasattr(os, "sendfile")   # ... and sent with sendfile
COPY_FILE_RANGE = sys.platform.startswith("linux") and hasattr(os, "copy_file_range")   # (or into a file)
# Errors that are the output's (a reader gone, a full disk): raised. Any other
# (EINVAL for an O_APPEND output, ENOSYS, EIO reading the image, ...) sends the
# caller to the buffered path, which says whose fault it is.
OUTPUT_ERRORS = frozenset({errno.EPIPE, errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_MAX_SEND = 1 << 30   # one sendfile call moves at most this much

Piece = tuple[int, int, int]   # (fd or HOLE, offset in that file, length)


def locate(source: ByteSource, offset: int, length: int) -> list[Piece] | None:
    """Where [offset, offset+length) of `source` lies in local files, or None
    when any of it is not stored verbatim in one (or lies past its end)."""
    while True:
        kind = type(source)
        if kind is Window:
            if offset + length > source.size:
                return None
            offset += source.start
            source = source.parent
        elif kind is RawDisk:
            source = source.source
        elif kind is FileSource:
            if source.fileno() < 0 or offset + length > source.size:
                return None
            source.bytes_read += length
            return [(source.fileno(), offset, length)]
        else:
            extents = getattr(source, "file_extents", None)
            if extents is None:
                return None
            found = extents(offset, length)
            if not found:
                return None
            data_source = getattr(source, "data_source", None)
            if isinstance(data_source, FileSource):
                data_source.bytes_read += sum(n for _, n, fd, _ in found if fd == data_source.fileno())
            return [(fd, host, n) for _, n, fd, host in found]


def plain_pieces(fs: FileSystem, entry: Entry) -> list[Piece] | None:
    """The whole file as pieces of local files (holes as HOLE pieces), or None."""
    route = getattr(fs, "_inner", None)   # the guest's tree of mounts: ask the filesystem holding it
    if route is not None and getattr(fs, "backend", None) == "merged":
        inner_fs, inner_entry = route(entry)
        return plain_pieces(inner_fs, inner_entry)
    source = getattr(fs, "source", None)
    if not AVAILABLE or source is None or not fs._has_runs():
        return None
    out: list[Piece] = []
    for run in fs.file_runs(entry):
        if run.kind in HOLE_KINDS:
            out.append((HOLE, 0, run.length))
            continue
        if run.kind != DATA or run.where is None:
            return None
        found = locate(source, run.where, run.length)
        if found is None:
            return None
        out.extend(found)
    if sum(n for _, _, n in out) != entry.size:
        return None
    return out


def send(out_fd: int, src_fd: int, offset: int, length: int, what: str) -> int:
    """`length` bytes at `offset` of `src_fd` into `out_fd` (at its position),
    by the kernel; returns the bytes moved, fewer than `length` when the
    kernel would not (the caller copies the rest through its buffered path).
    FileReadError when the image file ends early; OSError in OUTPUT_ERRORS."""
    done = 0
    while done < length:
        try:
            n = os.sendfile(out_fd, src_fd, offset + done, min(length - done, _MAX_SEND))
        except OSError as exc:
            if exc.errno in OUTPUT_ERRORS:
                raise
            return done
        if n == 0:
            raise FileReadError(f"{what}: the image file ended at offset {offset + done} (truncated while reading?)")
        done += n
    return done


def read_pieces(pieces: list[Piece]) -> bytes | None:
    """A small file's bytes, one pread a piece; None when a read comes back
    short (the image shrank: the caller's usual path reports it)."""
    parts = []
    for fd, offset, length in pieces:
        data = bytes(length) if fd == HOLE else os.pread(fd, length, offset)
        if len(data) != length:
            return None
        parts.append(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def write_zeros(out_fd: int, length: int) -> None:
    zeros = bytes(min(length, 1 << 20))
    while length:
        view = memoryview(zeros)[:min(length, len(zeros))]
        while view:
            n = os.write(out_fd, view)
            view = view[n:]
            length -= n
