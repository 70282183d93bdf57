"""VHDX (Hyper-V, Azure, Disk2vhd): fixed, dynamic and differencing.

Reference: Microsoft [MS-VHDX] "Virtual Hard Disk v2 (VHDX) File Format"
(file type identifier, headers, region table, log, BAT, metadata region,
parent locator); qemu block/vhdx.c for its sanity limits.

Layout: 'vhdxfile' identifier at 0; two headers at 64 KiB and 128 KiB (the
valid one, by CRC32C, with the higher sequence number wins); two region tables
at 192/256 KiB locating the BAT and the metadata region. The BAT interleaves
one sector-bitmap entry after every `chunk_ratio` payload entries. All fields
little-endian; GUIDs in Microsoft's mixed-endian layout.

The log is only needed to finish writes interrupted by a crash. A clean image
has a zero LogGuid; a dirty one is read as is, with a warning that the log was
not replayed (qemu would replay it, which means writing to the file).
"""

from __future__ import annotations

import array
import sys
import uuid
from typing import Iterator

from construct import Bytes, Int16ul, Int32ul, Int64ul, Struct

from ..crc32c import crc32c
from ..errors import DiskFormatError, UnsupportedFeature
from ..lru import LRU
from ..source.base import ByteSource
from .base import DiskImage, DiskInfo, DiskOptions
from .bitmaps import bitmap_pieces, bitmap_runs
from .chain import open_in_chain, open_parent
from .mapping import BACKING, DAMAGED, DATA, ZERO, MappedDisk, Piece

KiB, MiB = 1 << 10, 1 << 20

FileIdentifier = Struct(
    "signature" / Bytes(8),           # b"vhdxfile"
    "creator" / Bytes(512),           # UTF-16LE
)

Header = Struct(                      # 4 KiB, CRC32C over all of it
    "signature" / Bytes(4),           # b"head"
    "checksum" / Int32ul,
    "sequence_number" / Int64ul,
    "file_write_guid" / Bytes(16),
    "data_write_guid" / Bytes(16),
    "log_guid" / Bytes(16),
    "log_version" / Int16ul,
    "version" / Int16ul,              # 1
    "log_length" / Int32ul,
    "log_offset" / Int64ul,
)

RegionTableHeader = Struct(           # 64 KiB, CRC32C over all of it
    "signature" / Bytes(4),           # b"regi"
    "checksum" / Int32ul,
    "entry_count" / Int32ul,          # <= 2047
    "reserved" / Int32ul,
)
RegionTableEntry = Struct(
    "guid" / Bytes(16),
    "file_offset" / Int64ul,
    "length" / Int32ul,
    "required" / Int32ul,
)

MetadataTableHeader = Struct(
    "signature" / Bytes(8),           # b"metadata"
    "reserved" / Int16ul,
    "entry_count" / Int16ul,          # <= 2047
    "reserved2" / Bytes(20),
)
MetadataTableEntry = Struct(
    "item_id" / Bytes(16),
    "offset" / Int32ul,               # from the start of the metadata region
    "length" / Int32ul,
    "flags" / Int32ul,                # bit 2: is_required
    "reserved" / Int32ul,
)
FileParameters = Struct("block_size" / Int32ul, "flags" / Int32ul)   # 1: leave allocated, 2: has parent

ParentLocatorHeader = Struct(
    "locator_type" / Bytes(16),
    "reserved" / Int16ul,
    "key_value_count" / Int16ul,
)
ParentLocatorEntry = Struct(
    "key_offset" / Int32ul,
    "value_offset" / Int32ul,
    "key_length" / Int16ul,
    "value_length" / Int16ul,
)


def _guid(text: str) -> bytes:
    return uuid.UUID(text).bytes_le


BAT_GUID = _guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = _guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS = _guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE = _guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
VIRTUAL_DISK_ID = _guid("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE = _guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE = _guid("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR = _guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
VHDX_PARENT_LOCATOR_TYPE = _guid("B04AEFB7-D19E-4A81-B789-25B8E9445913")
KNOWN_METADATA = {FILE_PARAMETERS, VIRTUAL_DISK_SIZE, VIRTUAL_DISK_ID, LOGICAL_SECTOR_SIZE,
                  PHYSICAL_SECTOR_SIZE, PARENT_LOCATOR}

# Payload block states (MS-VHDX 2.5.1.1) and the sector bitmap's PRESENT.
NOT_PRESENT, UNDEFINED, BLOCK_ZERO, UNMAPPED, FULLY_PRESENT, PARTIALLY_PRESENT = 0, 1, 2, 3, 6, 7
SB_PRESENT = 6
STATE_MASK = 7
BAT_PAGE = 4096                       # entries per cached BAT page
MAX_VIRTUAL_SIZE = 64 << 40           # 64 TiB, the spec's limit


def _checked(raw: bytes) -> bool:
    """CRC32C of a structure whose checksum field (bytes 4-8) counts as zero."""
    return crc32c(raw[:4] + b"\0\0\0\0" + raw[8:]) == int.from_bytes(raw[4:8], "little")


def detect(source: ByteSource) -> bool:
    return source.read(0, 8) == b"vhdxfile"


def open(source: ByteSource, options: DiskOptions) -> DiskImage:  # noqa: A001 (reader interface)
    return open_in_chain(source, options, lambda: VhdxImage(source, options))


class VhdxImage(MappedDisk):
    """The virtual disk of a fixed, dynamic or differencing VHDX."""

    def __init__(self, source: ByteSource, options: DiskOptions) -> None:
        super().__init__(source)
        self.warnings: list[str] = []
        self._read_header()
        regions = self._read_regions()
        self._read_metadata(regions[METADATA_GUID])
        self._setup_bat(regions[BAT_GUID])
        self._bat_pages = LRU(64)
        self._bitmaps = LRU(64)
        self.info = DiskInfo(
            format="vhdx", virtual_size=self.size, cluster_size=self.block_size,
            subformat="differencing" if self.has_parent else "dynamic",
            warnings=self.warnings,
            details={"virtual_disk_id": self.disk_id, "logical_sector_size": self.sector_size,
                     "physical_sector_size": self.physical_sector_size,
                     "leave_blocks_allocated": self.leave_allocated})
        if self.leave_allocated and not self.has_parent:
            self.info.subformat = "fixed"
        if self.bat_entries <= 1 << 16:     # a small BAT (<= 512 KiB) is worth counting
            present = sum(1 for i in range(self.payload_blocks)
                          if (self._bat(i + i // self.chunk_ratio) or 0) & STATE_MASK
                          in (FULLY_PRESENT, PARTIALLY_PRESENT))
            self.info.allocated_size = present * self.block_size
        if self.has_parent:
            self._open_parent(options)

    # --- structures -----------------------------------------------------------

    def _err(self, problem: str) -> DiskFormatError:
        return DiskFormatError(problem, file=self.name)

    def _read_header(self) -> None:
        best = None
        for offset in (64 * KiB, 128 * KiB):
            raw = self.source.read(offset, 4 * KiB)
            if len(raw) == 4 * KiB and raw[:4] == b"head" and _checked(raw):
                h = Header.parse(raw)
                # Disk2vhd writes both headers with the same sequence number: either is fine.
                if best is None or h.sequence_number > best.sequence_number:
                    best = h
        if best is None:
            raise self._err("neither VHDX header (at 64 KiB and 128 KiB) has a valid 'head' "
                            "signature and CRC32C")
        if best.version != 1:
            raise UnsupportedFeature(f"VHDX header version {best.version} (only 1)", file=self.name)
        self.header = best
        if best.log_guid != bytes(16):
            self.warnings.append(
                f"VHDX log is dirty (LogGuid {uuid.UUID(bytes_le=best.log_guid)}): the image was not "
                "closed cleanly and its log was not replayed, so recently written data may be stale")

    def _read_regions(self) -> dict[bytes, object]:
        for offset in (192 * KiB, 256 * KiB):
            raw = self.source.read(offset, 64 * KiB)
            if len(raw) != 64 * KiB or raw[:4] != b"regi" or not _checked(raw):
                continue
            h = RegionTableHeader.parse(raw)
            if h.entry_count > 2047:
                continue
            regions = {}
            for i in range(h.entry_count):
                e = RegionTableEntry.parse(raw[16 + 32 * i:48 + 32 * i])
                if e.guid not in (BAT_GUID, METADATA_GUID) and e.required & 1:
                    raise UnsupportedFeature(f"required region {uuid.UUID(bytes_le=e.guid)} is unknown",
                                             file=self.name)
                regions[e.guid] = e
            for guid, what in ((BAT_GUID, "BAT"), (METADATA_GUID, "metadata")):
                if guid not in regions:
                    raise self._err(f"region table has no {what} region")
            return regions
        raise self._err("neither VHDX region table (at 192 KiB and 256 KiB) is valid")

    def _read_metadata(self, region) -> None:
        if region.length > 64 * MiB:
            raise self._err(f"metadata region length {region.length} is absurd")
        raw = self.source.read(region.file_offset, min(region.length, 64 * KiB))
        if len(raw) < 32 or raw[:8] != b"metadata":
            raise self._err(f"no metadata table ('metadata') at offset {region.file_offset}")
        h = MetadataTableHeader.parse(raw)
        if h.entry_count > 2047 or 32 + 32 * h.entry_count > len(raw):
            raise self._err(f"metadata entry_count {h.entry_count} is too large")
        items: dict[bytes, bytes] = {}
        for i in range(h.entry_count):
            e = MetadataTableEntry.parse(raw[32 + 32 * i:64 + 32 * i])
            if e.item_id not in KNOWN_METADATA:
                if e.flags & 4:
                    raise UnsupportedFeature(f"required metadata item {uuid.UUID(bytes_le=e.item_id)} "
                                             "is unknown", file=self.name)
                continue
            if e.offset + e.length > region.length or e.length > 1 * MiB:
                raise self._err(f"metadata item {uuid.UUID(bytes_le=e.item_id)} lies outside its region")
            items[e.item_id] = self.source.read(region.file_offset + e.offset, e.length)
        for guid, what in ((FILE_PARAMETERS, "file parameters"), (VIRTUAL_DISK_SIZE, "virtual disk size"),
                           (LOGICAL_SECTOR_SIZE, "logical sector size")):
            if len(items.get(guid, b"")) < (8 if guid != LOGICAL_SECTOR_SIZE else 4):
                raise self._err(f"metadata item '{what}' is missing")
        fp = FileParameters.parse(items[FILE_PARAMETERS])
        self.block_size = fp.block_size
        self.leave_allocated = bool(fp.flags & 1)
        self.has_parent = bool(fp.flags & 2)
        self.size = int.from_bytes(items[VIRTUAL_DISK_SIZE][:8], "little")
        self.sector_size = int.from_bytes(items[LOGICAL_SECTOR_SIZE][:4], "little")
        self.physical_sector_size = int.from_bytes(items.get(PHYSICAL_SECTOR_SIZE, b"")[:4], "little")
        self.locator = items.get(PARENT_LOCATOR)
        disk_id = items.get(VIRTUAL_DISK_ID, b"")
        self.disk_id = str(uuid.UUID(bytes_le=disk_id[:16])) if len(disk_id) >= 16 else None
        bs = self.block_size
        if bs < MiB or bs > 256 * MiB or bs & (bs - 1):
            raise self._err(f"block size {bs} is not a power of two between 1 MiB and 256 MiB")
        if self.sector_size not in (512, 4096):
            raise self._err(f"logical sector size {self.sector_size} is not 512 or 4096")
        if self.size <= 0 or self.size > MAX_VIRTUAL_SIZE:
            raise self._err(f"virtual disk size {self.size} is absurd (limit 64 TiB)")

    def _setup_bat(self, region) -> None:
        self.chunk_ratio = (1 << 23) * self.sector_size // self.block_size
        self.payload_blocks = -(-self.size // self.block_size)
        bitmap_blocks = -(-self.payload_blocks // self.chunk_ratio)
        if self.has_parent:
            entries = bitmap_blocks * (self.chunk_ratio + 1)
        else:
            entries = self.payload_blocks + (self.payload_blocks - 1) // self.chunk_ratio
        if region.length < entries * 8:
            raise self._err(f"BAT region ({region.length} bytes) is too small for {entries} entries")
        self.bat_offset = region.file_offset
        self.bat_entries = entries

    def _bat(self, index: int) -> int | None:
        """BAT entry `index`, or None when the BAT itself is cut off by the end of the file."""
        page = index // BAT_PAGE

        def load():
            raw = self.source.read(self.bat_offset + page * BAT_PAGE * 8, BAT_PAGE * 8)
            entries = array.array("Q")
            entries.frombytes(raw[:len(raw) // 8 * 8])
            if sys.byteorder == "big":
                entries.byteswap()
            return entries
        entries = self._bat_pages.get(page, load)
        i = index % BAT_PAGE
        return entries[i] if i < len(entries) else None

    # --- parent -------------------------------------------------------------

    def _locator_entries(self) -> dict[str, str]:
        raw = self.locator or b""
        if len(raw) < 20:
            raise self._err("differencing VHDX has no parent locator")
        h = ParentLocatorHeader.parse(raw)
        if h.locator_type != VHDX_PARENT_LOCATOR_TYPE:
            raise UnsupportedFeature(f"parent locator type {uuid.UUID(bytes_le=h.locator_type)} is unknown",
                                     file=self.name)
        out = {}
        for i in range(h.key_value_count):
            at = 20 + 12 * i
            if at + 12 > len(raw):
                break
            e = ParentLocatorEntry.parse(raw[at:at + 12])
            key = raw[e.key_offset:e.key_offset + e.key_length].decode("utf-16-le", "replace")
            value = raw[e.value_offset:e.value_offset + e.value_length].decode("utf-16-le", "replace")
            out[key] = value
        return out

    def _open_parent(self, options: DiskOptions) -> None:
        entries = self._locator_entries()
        names = []
        if options.backing:
            names = [options.backing]
        else:
            rel = entries.get("relative_path")
            if rel:
                rel = rel.replace("\\", "/")
                names.append(rel[2:] if rel.startswith("./") else rel)
            for key in ("absolute_win32_path", "volume_path"):
                if entries.get(key):
                    names.append(entries[key].replace("\\", "/").rsplit("/", 1)[-1])
            names = list(dict.fromkeys(names))
        if not names:
            raise self._err("differencing VHDX's parent locator names no file")
        self.backing = open_parent(self, names, "parent VHDX", options, detect, open)
        linkage = entries.get("parent_linkage", "").strip("{}").lower()
        if isinstance(self.backing, VhdxImage) and linkage:
            got = str(uuid.UUID(bytes_le=self.backing.header.data_write_guid))
            if got != linkage:
                self.warnings.append(f"parent's DataWriteGuid {got} differs from parent_linkage "
                                     f"{linkage}: the parent changed after this disk was made")
        self.info.backing_chain = self.backing_chain()

    # --- mapping ------------------------------------------------------------

    def _sector_runs(self, block: int):
        """Bitmap runs (first sector, count, bit) of `block` from its chunk's
        sector bitmap block, or a reason string when it cannot be read."""
        def load():
            chunk, nth = divmod(block, self.chunk_ratio)
            entry = self._bat(chunk * (self.chunk_ratio + 1) + self.chunk_ratio)
            if entry is None or entry & STATE_MASK != SB_PRESENT:
                return f"sector bitmap of block {block} is missing"
            per_block = self.block_size // self.sector_size
            at = (entry >> 20 << 20) + nth * per_block // 8
            raw = self.source.read(at, per_block // 8)
            if len(raw) != per_block // 8:
                return f"sector bitmap of block {block} lies past the end of the file"
            return bitmap_runs(raw, per_block, lsb_first=True)
        return self._bitmaps.get(block, load)

    def _map(self, offset: int, length: int) -> Iterator[Piece]:
        bs = self.block_size
        absent = BACKING if self.has_parent else ZERO
        end = offset + length
        pos = offset
        while pos < end:
            block, within = divmod(pos, bs)
            n = min(bs - within, end - pos)
            entry = self._bat(block + block // self.chunk_ratio)
            state = None if entry is None else entry & STATE_MASK
            host = 0 if entry is None else entry >> 20 << 20
            if entry is None:
                yield Piece(pos, n, DAMAGED, f"BAT entry for block {block} lies past the end of the file")
            elif state == NOT_PRESENT:
                yield Piece(pos, n, absent)
            elif state in (UNDEFINED, BLOCK_ZERO, UNMAPPED):
                yield Piece(pos, n, ZERO)
            elif state == FULLY_PRESENT or (state == PARTIALLY_PRESENT and not self.has_parent):
                yield Piece(pos, n, DATA, host + within)
            elif state == PARTIALLY_PRESENT:
                bruns = self._sector_runs(block)
                base = block * bs
                if isinstance(bruns, str):
                    yield Piece(pos, n, DAMAGED, bruns)
                else:
                    yield from bitmap_pieces(
                        bruns, self.sector_size, base, within, n,
                        lambda v, ln: Piece(v, ln, DATA, host + v - base),
                        lambda v, ln: Piece(v, ln, BACKING))
            else:
                yield Piece(pos, n, DAMAGED, f"BAT entry for block {block} has unknown state {state}")
            pos += n
