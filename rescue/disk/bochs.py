"""Bochs growing (redolog) disk images.

References: qemu block/bochs.c and block/bochs.h (header v1 and v2, catalog,
per-extent sector bitmaps); Bochs iodev/hdimage/hdimage.h (redolog_header_t).

Layout (little-endian): a 512-byte header ("Bochs Virtual HD Image",
type "Redolog", subtype "Growing"), the catalog right after it (one u32 per
extent, 0xFFFFFFFF = not allocated), then allocated extents, each a sector
bitmap (`bitmap` bytes, rounded up to sectors) followed by the extent's
sectors. A sector reads as stored only when its bitmap bit (LSB first) is
set, otherwise as zeros, like qemu.
"""

from __future__ import annotations

from functools import partial

from construct import Bytes, Int32ul, Struct

from ..errors import UnsupportedFeature
from ..source.base import ByteSource
from .base import DiskInfo, DiskOptions, header_error, parse_header
from .choices import no_choices
from .bitmaps import bitmap_runs
from .mapping import DATA, ZERO, ExtentBuilder, MappedDisk, read_u32le_table

MAGIC = b"Bochs Virtual HD Image"
VERSION_1 = 0x00010000
VERSION_2 = 0x00020000

Header = Struct(
    "magic" / Bytes(32),
    "type" / Bytes(16),          # "Redolog"
    "subtype" / Bytes(16),       # "Growing" ("Undoable"/"Volatile" need a base image)
    "version" / Int32ul,
    "header" / Int32ul,          # header size: the catalog starts here
    "catalog" / Int32ul,         # catalog entries
    "bitmap" / Int32ul,          # bitmap bytes per extent
    "extent" / Int32ul,          # data bytes per extent
    "extra" / Bytes(12),         # v2: reserved u32 + disk size u64; v1: disk size u64
)

UNALLOCATED = 0xFFFFFFFF
SECTOR = 512
MAX_CATALOG = 1 << 26
MAX_EXTENT = 1 << 30
TABLE_ENTRIES = 1024


def _cstr(b: bytes) -> bytes:
    return b.split(b"\0", 1)[0]


def detect(source: ByteSource) -> bool:
    head = source.read(0, 48)
    return _cstr(head[:32]) == MAGIC and _cstr(head[32:48]) == b"Redolog"


def open(source: ByteSource, options: DiskOptions) -> "BochsDisk":  # noqa: A001 (reader interface)
    return no_choices(BochsDisk(source), options, "Bochs")


_bad = partial(header_error, what="Bochs header")


class BochsDisk(MappedDisk):
    def __init__(self, source: ByteSource) -> None:
        super().__init__(source)
        h = parse_header(source, Header, "Bochs header")
        subtype = _cstr(h.subtype).decode("ascii", "replace")
        if subtype != "Growing":
            raise UnsupportedFeature(f"Bochs redolog subtype {subtype!r}: only 'Growing' images are "
                                     "read (undoable/volatile logs need their base image)",
                                     file=source.name)
        if h.version == VERSION_2:
            disk = int.from_bytes(h.extra[4:12], "little")
        elif h.version == VERSION_1:
            disk = int.from_bytes(h.extra[0:8], "little")
        else:
            raise UnsupportedFeature(f"Bochs header version 0x{h.version:08x}", file=source.name)
        if not SECTOR <= h.extent <= MAX_EXTENT or h.extent % SECTOR:
            raise _bad(source, "extent", h.extent, "must be a multiple of 512, up to 1 GiB")
        if h.bitmap == 0 or h.bitmap > MAX_EXTENT:
            raise _bad(source, "bitmap", h.bitmap, "absurd")
        if h.catalog > MAX_CATALOG:
            raise _bad(source, "catalog", h.catalog, f"more than {MAX_CATALOG} entries")
        if h.header < SECTOR or h.header + h.catalog * 4 > source.size:
            raise _bad(source, "catalog", h.catalog, f"the catalog at {h.header} runs past the end "
                       f"of the file ({source.size} bytes)")
        size = disk - disk % SECTOR
        if -(-size // h.extent) > h.catalog:
            raise _bad(source, "catalog", h.catalog, f"too small for a {size}-byte disk of "
                       f"{h.extent}-byte extents")
        if h.bitmap * 8 < h.extent // SECTOR:
            raise _bad(source, "bitmap", h.bitmap, f"too small for {h.extent // SECTOR} sectors")
        self.header = h
        self.extent = h.extent
        self.bitmap_bytes = -(-h.bitmap // SECTOR) * SECTOR
        self.stride = self.bitmap_bytes + -(-h.extent // SECTOR) * SECTOR
        self.data_offset = h.header + h.catalog * 4
        self.size = size
        self.span = TABLE_ENTRIES * h.extent
        self._init_table_cache(TABLE_ENTRIES)
        self.info = DiskInfo(format="bochs", subformat="growing", virtual_size=size,
                             allocated_size=source.size, cluster_size=h.extent,
                             details={"version": "2" if h.version == VERSION_2 else "1",
                                      "catalog_entries": h.catalog})

    def _decode_table(self, index: int):
        h, ext = self.header, self.extent
        first = index * TABLE_ENTRIES
        count = max(0, min(TABLE_ENTRIES, h.catalog - first))
        entries = read_u32le_table(self.source, h.header + first * 4, count, "Bochs catalog")
        nbits = ext // SECTOR
        b = ExtentBuilder()
        for i, e in enumerate(entries):
            if e == UNALLOCATED:
                b.add(i * ext, ext, ZERO)
                continue
            base = self.data_offset + e * self.stride
            bitmap = self.source.read(base, (nbits + 7) // 8)
            # A sector whose bit is clear was never written: zeros, like qemu.
            for bit, n, one in bitmap_runs(bitmap, nbits, lsb_first=True):
                if one:
                    b.add(i * ext + bit * SECTOR, n * SECTOR, DATA,
                          base + self.bitmap_bytes + bit * SECTOR)
                else:
                    b.add(i * ext + bit * SECTOR, n * SECTOR, ZERO)
        if count < TABLE_ENTRIES:
            b.add(count * ext, (TABLE_ENTRIES - count) * ext, ZERO)
        return b.done()

