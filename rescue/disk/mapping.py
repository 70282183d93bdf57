"""The one read path of the disk layer: every container that maps its virtual
disk onto files (all but raw disks and Parallels bundles) is a MappedDisk.

A reader only says where each piece of the virtual disk lives, in one of two
ways:

- table-mapped formats (qcow2, QCOW v1, VDI, Parallels, Bochs, VMA, cloop,
  DMG) decode one fixed-size table at a time (a qcow2 L2 table, a slice of a
  VDI block map) into `Extent`s with `_decode_table`; decoded tables are
  cached and the base class walks them;
- block-mapped formats (VMDK, VHD, VHDX) override `_map` and yield the pieces
  of a request directly from their grain tables or BATs.

Everything after that is here, once: neighbouring pieces are merged into
maximal runs (`pieces`), and each run is served with one I/O: one read per
host-contiguous range, zeros without I/O, the backing image's bytes with one
read of it, compressed clusters inflated in batches on a few threads.
`runs()` (the zero/data map) and `file_extents()` (for `rescue convert`'s
copy_file_range) come from the same runs.
"""

from __future__ import annotations

import os
import sys
from array import array
from bisect import bisect_right
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, NamedTuple

from ..errors import BAD_BYTES, DamagedRange, describe, is_bad_bytes
from ..lru import LRU
from ..source.base import ByteSource, Run, runs as source_runs
from .base import DiskImage

# Piece kinds.
DATA = "data"              # stored verbatim at host offset `where` in a file
ZERO = "zero"              # reads as zeros (zero cluster, unallocated without a parent)
BACKING = "backing"        # not stored here: the backing image's bytes (zeros without one)
COMPRESSED = "compressed"  # part of a compressed unit: `where` = (unit descriptor, offset in it)
DAMAGED = "damaged"        # the map is invalid here: `where` says why; reads raise DamagedRange

MERGEABLE = (DATA, ZERO, BACKING)
MAX_BATCH_READ = 16 << 20   # compressed bytes fetched by one read
_POOL: list[ThreadPoolExecutor] = []


def _workers() -> int:
    return max(2, min(8, os.cpu_count() or 2))


def _pool() -> ThreadPoolExecutor:
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(max_workers=_workers(), thread_name_prefix="rescue-inflate"))
    return _POOL[0]


class Piece(NamedTuple):
    """A stretch of the virtual disk that is stored one way."""

    offset: int              # virtual offset
    length: int
    kind: str
    where: Any = None        # DATA: host offset; COMPRESSED: (descriptor, skip); DAMAGED: reason
    source: Any = None       # DATA: the file holding it, when it is not the image's data_source


SHORT_TAIL = 512   # bytes missing at a file's end that still read as zeros (an unpadded last sector)


class Truncation(NamedTuple):
    """A container file cut short: how much of it and of the disk is missing."""

    file_size: int        # bytes the file holds
    needed: int           # the file size its tables need (at least; a missing table hides what it maps)
    lost_virtual: int     # virtual disk bytes stored past the end (read as damaged)
    missing_tables: int   # tables or table ranges past the end

    def describe(self, what: str) -> str:
        from ..units import human_size
        short = human_size(max(self.needed - self.file_size, 0))
        if self.missing_tables:   # what a missing table maps is unknown: bounds, not amounts
            return (f"the {what} is truncated: the file ends at {self.file_size} bytes, {self.missing_tables} "
                    f"table or block ranges lie past that and its data reaches at least byte {self.needed} "
                    f"(at least {short} missing); up to {human_size(self.lost_virtual)} of the virtual disk "
                    f"are lost")
        return (f"the {what} is truncated: its data reaches byte {self.needed} but the file ends at "
                f"{self.file_size} ({short} missing); {human_size(self.lost_virtual)} of the virtual disk "
                f"are lost")


def _host_range(p: "Piece") -> tuple[int | None, int | None, Any]:
    """Where in its file a stored piece starts and ends, and the file when the
    unit names it ((None, None, None) for pieces not stored in a file; end None
    when a compressed unit's length is unknown). Compressed units are
    (offset, length) (qcow2, VDI...) or (extent, marker offset, grain) (VMDK)."""
    if p.kind == DATA and isinstance(p.where, int):
        return p.where, p.where + p.length, None
    if p.kind == COMPRESSED and isinstance(p.where, tuple) and p.where:
        unit = p.where[0]
        if isinstance(unit, int):
            return unit, None, None
        if isinstance(unit, tuple) and len(unit) >= 2 and all(isinstance(x, int) for x in unit[:2]):
            return unit[0], unit[0] + unit[1], None
        if isinstance(unit, tuple) and len(unit) >= 2 and isinstance(unit[1], int) and hasattr(unit[0], "src"):
            return unit[1], None, unit[0].src
    return None, None, None


class Extent(NamedTuple):
    """One entry of a decoded table: like a Piece, relative to the table's span."""

    start: int       # byte offset inside the table's span
    length: int
    kind: str
    host: Any = 0    # DATA: host offset of `start`; COMPRESSED: descriptor; DAMAGED: reason


class ExtentBuilder:
    """Collects extents in order, merging neighbours of one kind (and, for
    data, host-contiguous ones) so a table decodes into few extents."""

    def __init__(self) -> None:
        self.extents: list[Extent] = []
        self._start = self._length = 0
        self._kind: str | None = None
        self._host: Any = 0

    def add(self, start: int, length: int, kind: str, host: Any = 0) -> None:
        if self._kind == kind and kind in (ZERO, BACKING):
            self._length += length
            return
        if self._kind == DATA and kind == DATA and self._host + self._length == host:
            self._length += length
            return
        self._flush()
        self._start, self._length, self._kind, self._host = start, length, kind, host

    def _flush(self) -> None:
        if self._kind is not None:
            self.extents.append(Extent(self._start, self._length, self._kind, self._host))
        self._kind = None

    def done(self) -> tuple[list[int], list[Extent]]:
        self._flush()
        return [e.start for e in self.extents], self.extents


class MappedDisk(DiskImage):
    """Base of the container readers: resolves requests into merged pieces
    and serves them.

    A subclass calls `super().__init__(source)`, sets size and info, and either
    sets `span`, calls `_init_table_cache()` and implements `_decode_table`, or
    overrides `_map`. With compressed pieces it implements `_inflate` (or
    overrides `_inflate_units`). `backing` is the parent image (or None), and
    files the image opened besides `source` go in `extra_sources`: close()
    closes them all.
    """

    span: int = 0                      # table-mapped: bytes of the disk one table covers
    table_cache_entries = 1 << 18      # decoded table entries kept (memory bound)
    cluster_cache_size = 32            # inflated compressed units kept
    _tables: LRU | None = None
    _clusters: LRU | None = None

    def __init__(self, source: ByteSource) -> None:
        self.source: ByteSource | None = source   # the image file itself
        self.data_source: ByteSource = source   # where DATA pieces without a `source` live
        self.name = source.name
        self.backing: Any = None                # a DiskImage or byte source, or None
        self.extra_sources: list[ByteSource] = []
        self._clusters = LRU(self.cluster_cache_size)

    # -- what a reader provides -----------------------------------------------

    def _init_table_cache(self, entries_per_table: int) -> None:
        self._tables = LRU(max(4, self.table_cache_entries // max(1, entries_per_table)))

    def _decode_table(self, index: int) -> tuple[list[int], list[Extent]]:
        """Table `index` as (extent starts, extents) covering [0, span)."""
        raise NotImplementedError

    def _table(self, index: int) -> tuple[list[int], list[Extent]]:
        return self._tables.get(index, lambda: self._decode_table_checked(index))

    # The read path's boundary: a table or a compressed unit that a reader's
    # parser or a decompressor chokes on damages that range only (DamagedRange:
    # the caller skips what needs it), never the whole command.

    def _decode_table_checked(self, index: int) -> tuple[list[int], list[Extent]]:
        try:
            return self._decode_table(index)
        except BAD_BYTES as exc:
            if not is_bad_bytes(exc):
                raise
            raise DamagedRange(f"{self.name}: table {index} is damaged: {describe(exc)}") from None

    def _inflate_checked(self, descriptor: Any, raw: bytes) -> bytes:
        try:
            return self._inflate(descriptor, raw)
        except BAD_BYTES as exc:
            if not is_bad_bytes(exc):
                raise
            raise DamagedRange(f"{self.name}: compressed data at offset {descriptor[0]} is damaged: "
                               f"{describe(exc)}") from None

    def _map(self, offset: int, length: int) -> Iterator[Piece]:
        """The pieces of [offset, offset+length) (inside the disk), in order.
        This default walks the decoded tables."""
        end = offset + length
        pos = offset
        span = self.span
        while pos < end:
            index, within = divmod(pos, span)
            base = pos - within
            starts, extents = self._table(index)
            i = bisect_right(starts, within) - 1
            while pos < end and i < len(extents):
                start, ext_length, kind, host = extents[i]
                skip = pos - base - start
                n = min(ext_length - skip, end - pos)
                if kind == DATA:
                    yield Piece(pos, n, kind, host + skip)
                elif kind == COMPRESSED:
                    yield Piece(pos, n, kind, (host, skip))
                else:
                    yield Piece(pos, n, kind, host)
                pos += n
                i += 1
            if pos < end and pos < base + span:
                raise DamagedRange(f"{self.name}: table {index} does not cover offset {pos}")

    def _inflate(self, descriptor: Any, raw: bytes) -> bytes:
        """One compressed unit, from the `descriptor[1]` bytes at `descriptor[0]`."""
        raise NotImplementedError

    # -- resolving requests ---------------------------------------------------

    def _clamp(self, offset: int, length: int) -> int:
        if offset < 0:
            raise ValueError(f"{self.name}: negative offset {offset}")
        return max(0, min(length, self.size - offset))

    def pieces(self, offset: int, length: int) -> Iterator[Piece]:
        """The request as maximal pieces: neighbours of one kind are merged,
        data only when it continues in the same file."""
        return self._merged(offset, self._clamp(offset, length))

    def _merged(self, offset: int, length: int) -> Iterator[Piece]:
        pend: Piece | None = None
        for p in self._map(offset, length):
            if p.length <= 0:
                continue
            if (pend is not None and p.kind == pend.kind and p.kind in MERGEABLE
                    and pend.offset + pend.length == p.offset
                    and (p.kind != DATA or (p.source is pend.source
                                            and pend.where + pend.length == p.where))):
                pend = Piece(pend.offset, pend.length + p.length, p.kind, pend.where, pend.source)
                continue
            if pend is not None:
                yield pend
            pend = p
        if pend is not None:
            yield pend

    # -- truncation -----------------------------------------------------------

    TRUNCATION_WINDOW = 1 << 30      # virtual bytes mapped per step while checking
    TRUNCATION_MAX_PIECES = 500_000   # bounds on the walk's work for absurd maps (a fuzzer's
    TRUNCATION_MAX_STEPS = 16_384     # find); real disks of up to 16 TiB stay well inside

    def truncation(self) -> "Truncation | None":
        """What an interrupted download cut off: every table, data cluster or
        grain that points past the end of its file. Walks the whole map once
        (tables are read and cached; no data is read). None when all is there."""
        missing = lost = 0
        needed = 0
        have = self.data_source.size if self.data_source is not None else 0
        base_step = self.span if self.span else self.TRUNCATION_WINDOW
        step, pieces, pos = base_step, 0, 0
        steps = 0
        while pos < self.size and pieces < self.TRUNCATION_MAX_PIECES and steps < self.TRUNCATION_MAX_STEPS:
            steps += 1
            n = min(step, self.size - pos)
            stored = False
            try:
                for p in self._map(pos, n):
                    pieces += 1
                    stored = stored or p.kind in (DATA, COMPRESSED)
                    if p.kind == DAMAGED:
                        if "past the end" in str(p.where) or "file ends before" in str(p.where):
                            lost += p.length
                            missing += 1
                        continue
                    start, end, held_by = _host_range(p)
                    if start is None:
                        continue
                    size = (held_by or p.source or self.data_source).size
                    if start >= size:   # stored wholly past the end
                        needed = max(needed, end or start + 1)
                        lost += p.length
                    elif end is not None and end > size and p.kind == DATA:   # a run cut in its middle
                        needed = max(needed, end)
                        lost += end - size
            except DamagedRange as exc:   # a table itself lies past the end
                if "past the end" not in str(exc) and "truncated" not in str(exc):
                    raise
                lost += n
                missing += 1
            pos += n
            # Long stretches with nothing stored (a huge sparse disk, or one whose tables
            # are all missing) are crossed in growing steps: the walk costs what is
            # allocated, not the virtual size.
            step = base_step if stored else min(step * 2, 1 << 40)
        if not lost:
            return None
        return Truncation(file_size=have, needed=max(needed, have), lost_virtual=lost, missing_tables=missing)

    # -- the byte-source interface --------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        length = self._clamp(offset, length)
        if length == 0:
            return b""
        pieces = list(self._merged(offset, length))
        if len(pieces) == 1 and pieces[0].kind == DATA:   # most small reads: one stored run
            return self._read_data(pieces[0])
        units = list(dict.fromkeys(p.where[0] for p in pieces if p.kind == COMPRESSED))
        inflated = self._inflate_units(units) if units else {}
        parts = []
        for p in pieces:
            kind = p.kind
            if kind == DATA:
                parts.append(self._read_data(p))
            elif kind == ZERO:
                parts.append(bytes(p.length))
            elif kind == BACKING:
                parts.append(self._read_backing(p.offset, p.length))
            elif kind == COMPRESSED:
                unit, skip = p.where
                parts.append(inflated[unit][skip:skip + p.length])
            else:
                raise DamagedRange(f"{self.name}: virtual bytes {p.offset}-{p.offset + p.length}: {p.where}")
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _read_data(self, p: Piece) -> bytes:
        src = self.data_source if p.source is None else p.source
        data = src.read(p.where, p.length)
        if len(data) < p.length:
            # A cut file: only a last sector some writers leave unpadded reads as zeros (as
            # qemu does); a bigger gap is missing data, never silently zero-filled.
            if not data or p.length - len(data) >= SHORT_TAIL:
                raise DamagedRange(
                    f"{self.name}: virtual bytes {p.offset}-{p.offset + p.length} are stored at "
                    f"{src.name} offset {p.where}, past the end of that file ({src.size} bytes): "
                    "file truncated?")
            data += bytes(p.length - len(data))  # like qemu: a cut last cluster reads as zeros
        return data

    def _read_backing(self, pos: int, n: int) -> bytes:
        if self.backing is None:
            return bytes(n)
        data = self.backing.read(pos, n)
        if len(data) < n:  # the parent may be smaller than the child
            data += bytes(n - len(data))
        return data

    def _inflate_units(self, units: list) -> dict[Any, bytes]:
        """The inflated bytes of each compressed unit a read touches."""
        out: dict[Any, bytes] = {}
        if len(units) > 1:
            missing = [u for u in units if u not in self._clusters]
            if missing:
                out = self._inflate_many(missing)
        for u in units:
            if u not in out:
                out[u] = self._clusters.get(u, lambda: self._inflate_checked(u, self.source.read(u[0], u[1])))
        return out

    def _inflate_many(self, descriptors: list) -> dict[Any, bytes]:
        """Inflate many compressed units at once: neighbours in the file are
        fetched with one read, and zlib/zstd run on several threads (they
        release the GIL), as qemu-img does."""
        descriptors.sort()
        raw: dict[Any, bytes] = {}
        i = 0
        while i < len(descriptors):
            start = descriptors[i][0]
            end, j = start + descriptors[i][1], i + 1
            while (j < len(descriptors) and descriptors[j][0] <= end + 4096
                   and descriptors[j][0] + descriptors[j][1] - start <= MAX_BATCH_READ):
                end = max(end, descriptors[j][0] + descriptors[j][1])
                j += 1
            blob = self.source.read(start, end - start)
            for d in descriptors[i:j]:
                raw[d] = blob[d[0] - start:d[0] - start + d[1]]
            i = j
        # Tasks of a few units: fewer futures, yet no long straggler.
        step = max(1, min(8, len(descriptors) // (2 * _workers())))
        batches = [descriptors[i:i + step] for i in range(0, len(descriptors), step)]
        out: dict[Any, bytes] = {}
        for batch, results in zip(batches, _pool().map(
                lambda batch: [self._inflate_checked(d, raw[d]) for d in batch], batches)):
            out.update(zip(batch, results))
        for d in descriptors[-self._clusters.capacity:]:
            self._clusters.put(d, out[d])
        return out

    def runs(self, offset: int, length: int) -> Iterator[Run]:
        pend: list | None = None
        for p in self.pieces(offset, length):
            for r in self._piece_runs(p):
                if pend is not None and pend[2] == r[2] and pend[0] + pend[1] == r[0]:
                    pend[1] += r[1]
                else:
                    if pend is not None:
                        yield Run(*pend)
                    pend = list(r)
        if pend is not None:
            yield Run(*pend)

    def _piece_runs(self, p: Piece) -> Iterator[tuple[int, int, str]]:
        if p.kind == ZERO or (p.kind == BACKING and self.backing is None):
            yield p.offset, p.length, "zero"
        elif p.kind == BACKING:
            inside = max(0, min(p.length, self.backing.size - p.offset))
            if inside:
                for r in source_runs(self.backing, p.offset, inside):
                    yield r.offset, r.length, r.kind
            if inside < p.length:   # child bigger than parent: the rest reads as zeros
                yield p.offset + inside, p.length - inside, "zero"
        else:   # damaged ranges count as data: reading them reports the damage
            yield p.offset, p.length, "data"

    def file_extents(self, offset: int, length: int) -> list[tuple[int, int, int, int]] | None:
        """(offset, length, fd, host offset) pieces when every byte of the range
        is stored verbatim in local files, so `convert` can copy it inside
        the kernel; None when any part needs us (zeros, parents, inflating)."""
        out = []
        for p in self.pieces(offset, length):
            if p.kind != DATA:
                return None
            src = self.data_source if p.source is None else p.source
            fileno = getattr(src, "fileno", None)
            if fileno is None or p.where + p.length > src.size:
                return None
            out.append((p.offset, p.length, fileno(), p.where))
        return out

    def backing_chain(self) -> list[str]:
        """Names of the parent images, nearest first (DiskInfo.backing_chain)."""
        if self.backing is None:
            return []
        info = getattr(self.backing, "info", None)
        return [self.backing.name] + list(info.backing_chain if info else [])

    def close(self) -> None:
        """Drop the caches, close the parent, then the files this image read."""
        for cache in (self._tables, self._clusters):
            if cache is not None:
                cache.clear()
        self.close_opened()
        if self.source is not None:
            self.source.close()

    def close_opened(self) -> None:
        """Close what this image opened itself (its parent, extent or data
        files), not `source`: what a failed __init__ undoes."""
        if self.backing is not None:
            self.backing.close()
            self.backing = None
        for src in self.extra_sources:
            src.close()
        self.extra_sources = []


def read_exact_table(source: ByteSource, offset: int, length: int, what: str) -> bytes:
    """Read a metadata table, raising DamagedRange if the file ends inside it."""
    data = source.read(offset, length)
    if len(data) != length:
        raise DamagedRange(f"{source.name}: {what} at offset {offset} (+{length} bytes) "
                           f"is past the end of the file ({source.size} bytes)")
    return data


def read_u32le_table(source: ByteSource, offset: int, count: int, what: str) -> array:
    """A table of `count` little-endian 32-bit entries (BAT, block map, catalog)."""
    entries = array("I", read_exact_table(source, offset, count * 4, what))
    if sys.byteorder == "big":
        entries.byteswap()
    return entries
