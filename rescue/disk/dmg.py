"""Apple disk images (UDIF .dmg): raw, zero-fill, zlib, bzip2, LZFSE and LZMA chunks.

References: qemu block/dmg.c (koly trailer, 'mish' block tables, chunk types);
Apple's UDIF layout as documented by Jonathan Levin's "Demystifying the DMG
file format" and the libdmg-hfsplus headers (UDIFResourceFile, BLKXTable,
BLKXChunkEntry).

Layout (big-endian): a 512-byte 'koly' trailer at the end of the file points
at an XML property list whose resource-fork/blkx entries each hold a 'mish'
table: a run of chunks, each (type, first sector, sector count, offset and
length in the data fork). Chunks cover the disk end to end: sectors no
chunk describes are a damaged range (qemu fails those reads too). The virtual
size is the end of the last chunk (what qemu reports).
"""

from __future__ import annotations

import bz2
import lzma
import plistlib
import struct
import zlib
from typing import Any
from xml.parsers.expat import ExpatError

from construct import Bytes, Const, ConstructError, Int32ub, Int64ub, Struct

from ..errors import DamagedRange, DiskFormatError, UnsupportedFeature
from ..source.base import ByteSource
from .base import DiskInfo, DiskOptions
from .choices import no_choices
from .mapping import COMPRESSED, DAMAGED, DATA, ZERO, ExtentBuilder, MappedDisk, read_exact_table

UDIFChecksum = Struct(
    "type" / Int32ub,
    "size" / Int32ub,
    "data" / Bytes(128),
)

Koly = Struct(
    "signature" / Const(b"koly"),
    "version" / Int32ub,
    "header_size" / Int32ub,          # 512
    "flags" / Int32ub,
    "running_data_fork_offset" / Int64ub,
    "data_fork_offset" / Int64ub,
    "data_fork_length" / Int64ub,
    "rsrc_fork_offset" / Int64ub,
    "rsrc_fork_length" / Int64ub,
    "segment_number" / Int32ub,
    "segment_count" / Int32ub,
    "segment_id" / Bytes(16),
    "data_checksum" / UDIFChecksum,
    "xml_offset" / Int64ub,
    "xml_length" / Int64ub,
    "reserved1" / Bytes(120),
    "checksum" / UDIFChecksum,
    "image_variant" / Int32ub,
    "sector_count" / Int64ub,
    "reserved2" / Bytes(12),
)

Mish = Struct(
    "signature" / Const(b"mish"),
    "version" / Int32ub,
    "sector_number" / Int64ub,        # first sector of this table's range
    "sector_count" / Int64ub,
    "data_offset" / Int64ub,          # added to every chunk's compressed_offset
    "buffers_needed" / Int32ub,
    "block_descriptors" / Int32ub,
    "reserved" / Bytes(24),
    "checksum" / UDIFChecksum,
    "chunk_count" / Int32ub,
)

Chunk = Struct(
    "type" / Int32ub,
    "comment" / Int32ub,
    "sector_number" / Int64ub,        # relative to the table's sector_number
    "sector_count" / Int64ub,
    "compressed_offset" / Int64ub,
    "compressed_length" / Int64ub,
)

CHUNK_FORMAT = ">IIQQQQ"           # = Chunk, for struct.iter_unpack
assert struct.calcsize(CHUNK_FORMAT) == Chunk.sizeof()

ZERO_FILL, RAW, IGNORE = 0x00000000, 0x00000001, 0x00000002
ADC, ZLIB, BZIP2, LZFSE, LZMA = 0x80000004, 0x80000005, 0x80000006, 0x80000007, 0x80000008
COMMENT, TERMINATOR = 0x7FFFFFFE, 0xFFFFFFFF
CODEC_NAMES = {ZLIB: "zlib", BZIP2: "bzip2", LZFSE: "lzfse", LZMA: "lzma", ADC: "adc"}

SECTOR = 512
MAX_XML = 64 << 20
MAX_CHUNKS = 1 << 22
MAX_CHUNK_BYTES = 64 << 20        # inflated size of one chunk (qemu: 64 MiB too)
MAX_SECTORS = 1 << 44             # 8 PiB: beyond any real disk


ENCRYPTED_V2 = b"encrcdsa"   # at the start of an encrypted DMG (v1: "cdsaencr" at the end)
ENCRYPTED_V1 = b"cdsaencr"


def _encrypted(source: ByteSource) -> bool:
    return (source.read(0, 8) == ENCRYPTED_V2
            or (source.size >= 8 and source.read(source.size - 8, 8) == ENCRYPTED_V1))


def detect(source: ByteSource) -> bool:
    if source.size < 512:
        return False
    return source.read(source.size - 512, 4) == b"koly" or _encrypted(source)


def open(source: ByteSource, options: DiskOptions) -> "DmgDisk":  # noqa: A001 (reader interface)
    if _encrypted(source):
        raise UnsupportedFeature("encrypted Apple disk image (AES): not supported", file=source.name,
                                 hint="on a Mac: hdiutil convert IMAGE.dmg -format UDZO -o plain.dmg")
    return no_choices(DmgDisk(source), options, "DMG")


def _lzfse():
    try:
        import lzfse  # optional (PyPI "lzfse"): images made on macOS 10.11+ may use it
    except ImportError:
        return None
    return lzfse


class DmgDisk(MappedDisk):
    cluster_cache_size = 16

    def __init__(self, source: ByteSource) -> None:
        super().__init__(source)
        try:
            k = Koly.parse(source.read(source.size - 512, 512))
        except ConstructError as exc:
            raise DiskFormatError(f"DMG koly trailer unreadable: {exc}", file=source.name) from None
        if k.xml_length == 0 or k.xml_length > MAX_XML or k.xml_offset + k.xml_length > source.size:
            raise DiskFormatError(f"DMG koly trailer: xml_offset={k.xml_offset} xml_length={k.xml_length}:"
                                  f" the property list is missing or outside the file ({source.size} bytes)",
                                  file=source.name, hint="old NDIF images without a plist are not read")
        xml = read_exact_table(source, k.xml_offset, k.xml_length, "DMG property list")
        if b"<!ENTITY" in xml:
            raise DiskFormatError("DMG property list declares entities: refused", file=source.name)
        try:
            plist = plistlib.loads(xml, fmt=plistlib.FMT_XML)
            blkx = plist["resource-fork"]["blkx"]
        except (plistlib.InvalidFileException, ExpatError, KeyError, TypeError, ValueError) as exc:
            raise DiskFormatError(f"DMG property list has no readable resource-fork/blkx ({exc!r})",
                                  file=source.name) from None
        chunks: list[tuple[int, int, int, int, int]] = []   # (start sector, count, type, offset, length)
        partitions = []
        codecs: set[str] = set()
        for entry in blkx if isinstance(blkx, list) else []:
            data = entry.get("Data") if isinstance(entry, dict) else None
            if not isinstance(data, bytes):
                continue
            try:
                m = Mish.parse(data)
            except ConstructError as exc:
                raise DiskFormatError(f"DMG blkx entry {entry.get('Name')!r}: mish table unreadable ({exc})",
                                      file=source.name) from None
            if len(chunks) + m.chunk_count > MAX_CHUNKS:
                raise DiskFormatError(f"DMG: more than {MAX_CHUNKS} chunks", file=source.name)
            if Mish.sizeof() + m.chunk_count * Chunk.sizeof() > len(data):
                raise DiskFormatError(f"DMG blkx entry {entry.get('Name')!r}: chunk_count={m.chunk_count} "
                                      f"but the table holds {len(data)} bytes", file=source.name)
            partitions.append(str(entry.get("Name", "")))
            table = data[Mish.sizeof():Mish.sizeof() + m.chunk_count * Chunk.sizeof()]
            # Chunk entries, decoded once at open (struct: the same layout as `Chunk`, faster).
            for kind, _, first, count, offset, length in struct.iter_unpack(CHUNK_FORMAT, table):
                if kind in (COMMENT, TERMINATOR) or count == 0:
                    continue
                start = m.sector_number + first
                if start + count > MAX_SECTORS:
                    raise DiskFormatError(f"DMG chunk at sector {start}: sector_count={count} "
                                          "is absurd", file=source.name)
                if kind not in (ZERO_FILL, IGNORE, RAW) and count * SECTOR > MAX_CHUNK_BYTES:
                    raise DiskFormatError(f"DMG chunk at sector {start}: {count} sectors in one "
                                          "compressed chunk (more than 64 MiB)", file=source.name)
                if length > 2 * MAX_CHUNK_BYTES:
                    raise DiskFormatError(f"DMG chunk at sector {start}: compressed_length="
                                          f"{length} is absurd", file=source.name)
                if kind in CODEC_NAMES:
                    codecs.add(CODEC_NAMES[kind])
                chunks.append((start, count, kind, k.data_fork_offset + m.data_offset + offset, length))
        if not chunks:
            raise DiskFormatError("DMG: the blkx tables hold no chunks", file=source.name)
        chunks.sort()
        self.extents_table = self._extents(chunks)
        end = chunks[-1][0] + chunks[-1][1]
        self.size = end * SECTOR
        self.span = max(self.size, 1)
        self._init_table_cache(len(chunks))
        details: dict[str, Any] = {"partitions": partitions, "chunks": len(chunks)}
        if k.sector_count != end:
            details["koly_sector_count"] = k.sector_count
        self.info = DiskInfo(format="dmg", subformat="UDIF", virtual_size=self.size,
                             allocated_size=source.size,
                             compression=",".join(sorted(codecs)) or None, details=details)

    def _extents(self, chunks):
        b = ExtentBuilder()
        pos = 0
        for start, count, kind, offset, length in chunks:
            if start < pos:
                raise DiskFormatError(f"DMG chunks overlap at sector {start}", file=self.name)
            if start > pos:   # qemu fails these reads too: the tables do not describe them
                b.add(pos * SECTOR, (start - pos) * SECTOR, DAMAGED,
                      f"no DMG chunk describes sectors {pos}..{start - 1}")
            nbytes = count * SECTOR
            if kind in (ZERO_FILL, IGNORE):
                b.add(start * SECTOR, nbytes, ZERO)
            elif kind == RAW:
                b.add(start * SECTOR, nbytes, DATA, offset)
            elif kind in (ZLIB, BZIP2, LZFSE, LZMA):
                b.add(start * SECTOR, nbytes, COMPRESSED, (offset, length, kind, nbytes))
            elif kind == ADC:
                b.add(start * SECTOR, nbytes, DAMAGED, "ADC-compressed chunk (type 0x80000004): not "
                      "supported; convert the image with `hdiutil convert -format UDZO` on a Mac")
            else:
                b.add(start * SECTOR, nbytes, DAMAGED, f"unknown DMG chunk type 0x{kind:08x}")
            pos = start + count
        return b.done()

    def _decode_table(self, index: int):
        return self.extents_table

    def _inflate(self, descriptor: Any, raw: bytes) -> bytes:
        offset, length, kind, nbytes = descriptor
        what = f"{self.name}: DMG {CODEC_NAMES[kind]} chunk at offset {offset} (+{length})"
        if len(raw) != length:
            raise DamagedRange(f"{what} is past the end of the file ({self.source.size} bytes)")
        try:
            if kind == ZLIB:
                d = zlib.decompressobj()
                out = d.decompress(raw, nbytes)
            elif kind == BZIP2:
                out = bz2.BZ2Decompressor().decompress(raw, nbytes)
            elif kind == LZMA:
                out = lzma.LZMADecompressor().decompress(raw, nbytes)
            else:
                lz = _lzfse()
                if lz is None:
                    raise DamagedRange(f"{what}: LZFSE needs the 'lzfse' Python package "
                                       "(pip install lzfse)")
                out = lz.decompress(raw)
        except (zlib.error, OSError, lzma.LZMAError, ValueError) as exc:
            if isinstance(exc, DamagedRange):
                raise
            raise DamagedRange(f"{what} does not decompress ({exc})") from None
        if len(out) < nbytes:   # qemu: a short chunk is an error
            raise DamagedRange(f"{what} decompresses to {len(out)} bytes, not {nbytes}")
        return out[:nbytes]

