"""cloop compressed loop images (Knoppix-style), format V2.0.

References: qemu block/cloop.c (header at 128, offsets table, checks on block
size and offsets); the Linux cloop driver's cloop.h.

Layout (big-endian): a 128-byte shell-script preamble ("#!/bin/sh" then
"#V2.0 Format"), block_size u32, n_blocks u32, then n_blocks+1 u64 file
offsets; block i is the zlib stream between offsets[i] and offsets[i+1] and
inflates to exactly block_size bytes. The offsets table is kept in memory:
8 bytes per block.
"""

from __future__ import annotations

import sys
import zlib
from array import array
from functools import partial
from typing import Any

from construct import Bytes, Int32ub, Struct

from ..errors import DamagedRange, UnsupportedFeature
from ..source.base import ByteSource
from .base import DiskInfo, DiskOptions, header_error, parse_header
from .choices import no_choices
from .mapping import COMPRESSED, ExtentBuilder, MappedDisk, ZERO, read_exact_table

PREAMBLE = b"#!/bin/sh\n"
V2 = b"#V2.0 Format\n"

Header = Struct(
    "preamble" / Bytes(128),
    "block_size" / Int32ub,
    "n_blocks" / Int32ub,
)

MAX_BLOCK_SIZE = 64 << 20
MAX_BLOCKS = 1 << 24          # 128 MiB of offsets table at most
TABLE_ENTRIES = 4096


def detect(source: ByteSource) -> bool:
    head = source.read(0, 32)
    return head.startswith(PREAMBLE + b"#V") and b"Format" in head


def open(source: ByteSource, options: DiskOptions) -> "CloopDisk":  # noqa: A001 (reader interface)
    return no_choices(CloopDisk(source), options, "cloop")


_bad = partial(header_error, what="cloop header")


class CloopDisk(MappedDisk):
    def __init__(self, source: ByteSource) -> None:
        super().__init__(source)
        head = source.read(0, 128)
        if not head.startswith(PREAMBLE + V2):
            version = head[len(PREAMBLE):].split(b"\n", 1)[0].decode("ascii", "replace")
            raise UnsupportedFeature(f"cloop {version!r}: only the V2.0 format is read",
                                     file=source.name)
        h = parse_header(source, Header, "cloop header")
        bs = h.block_size
        if bs == 0 or bs % 512 or bs > MAX_BLOCK_SIZE:
            raise _bad(source, "block_size", bs, "must be a non-zero multiple of 512, up to 64 MiB")
        if h.n_blocks > MAX_BLOCKS:
            raise _bad(source, "n_blocks", h.n_blocks, f"more than {MAX_BLOCKS}")
        raw = read_exact_table(source, Header.sizeof(), (h.n_blocks + 1) * 8, "cloop offsets table")
        offsets = array("Q", raw)
        if sys.byteorder == "little":
            offsets.byteswap()
        for i in range(1, len(offsets)):   # metadata, checked once at open
            size = offsets[i] - offsets[i - 1]
            if size < 0 or offsets[i] < offsets[i - 1]:
                raise _bad(source, f"offsets[{i}]", offsets[i], "offsets are not increasing")
            if size > 2 * MAX_BLOCK_SIZE:
                raise _bad(source, f"offsets[{i}]", offsets[i], f"block {i - 1} is {size} bytes compressed")
        self.offsets = offsets
        self.block_size = bs
        self.n_blocks = h.n_blocks
        self.size = h.n_blocks * bs
        self.span = TABLE_ENTRIES * bs
        self._init_table_cache(TABLE_ENTRIES)
        self.info = DiskInfo(format="cloop", subformat="V2.0", virtual_size=self.size,
                             allocated_size=source.size, cluster_size=bs, compression="zlib",
                             details={"blocks": h.n_blocks})

    def _decode_table(self, index: int):
        bs, off = self.block_size, self.offsets
        first = index * TABLE_ENTRIES
        count = max(0, min(TABLE_ENTRIES, self.n_blocks - first))
        b = ExtentBuilder()
        for i in range(count):
            k = first + i
            b.add(i * bs, bs, COMPRESSED, (off[k], off[k + 1] - off[k]))
        if count < TABLE_ENTRIES:
            b.add(count * bs, (TABLE_ENTRIES - count) * bs, ZERO)
        return b.done()

    def _inflate(self, descriptor: Any, raw: bytes) -> bytes:
        offset, size = descriptor
        if len(raw) != size:
            raise DamagedRange(f"{self.name}: cloop block at offset {offset} (+{size}) is past the end "
                               f"of the file ({self.source.size} bytes)")
        d = zlib.decompressobj()
        try:
            out = d.decompress(raw, self.block_size)
        except zlib.error as exc:
            raise DamagedRange(f"{self.name}: cloop block at offset {offset} does not inflate ({exc})") from None
        if len(out) != self.block_size or not d.eof:
            raise DamagedRange(f"{self.name}: cloop block at offset {offset} inflates to {len(out)} "
                               f"bytes, not {self.block_size}")
        return out

