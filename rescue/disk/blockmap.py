"""Shared read path for block-mapped containers (VMDK, VHD, VHDX).

A reader only says where each piece of a virtual range lives (`_pieces`); this
module merges neighbouring pieces into runs and serves each run with one read:
one pread per contiguous host range, zeros without I/O, parent ranges with one
read of the parent. It also opens parents with loop and chain-length checks.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Callable, Iterator, NamedTuple

from ..errors import DamagedRange, DiskFormatError, RescueError, SourceError
from ..source.base import ByteSource, Run, open_relative, runs as source_runs
from .base import DiskImage, DiskOptions

# Piece kinds. DATA: bytes at `host` in `src`; ZERO; PARENT: same range of the
# parent (zero when there is none); DAMAGED: `host` holds the reason text;
# any other kind is served by the reader's `_read_special`.
DATA, ZERO, PARENT, DAMAGED = "data", "zero", "parent", "damaged"


class Piece(NamedTuple):
    kind: str
    offset: int          # virtual offset
    length: int
    src: ByteSource | None = None
    host: object = None  # host offset for DATA, reason for DAMAGED, reader's key otherwise


class LRU(OrderedDict):
    """A small bounded cache for metadata tables and inflated grains."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def get_or(self, key, make: Callable[[], object]):
        try:
            self.move_to_end(key)
            return self[key]
        except KeyError:
            value = make()
            self[key] = value
            if len(self) > self.limit:
                self.popitem(last=False)
            return value


_RUN_RE = re.compile(r"0+|1+")


def bitmap_runs(bitmap: bytes, nbits: int, lsb_first: bool) -> list[tuple[int, int, int]]:
    """(first_bit, count, bit) runs of a sector bitmap, found by regex over its
    bit string (C speed) instead of a Python loop per bit."""
    width = len(bitmap) * 8
    if lsb_first:
        bits = format(int.from_bytes(bitmap, "little"), f"0{width}b")[::-1]
    else:
        bits = format(int.from_bytes(bitmap, "big"), f"0{width}b")
    bits = bits[:nbits].ljust(nbits, "0")
    return [(m.start(), m.end() - m.start(), 1 if bits[m.start()] == "1" else 0)
            for m in _RUN_RE.finditer(bits)]


def bitmap_pieces(bruns: list[tuple[int, int, int]], unit: int, base: int, start: int,
                  length: int, one: Callable[[int, int], Piece], zero: Callable[[int, int], Piece]
                  ) -> Iterator[Piece]:
    """Cut [start, start+length) (bytes within a block at virtual `base`) by the
    bitmap runs; `one`/`zero` make the piece for (virtual offset, length)."""
    end = start + length
    for first, count, bit in bruns:
        lo, hi = max(first * unit, start), min((first + count) * unit, end)
        if lo < hi:
            yield (one if bit else zero)(base + lo, hi - lo)


class MappedImage(DiskImage):
    """A DiskImage whose subclass implements `_pieces(offset, length)`."""

    parent: DiskImage | None = None
    _sources: list[ByteSource]

    def _pieces(self, offset: int, length: int) -> Iterator[Piece]:
        raise NotImplementedError

    def _read_special(self, piece: Piece) -> bytes:
        raise DamagedRange(f"{self.name}: cannot read piece of kind {piece.kind}")

    def _merged(self, offset: int, length: int) -> Iterator[Piece]:
        cur: Piece | None = None
        for p in self._pieces(offset, length):
            if p.length <= 0:
                continue
            if cur is not None and p.kind == cur.kind and cur.offset + cur.length == p.offset:
                if p.kind in (ZERO, PARENT):
                    cur = cur._replace(length=cur.length + p.length)
                    continue
                if (p.kind == DATA and p.src is cur.src
                        and cur.host + cur.length == p.host):
                    cur = cur._replace(length=cur.length + p.length)
                    continue
            if cur is not None:
                yield cur
            cur = p
        if cur is not None:
            yield cur

    def _clamp(self, offset: int, length: int) -> int:
        if offset < 0:
            raise ValueError("negative offset")
        return max(0, min(length, self.size - offset))

    def read(self, offset: int, length: int) -> bytes:
        length = self._clamp(offset, length)
        if length == 0:
            return b""
        out = []
        for p in self._merged(offset, length):
            if p.kind == DATA:
                data = p.src.read(p.host, p.length)
                if len(data) != p.length:
                    raise DamagedRange(
                        f"{self.name}: virtual bytes {p.offset}-{p.offset + p.length} are stored at "
                        f"{p.src.name} offset {p.host}, past its end ({p.src.size} bytes): file truncated?")
                out.append(data)
            elif p.kind == ZERO or (p.kind == PARENT and self.parent is None):
                out.append(bytes(p.length))
            elif p.kind == PARENT:
                data = self.parent.read(p.offset, p.length)
                out.append(data + bytes(p.length - len(data)))
            elif p.kind == DAMAGED:
                raise DamagedRange(f"{self.name}: virtual bytes {p.offset}-{p.offset + p.length}: {p.host}")
            else:
                out.append(self._read_special(p))
        return b"".join(out)

    def runs(self, offset: int, length: int) -> Iterator[Run]:
        length = self._clamp(offset, length)
        pending: list | None = None
        for r in self._kind_runs(offset, length):
            if pending and pending[2] == r[2] and pending[0] + pending[1] == r[0]:
                pending[1] += r[1]
                continue
            if pending:
                yield Run(*pending)
            pending = [r[0], r[1], r[2]]
        if pending:
            yield Run(*pending)

    def _kind_runs(self, offset: int, length: int) -> Iterator[tuple[int, int, str]]:
        for p in self._merged(offset, length):
            if p.kind == ZERO or (p.kind == PARENT and self.parent is None):
                yield (p.offset, p.length, "zero")
            elif p.kind == PARENT:
                covered = 0
                if p.offset < self.parent.size:
                    for r in source_runs(self.parent, p.offset, min(p.length, self.parent.size - p.offset)):
                        covered += r.length
                        yield (r.offset, r.length, r.kind)
                if covered < p.length:   # child bigger than parent: the rest reads as zeros
                    yield (p.offset + covered, p.length - covered, "zero")
            else:
                yield (p.offset, p.length, "data")

    def file_extents(self, offset: int, length: int) -> list[tuple[int, int, int, int]] | None:
        """(offset, length, fd, host offset) when every byte of the range is
        stored verbatim in local files, so `rescue convert` can copy it in the
        kernel; None when any part needs us (zeros, parents, inflating)."""
        length = self._clamp(offset, length)
        out = []
        for p in self._merged(offset, length):
            fileno = getattr(p.src, "fileno", None)
            if p.kind != DATA or fileno is None or p.host + p.length > p.src.size:
                return None
            out.append((p.offset, p.length, fileno(), p.host))
        return out

    def close(self) -> None:
        if self.parent is not None:
            self.parent.close()
            self.parent = None
        for s in getattr(self, "_sources", []):
            s.close()
        self._sources = []


def source_key(source: ByteSource) -> object:
    """What makes two sources the same file, for loop detection."""
    return getattr(source, "identity", None) or source.name


def open_sibling(source: ByteSource, name: str, what: str, hint: str | None = None) -> ByteSource:
    """open_relative with a disk-layer error that names the missing file."""
    try:
        return open_relative(source, name)
    except SourceError as e:
        raise DiskFormatError(f"{what} {name!r} cannot be opened ({e.problem})", file=source.name,
                              hint=hint) from None
    except (ValueError, OSError) as e:   # names from a damaged image: NUL bytes, too long ...
        raise DiskFormatError(f"{what} {name!r} cannot be opened ({e})", file=source.name,
                              hint=hint) from None


def check_chain(source: ByteSource, options: DiskOptions, chain: tuple) -> tuple:
    """Add `source` to the chain of images being opened; refuse loops and
    chains longer than options.max_chain."""
    key = source_key(source)
    if key in chain:
        raise DiskFormatError("backing chain loops back to a file already in the chain",
                              file=source.name)
    if len(chain) > options.max_chain:
        raise DiskFormatError(f"backing chain longer than {options.max_chain} images",
                              file=source.name, hint="a loop, or raise max_chain")
    return chain + (key,)


def close_quietly(source: ByteSource | None) -> None:
    try:
        if source is not None:
            source.close()
    except (OSError, RescueError):
        pass
