"""VHD (Virtual PC, Hyper-V, Azure, Disk2vhd): fixed, dynamic and differencing.

References: Microsoft "Virtual Hard Disk Image Format Specification" v1.0
(2006): hard disk footer, dynamic disk header, BAT, per-block sector bitmaps,
parent locators; qemu block/vpc.c for the virtual-size rule and sanity checks.

Layout: fixed = raw data + 512-byte footer. Dynamic/differencing = footer copy
at 0, dynamic header ('cxsparse'), BAT (big-endian sector numbers, 0xFFFFFFFF =
unallocated), blocks of [sector bitmap, padded to 512][block data], footer at
the end. All fields big-endian.
"""

from __future__ import annotations

import array
import os
import sys
import uuid
from typing import Iterator
from urllib.parse import unquote, urlparse

from construct import Bytes, Int8ub, Int16ub, Int32ub, Int64ub, Struct

from ..errors import DiskFormatError
from ..lru import LRU
from ..source.base import ByteSource
from .base import DiskImage, DiskInfo, DiskOptions
from .bitmaps import bitmap_pieces, bitmap_runs
from .chain import open_in_chain, open_parent
from .mapping import BACKING, DAMAGED, DATA, ZERO, MappedDisk, Piece

# Hard disk footer (spec "Hard Disk Footer Format").
Footer = Struct(
    "cookie" / Bytes(8),             # b"conectix"
    "features" / Int32ub,
    "version" / Int32ub,             # 0x00010000
    "data_offset" / Int64ub,         # dynamic header offset; all-ones for fixed
    "timestamp" / Int32ub,
    "creator_app" / Bytes(4),        # "vpc ", "qemu", "qem2", "win ", "d2v ", ...
    "creator_version" / Int32ub,
    "creator_os" / Bytes(4),
    "original_size" / Int64ub,
    "current_size" / Int64ub,
    "cylinders" / Int16ub,
    "heads" / Int8ub,
    "sectors_per_track" / Int8ub,
    "disk_type" / Int32ub,           # 2 fixed, 3 dynamic, 4 differencing
    "checksum" / Int32ub,
    "uuid" / Bytes(16),
    "saved_state" / Int8ub,
    "reserved" / Bytes(427),
)

ParentLocator = Struct(
    "platform_code" / Bytes(4),      # W2ru, W2ku, Wi2r, Wi2k, Mac , MacX
    "data_space" / Int32ub,
    "data_length" / Int32ub,
    "reserved" / Int32ub,
    "data_offset" / Int64ub,
)

# Dynamic disk header (spec "Dynamic Disk Header Format").
DynamicHeader = Struct(
    "cookie" / Bytes(8),             # b"cxsparse"
    "data_offset" / Int64ub,
    "table_offset" / Int64ub,        # BAT
    "header_version" / Int32ub,
    "max_table_entries" / Int32ub,
    "block_size" / Int32ub,
    "checksum" / Int32ub,
    "parent_uuid" / Bytes(16),
    "parent_timestamp" / Int32ub,
    "reserved1" / Int32ub,
    "parent_name" / Bytes(512),      # UTF-16BE
    "locators" / ParentLocator[8],
    "reserved2" / Bytes(256),
)

COOKIE = b"conectix"
FIXED, DYNAMIC, DIFFERENCING = 2, 3, 4
TYPE_NAMES = {FIXED: "fixed", DYNAMIC: "dynamic", DIFFERENCING: "differencing"}
UNALLOCATED = 0xFFFFFFFF
MAX_GEOMETRY = 65535 * 16 * 255
SECTOR = 512
MAX_BAT = 64 << 20                    # 16M blocks: 32 TiB in 2 MiB blocks, far past the 2 TiB VHD limit
# Creator apps whose size is current_size rather than CHS geometry (qemu's table).
SIZE_FROM_FOOTER = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")


def checksum(buf: bytes, field_at: int) -> int:
    """One's complement of the byte sum, with the checksum field counted as 0."""
    total = sum(buf) - sum(buf[field_at:field_at + 4])
    return (~total) & 0xFFFFFFFF


def _footer_at(source: ByteSource, offset: int, length: int = SECTOR):
    if offset < 0:
        return None
    raw = source.read(offset, length)
    if len(raw) < length or not raw.startswith(COOKIE):
        return None
    raw = raw.ljust(SECTOR, b"\0")
    f = Footer.parse(raw)
    if f.disk_type not in TYPE_NAMES:
        return None
    return f, raw


def find_footer(source: ByteSource):
    """(footer, its bytes, where): the copy at 0 (dynamic, as qemu prefers), else
    the last 512 bytes, else the last 511 (old Virtual PC wrote 511-byte footers)."""
    for offset, length in ((0, SECTOR), (source.size - SECTOR, SECTOR), (source.size - 511, 511)):
        found = _footer_at(source, offset, length)
        if found is not None and (offset != 0 or found[0].disk_type != FIXED):
            return found + (offset,)
    return None


def detect(source: ByteSource) -> bool:
    return source.size >= SECTOR and find_footer(source) is not None


def virtual_size(f) -> int:
    """qemu's rule, so that we agree with `qemu-img convert`: Virtual PC and
    old qemu size a disk by its CHS geometry, Hyper-V, Disk2vhd, XenServer and
    newer qemu ('qem2') by current_size; a maximal CHS geometry means the
    geometry could not express the size, so current_size wins there too."""
    chs = f.cylinders * f.heads * f.sectors_per_track
    if f.creator_app in SIZE_FROM_FOOTER or chs == MAX_GEOMETRY:
        return f.current_size
    return chs * SECTOR


def open(source: ByteSource, options: DiskOptions) -> DiskImage:  # noqa: A001 (reader interface)
    return open_in_chain(source, options, lambda: VhdImage(source, options))


class VhdImage(MappedDisk):
    """The virtual disk of a fixed, dynamic or differencing VHD."""

    def __init__(self, source: ByteSource, options: DiskOptions) -> None:
        super().__init__(source)
        found = find_footer(source)
        if found is None:
            raise DiskFormatError("no VHD footer ('conectix') at the start or end", file=self.name)
        self.footer, raw, footer_at = found
        warnings: list[str] = []
        if checksum(raw, 64) != self.footer.checksum:
            # qemu refuses such images ("Incorrect header checksum"); the data is
            # usually fine (hand-edited footers), so we read on if the
            # structures below check out and say so.
            warnings.append(f"VHD footer checksum {self.footer.checksum:#x} is wrong "
                            f"(computed {checksum(raw, 64):#x}); qemu-img refuses this image, "
                            "rescue reads it because the other structures are sane")
        self.type = self.footer.disk_type
        self.size = virtual_size(self.footer)
        if self.size <= 0 or self.size > 2 ** 50:
            raise DiskFormatError(f"virtual size {self.size} is absurd", file=self.name)
        self.info = DiskInfo(format="vhd", virtual_size=self.size, subformat=TYPE_NAMES[self.type],
                             warnings=warnings,
                             details={"creator": self.footer.creator_app.decode("latin-1").strip("\0 "),
                                      "uuid": str(uuid.UUID(bytes=self.footer.uuid))})
        if self.type == FIXED:
            self.data_end = footer_at        # a fixed disk's data ends where its footer starts
            self.info.allocated_size = self.data_end
            return
        self._open_dynamic(options)

    def _open_dynamic(self, options: DiskOptions) -> None:
        f = self.footer
        raw = self.source.read(f.data_offset, 1024)
        if len(raw) < 40 or not raw.startswith(b"cxsparse"):
            raise DiskFormatError(f"no dynamic disk header ('cxsparse') at offset {f.data_offset}",
                                  file=self.name)
        if len(raw) < 1024:
            self.info.warnings.append("dynamic disk header is cut short by the end of the file")
            raw = raw.ljust(1024, b"\0")
        h = self.header = DynamicHeader.parse(raw)
        if checksum(raw, 36) != h.checksum:
            self.info.warnings.append(f"VHD dynamic header checksum {h.checksum:#x} is wrong "
                                      f"(computed {checksum(raw, 36):#x})")
        bs = h.block_size
        if bs < SECTOR or bs & (bs - 1) or bs > 256 << 20:
            raise DiskFormatError(f"dynamic header block_size {bs} is not a power of two "
                                  "between 512 B and 256 MiB", file=self.name)
        self.block_size = bs
        need = -(-self.size // bs)
        if h.max_table_entries > self.source.size // 4 or h.max_table_entries > 0x3FFFFFFF:
            raise DiskFormatError(f"Max Table Entries {h.max_table_entries:#x} is larger than the "
                                  "file could hold: image damaged", file=self.name)
        if h.max_table_entries < need:
            raise DiskFormatError(f"Max Table Entries {h.max_table_entries} cover fewer than the "
                                  f"{need} blocks of the {self.size}-byte disk", file=self.name)
        if need * 4 > MAX_BAT:
            raise DiskFormatError(f"a {self.size}-byte disk in {bs}-byte blocks needs a "
                                  f"{need * 4}-byte BAT (more than {MAX_BAT}): image damaged",
                                  file=self.name)
        bat = self.source.read(h.table_offset, need * 4)
        # A truncated BAT: missing entries are damaged ranges, not a failure.
        self.bat = array.array("I")
        self.bat.frombytes(bat[:len(bat) // 4 * 4])
        if sys.byteorder == "little":
            self.bat.byteswap()          # the BAT is big-endian
        self.bitmap_size = -(-(bs // SECTOR // 8) // SECTOR) * SECTOR
        self._bitmaps = LRU(256)
        self.info.cluster_size = bs
        self.info.allocated_size = sum(1 for e in self.bat if e != UNALLOCATED) * bs
        if self.type == DIFFERENCING:
            self._open_parent(options)

    # --- parent -------------------------------------------------------------

    def _parent_names(self) -> list[str]:
        names: list[str] = []
        for loc in self.header.locators:
            code = loc.platform_code
            if code not in (b"W2ru", b"W2ku", b"MacX", b"Wi2r", b"Wi2k") or not loc.data_length:
                continue
            if loc.data_length > 64 << 10:
                continue
            data = self.source.read(loc.data_offset, loc.data_length)
            try:
                if code in (b"W2ru", b"W2ku"):
                    text = data.decode("utf-16-le")
                elif code == b"MacX":
                    text = unquote(urlparse(data.decode("utf-8")).path)
                else:
                    text = data.decode("latin-1")
            except UnicodeDecodeError:
                continue
            text = text.rstrip("\0")
            if not text:
                continue
            if code in (b"W2ru", b"Wi2r"):
                text = text.replace("\\", "/")
                names.append(text[2:] if text.startswith("./") else text)
            elif code == b"MacX":
                names += [text, os.path.basename(text)]
            else:  # a Windows absolute path: only its file name can help here
                names.append(text.replace("\\", "/").rsplit("/", 1)[-1])
        pname = self.header.parent_name.decode("utf-16-be", "replace").rstrip("\0")
        if pname:
            names.append(pname.replace("\\", "/").rsplit("/", 1)[-1])
        return list(dict.fromkeys(names))

    def _open_parent(self, options: DiskOptions) -> None:
        names = [options.backing] if options.backing else self._parent_names()
        if not names:
            raise DiskFormatError("differencing VHD has no usable parent locator", file=self.name,
                                  hint="give the parent with --backing PATH")
        self.backing = open_parent(self, names, "parent VHD", options, detect, open)
        if isinstance(self.backing, VhdImage) and self.backing.footer.uuid != self.header.parent_uuid:
            self.info.warnings.append("parent VHD's UUID does not match the one recorded in the "
                                      "differencing disk: it may have changed since")
        self.info.backing_chain = self.backing_chain()

    # --- mapping ------------------------------------------------------------

    def _bitmap(self, block: int, host: int):
        def load():
            raw = self.source.read(host, self.bitmap_size)
            nbits = self.block_size // SECTOR
            if len(raw) < nbits // 8:
                return None
            if raw.count(0xFF) >= nbits // 8:
                return [(0, nbits, 1)]
            return bitmap_runs(raw, nbits, lsb_first=False)
        return self._bitmaps.get(block, load)

    def _map(self, offset: int, length: int) -> Iterator[Piece]:
        if self.type == FIXED:
            data_len = max(0, min(length, self.data_end - offset))
            if data_len:
                yield Piece(offset, data_len, DATA, offset)
            if data_len < length:
                yield Piece(offset + data_len, length - data_len, ZERO)
            return
        bs = self.block_size
        absent = BACKING if self.type == DIFFERENCING else ZERO
        end = offset + length
        pos = offset
        while pos < end:
            block, within = divmod(pos, bs)
            n = min(bs - within, end - pos)
            entry = self.bat[block] if block < len(self.bat) else None
            if entry is None:
                yield Piece(pos, n, DAMAGED, f"BAT entry {block} lies past the end of the file")
            elif entry == UNALLOCATED:
                yield Piece(pos, n, absent)
            else:
                host = entry * SECTOR
                bruns = self._bitmap(block, host)
                data = host + self.bitmap_size
                base = block * bs
                if bruns is None:
                    yield Piece(pos, n, DAMAGED,
                                f"block {block} at offset {host} lies past the end of the file")
                else:
                    yield from bitmap_pieces(
                        bruns, SECTOR, base, within, n,
                        lambda v, ln: Piece(v, ln, DATA, data + v - base),
                        lambda v, ln: Piece(v, ln, absent))
            pos += n
