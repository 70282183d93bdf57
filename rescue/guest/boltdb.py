"""A read-only reader of BoltDB files (bbolt), enough for Podman's bolt_state.db.

Reference: go.etcd.io/bbolt `page.go` (page header and leaf/branch elements),
`db.go` (meta pages 0 and 1, the newer valid one wins), `bucket.go` (a bucket
value is its root page id and sequence; root 0 = an inline page follows).
All integers little-endian (bbolt writes host order; every platform Podman
runs on is little-endian).

Podman (libpod `boltdb_state.go`) keeps bucket "ctr" -> <container id> ->
{"config": JSON, "state": JSON, ...}. We only walk; nothing is written.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from construct import Const, Int16ul, Int32ul, Int64ul, Struct

META = Struct(
    "magic" / Const(0xED0CDAED, Int32ul),
    "version" / Int32ul,
    "page_size" / Int32ul,
    "flags" / Int32ul,
    "root" / Int64ul,            # the root bucket: its root page id ...
    "sequence" / Int64ul,        # ... and sequence
    "freelist" / Int64ul,
    "pgid" / Int64ul,            # high water mark: pages beyond are not in use
    "txid" / Int64ul,
    "checksum" / Int64ul,        # FNV-1a 64 of the bytes above
)
PAGE_HEADER = Struct("id" / Int64ul, "flags" / Int16ul, "count" / Int16ul, "overflow" / Int32ul)
LEAF_ELEMENT = struct.Struct("<IIII")     # flags, pos, ksize, vsize (pos counts from the element)
BRANCH_ELEMENT = struct.Struct("<IIQ")    # pos, ksize, pgid
HEADER_SIZE = 16
BRANCH, LEAF, META_PAGE = 0x01, 0x02, 0x04
BUCKET_LEAF = 0x01
MAX_DEPTH = 64


class BoltError(ValueError):
    """The file is not a BoltDB database or is damaged."""


def _fnv64a(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


@dataclass
class Bucket:
    db: "BoltDB"
    root: int                   # page id; 0 = inline
    inline: bytes | None = None

    def items(self) -> list[tuple[bytes, bytes, bool]]:
        """(key, value, is_bucket) in key order."""
        out: list[tuple[bytes, bytes, bool]] = []
        if self.inline is not None:
            self.db._walk_page(self.inline, 0, out, 0)
        else:
            self.db._walk(self.root, out, 0)
        return out

    def get(self, key: bytes) -> bytes | None:
        return next((v for k, v, is_b in self.items() if k == key and not is_b), None)

    def bucket(self, key: bytes) -> "Bucket | None":
        value = next((v for k, v, is_b in self.items() if k == key and is_b), None)
        return None if value is None else self.db._bucket(value)

    def buckets(self) -> list[tuple[bytes, "Bucket"]]:
        return [(k, self.db._bucket(v)) for k, v, is_b in self.items() if is_b]


class BoltDB:
    def __init__(self, data: bytes) -> None:
        self.data = data
        metas = []
        for offset in (0, None):
            if offset is None:   # the second meta page sits one page further
                if not metas:
                    break
                offset = metas[0].page_size
            try:
                m = META.parse(data[offset + HEADER_SIZE:offset + HEADER_SIZE + META.sizeof()])
            except Exception:
                continue
            raw = data[offset + HEADER_SIZE:offset + HEADER_SIZE + META.sizeof() - 8]
            if _fnv64a(raw) == m.checksum:
                metas.append(m)
        if not metas:
            raise BoltError("no valid meta page (not a BoltDB file, or both meta pages damaged)")
        self.meta = max(metas, key=lambda m: m.txid)
        self.page_size = self.meta.page_size
        if self.page_size < 512 or self.page_size > (1 << 20):
            raise BoltError(f"page size {self.page_size} is not plausible")

    def root(self) -> Bucket:
        return Bucket(self, self.meta.root)

    def _bucket(self, value: bytes) -> Bucket:
        if len(value) < 16:
            raise BoltError("bucket value shorter than its header")
        root = struct.unpack_from("<Q", value, 0)[0]
        return Bucket(self, root, value[16:] if root == 0 else None)

    def _page(self, pgid: int) -> bytes:
        if pgid >= self.meta.pgid:
            raise BoltError(f"page {pgid} is beyond the database's high water mark {self.meta.pgid}")
        start = pgid * self.page_size
        head = PAGE_HEADER.parse(self.data[start:start + HEADER_SIZE])
        end = start + (head.overflow + 1) * self.page_size
        if end > len(self.data):
            raise BoltError(f"page {pgid} runs past the end of the file")
        return self.data[start:end]

    def _walk(self, pgid: int, out: list, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise BoltError("tree deeper than any real database (a page loop?)")
        self._walk_page(self._page(pgid), 0, out, depth)

    def _walk_page(self, page: bytes, base: int, out: list, depth: int) -> None:
        head = PAGE_HEADER.parse(page[base:base + HEADER_SIZE])
        elems = base + HEADER_SIZE
        if head.flags & LEAF:
            for i in range(head.count):
                at = elems + i * LEAF_ELEMENT.size
                flags, pos, ksize, vsize = LEAF_ELEMENT.unpack_from(page, at)
                k0 = at + pos
                if k0 + ksize + vsize > len(page):
                    raise BoltError("leaf element points past its page")
                out.append((page[k0:k0 + ksize], page[k0 + ksize:k0 + ksize + vsize], bool(flags & BUCKET_LEAF)))
        elif head.flags & BRANCH:
            for i in range(head.count):
                at = elems + i * BRANCH_ELEMENT.size
                _pos, _ksize, child = BRANCH_ELEMENT.unpack_from(page, at)
                self._walk(child, out, depth + 1)
        else:
            raise BoltError(f"page of kind {head.flags:#x} where a tree page was expected")


