"""The read path shared by table-mapped containers (qcow2, QCOW v1, VDI).

These formats map the virtual disk through fixed-size tables: a qcow2 L2 table,
a slice of a VDI block map. A reader decodes one table once into `Extent`s
(maximal ranges of one kind), the decoded tables are cached, and this module
turns any (offset, length) request into *pieces*: host-contiguous data is
merged across clusters and tables so that each piece is served by one read.
"""

from __future__ import annotations

import contextvars
import os
import sys
from array import array
from bisect import bisect_right
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, NamedTuple, TypeVar

from ..errors import DamagedRange, DiskFormatError
from ..source.base import ByteSource, Run, runs as source_runs
from .base import DiskImage

# Extent kinds.
DATA = "data"              # stored at `host` in the data file, contiguous
ZERO = "zero"              # reads as zeros (zero cluster, unallocated w/o parent)
BACKING = "backing"        # not stored here: the backing file's bytes (or zeros)
COMPRESSED = "compressed"  # one compressed cluster; `host` is its descriptor
DAMAGED = "damaged"        # the table entry is invalid: reads raise DamagedRange


T = TypeVar("T")
MAX_BATCH_READ = 16 << 20   # compressed bytes fetched by one read
_POOL: list[ThreadPoolExecutor] = []


def _workers() -> int:
    return max(2, min(8, os.cpu_count() or 2))


def _pool() -> ThreadPoolExecutor:
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(max_workers=_workers(), thread_name_prefix="rescue-inflate"))
    return _POOL[0]


class Extent(NamedTuple):
    start: int       # byte offset inside the table's span
    length: int
    kind: str
    host: Any = 0    # DATA: host offset of `start`; COMPRESSED: (offset, size); DAMAGED: reason


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


class LRU:
    """A small bounded cache (metadata tables, decompressed clusters)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._items: OrderedDict[Any, Any] = OrderedDict()

    def get(self, key: Any, load: Callable[[], Any]) -> Any:
        try:
            self._items.move_to_end(key)
            return self._items[key]
        except KeyError:
            pass
        value = load()
        self._items[key] = value
        if len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return value

    def has(self, key: Any) -> bool:
        return key in self._items

    def put(self, key: Any, value: Any) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        if len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()


class MappedDisk(DiskImage):
    """Base for readers whose tables each cover `span` bytes of the disk.

    Subclasses set name, size, info, span, backing and implement
    `_decode_table(index) -> (starts, extents)` (extents covering [0, span)),
    (optionally) `_read_host(offset, length)`, which reads `data_source`, and,
    for compressed clusters (descriptor =
    (offset, size) in `source`), `_inflate(descriptor, raw) -> cluster`.
    """

    span: int
    data_source: ByteSource            # where DATA extents' host offsets point
    backing: Any = None                # a DiskImage / byte source, or None
    table_cache_entries = 1 << 18      # decoded table entries kept (memory bound)
    cluster_cache_size = 32            # decompressed clusters kept

    def _init_caches(self, entries_per_table: int) -> None:
        self._tables = LRU(max(4, self.table_cache_entries // max(1, entries_per_table)))
        self._clusters = LRU(self.cluster_cache_size)

    def _decode_table(self, index: int) -> tuple[list[int], list[Extent]]:
        raise NotImplementedError

    def _read_host(self, offset: int, length: int) -> bytes:
        return self.data_source.read(offset, length)

    # -- resolving requests -------------------------------------------------

    def _table(self, index: int) -> tuple[list[int], list[Extent]]:
        return self._tables.get(index, lambda: self._decode_table(index))

    def pieces(self, offset: int, length: int) -> Iterator[tuple[int, int, str, Any]]:
        """(offset, length, kind, where) covering the request, merged maximally:
        `where` is the host offset for DATA, (descriptor, offset in cluster)
        for COMPRESSED, the reason for DAMAGED."""
        end = min(offset + length, self.size)
        pos = max(offset, 0)
        pend: list | None = None
        span = self.span
        while pos < end:
            index, within = divmod(pos, span)
            base = pos - within
            starts, extents = self._table(index)
            i = bisect_right(starts, within) - 1
            while pos < end and i < len(extents):
                ext = extents[i]
                skip = pos - base - ext.start
                n = min(ext.length - skip, end - pos)
                kind = ext.kind
                if kind == DATA:
                    where: Any = ext.host + skip
                elif kind == COMPRESSED:
                    where = (ext.host, skip)
                else:
                    where = ext.host
                if pend is not None and pend[2] == kind and (
                        (kind in (ZERO, BACKING))
                        or (kind == DATA and pend[3] + pend[1] == where)):
                    pend[1] += n
                else:
                    if pend is not None:
                        yield tuple(pend)  # type: ignore[misc]
                    pend = [pos, n, kind, where]
                pos += n
                i += 1
            if i >= len(extents) and pos < end and pos < base + span:
                raise DamagedRange(f"{self.name}: table {index} does not cover offset {pos}")
        if pend is not None:
            yield tuple(pend)  # type: ignore[misc]

    # -- the byte-source interface -----------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        if offset >= self.size or length <= 0:
            return b""
        pieces = list(self.pieces(offset, length))
        inflated: dict[Any, bytes] = {}
        wanted = {p[3][0] for p in pieces if p[2] == COMPRESSED}
        if len(wanted) > 1:
            inflated = self._inflate_many([d for d in wanted if not self._clusters.has(d)])
        parts = []
        for pos, n, kind, where in pieces:
            if kind == DATA:
                parts.append(self._read_data(where, n))
            elif kind == ZERO:
                parts.append(bytes(n))
            elif kind == BACKING:
                parts.append(self._read_backing(pos, n))
            elif kind == COMPRESSED:
                descriptor, skip = where
                cluster = inflated.get(descriptor)
                if cluster is None:
                    cluster = self._clusters.get(descriptor, lambda: self._read_compressed(descriptor))
                parts.append(cluster[skip:skip + n])
            else:
                raise DamagedRange(f"{self.name}: bytes {pos}..{pos + n}: {where}")
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _read_compressed(self, descriptor: Any) -> bytes:
        offset, size = descriptor
        return self._inflate(descriptor, self.source.read(offset, size))

    def _inflate(self, descriptor: Any, raw: bytes) -> bytes:
        raise NotImplementedError

    def _inflate_many(self, descriptors: list) -> dict[Any, bytes]:
        """Inflate many compressed clusters at once: neighbours in the file are
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
        # Tasks of a few clusters: fewer futures, yet no long straggler.
        step = max(1, min(8, len(descriptors) // (2 * _workers())))
        batches = [descriptors[i:i + step] for i in range(0, len(descriptors), step)]
        out: dict[Any, bytes] = {}
        for batch, results in zip(batches, _pool().map(
                lambda batch: [self._inflate(d, raw[d]) for d in batch], batches)):
            out.update(zip(batch, results))
        for d in descriptors[-self._clusters.capacity:]:
            self._clusters.put(d, out[d])
        return out

    def _read_data(self, host: int, n: int) -> bytes:
        data = self._read_host(host, n)
        if len(data) < n:
            if not data:
                raise DamagedRange(f"{self.name}: data at host offset {host} is past the end of the file")
            data += bytes(n - len(data))  # like qemu: a short last cluster reads as zeros
        return data

    def _read_backing(self, pos: int, n: int) -> bytes:
        if self.backing is None:
            return bytes(n)
        data = self.backing.read(pos, n)
        if len(data) < n:  # the parent may be smaller than the child
            data += bytes(n - len(data))
        return data

    def runs(self, offset: int, length: int) -> Iterator[Run]:
        pend: list | None = None
        for pos, n, kind, _ in self.pieces(offset, length):
            for r in self._piece_runs(pos, n, kind):
                if pend is not None and pend[2] == r[2] and pend[0] + pend[1] == r[0]:
                    pend[1] += r[1]
                else:
                    if pend is not None:
                        yield Run(*pend)
                    pend = list(r)
        if pend is not None:
            yield Run(*pend)

    def _piece_runs(self, pos: int, n: int, kind: str) -> Iterator[tuple[int, int, str]]:
        if kind == ZERO or (kind == BACKING and self.backing is None):
            yield pos, n, "zero"
        elif kind == BACKING:
            inside = max(0, min(n, self.backing.size - pos))
            if inside:
                for r in source_runs(self.backing, pos, inside):
                    yield r.offset, r.length, r.kind
            if inside < n:
                yield pos + inside, n - inside, "zero"
        else:
            yield pos, n, "data"

    def file_extents(self, offset: int, length: int) -> list[tuple[int, int, int, int]] | None:
        """(offset, length, fd, host offset) pieces when every byte of the range
        is stored verbatim in a local file, so `convert` can copy it inside
        the kernel; None when any part needs us (zeros, parents, inflating)."""
        fileno = getattr(self.data_source, "fileno", None)
        if fileno is None:
            return None
        out = []
        for pos, n, kind, where in self.pieces(offset, length):
            if kind != DATA or where + n > self.data_source.size:
                return None
            out.append((pos, n, fileno(), where))
        return out

    def close(self) -> None:
        """Drop the caches, close the parent, then the files this image read."""
        for cache in (getattr(self, "_tables", None), getattr(self, "_clusters", None)):
            if cache is not None:   # None when __init__ failed before _init_caches
                cache.clear()
        if self.backing is not None:
            self.backing.close()
            self.backing = None
        source = getattr(self, "source", None)
        data_source = getattr(self, "data_source", source)
        if data_source is not None and data_source is not source:
            data_source.close()
        if source is not None:
            source.close()


# Images being opened in the current backing chain, (identity, name), top
# first: a parent opened while its child is being opened sees the chain.
_CHAIN: contextvars.ContextVar[tuple] = contextvars.ContextVar("rescue_disk_chain", default=())


def open_in_chain(source: ByteSource, options: Any, make: Callable[[], T]) -> T:
    """Run `make()` (which may open parents) with loop and length checks."""
    identity = getattr(source, "identity", None) or source.name
    chain = _CHAIN.get()
    if any(ident == identity for ident, _ in chain):
        names = " -> ".join([n for _, n in chain] + [source.name])
        raise DiskFormatError(f"backing chain loops: {names}", file=chain[0][1],
                              hint="one of the backing files names an image above it")
    if len(chain) >= options.max_chain:
        raise DiskFormatError(f"backing chain longer than {options.max_chain} images",
                              file=chain[0][1] if chain else source.name)
    token = _CHAIN.set(chain + ((identity, source.name),))
    try:
        return make()
    finally:
        _CHAIN.reset(token)


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
