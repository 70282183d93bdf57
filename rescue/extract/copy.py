"""The one copy loop every writer shares: a file's data, hole-aware, in large pieces.

The tar, directory and staging writers all ask the same two things: which
pieces of a file hold data (a sparse file's holes are never read, and stay
holes in the output), and how to put bytes at an offset of a local file.
"""

from __future__ import annotations

import os
from typing import Iterator

from ..fs.base import FileReadError
from . import zerocopy
from .base import Content

CHUNK = 1 << 20


def sparse_ranges(content: Content) -> list[tuple[int, int]] | None:
    """The data ranges of a file that has holes; None for a dense file (or a
    reader that cannot say), which is then read whole, in order."""
    if content.read_range is None:
        return None
    ranges = content.data_ranges()
    if ranges is None or sum(length for _, length in ranges) >= content.size:
        return None
    return ranges


def data_pieces(content: Content, what: str, ranges: list[tuple[int, int]] | None = None,
                chunk: int = CHUNK) -> Iterator[tuple[int, bytes]]:
    """(file offset, bytes) of a file's data in ascending order: only the
    `ranges` given (a sparse file's data), else the whole file. Raises
    FileReadError when the file gives fewer bytes than it claims."""
    if ranges is not None:
        for offset, length in ranges:
            pos, end = offset, offset + length
            while pos < end:
                n = min(chunk, end - pos)
                data = content.read_range(pos, n)  # type: ignore[misc]
                if len(data) != n:
                    raise FileReadError(f"{what}: short read at offset {pos}")
                yield pos, data
                pos += n
        return
    pos = 0
    for data in content.chunks():
        yield pos, data
        pos += len(data)
    if pos != content.size:
        raise FileReadError(f"{what}: read {pos} of {content.size} bytes")


def copy_to_fd(content: Content, fd: int, what: str, *, zero_chunks_as_holes: bool = False) -> int:
    """Write a file's content into the empty file `fd`, holes left as holes;
    returns the data bytes written. `zero_chunks_as_holes` also leaves out
    all-zero chunks of a dense file (scratch space that costs nothing)."""
    if not zero_chunks_as_holes:
        copied = _kernel_copy(content, fd)
        if copied is not None:
            return copied
    used = 0
    for offset, data in data_pieces(content, what, sparse_ranges(content)):
        if zero_chunks_as_holes and data.count(0) == len(data):
            continue
        write_all_at(fd, data, offset)
        used += len(data)
    os.ftruncate(fd, content.size)
    return used


def _kernel_copy(content: Content, fd: int) -> int | None:
    """copy_file_range from the image file into `fd` (the kernel copies, or
    shares the blocks on a filesystem that can), holes skipped; None when the
    file is not stored as is in a local file or the kernel will not copy
    (another filesystem, a truncated image): the buffered path then writes
    every byte at its offset again, and says what went wrong."""
    plain = getattr(content, "plain", None)
    if plain is None or not zerocopy.COPY_FILE_RANGE:
        return None
    pieces = plain()
    if pieces is None:
        return None
    pos = used = 0
    for src, offset, length in pieces:
        done = 0
        while src != zerocopy.HOLE and done < length:
            try:
                n = os.copy_file_range(src, fd, length - done, offset + done, pos + done)
            except OSError as exc:
                if exc.errno in zerocopy.OUTPUT_ERRORS:
                    raise
                return None
            if n == 0:
                return None
            done += n
        used += done
        pos += length
    os.ftruncate(fd, content.size)
    return used


def write_all_at(fd: int, data: bytes, offset: int) -> None:
    """All of `data` at `offset` (pwrite may write less; Windows has no pwrite)."""
    view = memoryview(data)
    while view:
        if hasattr(os, "pwrite"):
            n = os.pwrite(fd, view, offset)
        else:
            os.lseek(fd, offset, os.SEEK_SET)
            n = os.write(fd, view)
        view = view[n:]
        offset += n
