"""What is in a volume, by content: filesystem type, label, UUID.

Like `blkid -p`, this reads superblocks only. The Sleuth Kit can open many of
these filesystems but does not report labels or UUIDs, and it cannot tell an
LVM physical volume or swap from garbage; `inspect` needs all of that.
References: ext4 superblock (kernel Documentation/filesystems/ext4/super.rst),
XFS sb (xfs_format.h), btrfs super (btrfs docs, On-disk Format), FAT BPB,
NTFS boot sector, exFAT boot sector, Linux swap header, LVM2 label.
"""

from __future__ import annotations

import uuid as uuid_mod
from dataclasses import dataclass

from construct import Bytes, Const, Int8ul, Int16ul, Int32ub, Int32ul, Int64ub, Int64ul, Padding, Struct

from ..source.base import ByteSource

ExtSuperblock = Struct(  # at byte 1024
    "inodes_count" / Int32ul,
    "blocks_count_lo" / Int32ul,
    "r_blocks_count_lo" / Int32ul,
    "free_blocks_count_lo" / Int32ul,
    "free_inodes_count" / Int32ul,
    "first_data_block" / Int32ul,
    "log_block_size" / Int32ul,
    Padding(0x38 - 0x1C),
    "magic" / Int16ul,                # 0xEF53
    Padding(0x5C - 0x3A),
    "feature_compat" / Int32ul,
    "feature_incompat" / Int32ul,
    "feature_ro_compat" / Int32ul,
    "uuid" / Bytes(16),
    "volume_name" / Bytes(16),
    Padding(0x150 - 0x88),
    "blocks_count_hi" / Int32ul,
    "r_blocks_count_hi" / Int32ul,
    "free_blocks_count_hi" / Int32ul,
)

XfsSuperblock = Struct(
    "magic" / Const(b"XFSB"),
    "blocksize" / Int32ub,
    "dblocks" / Int64ub,
    Padding(16),
    "uuid" / Bytes(16),
    Padding(0x6C - 0x30),
    "fname" / Bytes(12),
    Padding(0x90 - 0x78),
    "fdblocks" / Int64ub,            # free data blocks (xfs_format.h sb_fdblocks)
)

BtrfsSuperblock = Struct(  # at 64 KiB
    "csum" / Bytes(32),
    "fsid" / Bytes(16),
    "bytenr" / Int64ul,
    "flags" / Int64ul,
    "magic" / Const(b"_BHRfS_M"),
    Padding(0x70 - 0x48),
    "total_bytes" / Int64ul,
    "bytes_used" / Int64ul,
    Padding(0x12B - 0x80),
    "label" / Bytes(256),
)

FatBootSector = Struct(
    "jump" / Bytes(3),
    "oem" / Bytes(8),
    "bytes_per_sector" / Int16ul,
    "sectors_per_cluster" / Int8ul,
    "reserved_sectors" / Int16ul,
    "fat_count" / Int8ul,
    "root_entries" / Int16ul,
    "total_sectors16" / Int16ul,
    "media" / Int8ul,
    "fat_size16" / Int16ul,
    Padding(8),
    "total_sectors32" / Int32ul,
    "rest" / Bytes(512 - 36),
)


@dataclass
class Probe:
    type: str | None                  # "ext4", "vfat", "LVM2_member", "swap", None = unknown
    label: str | None = None
    uuid: str | None = None
    size: int | None = None
    used: int | None = None
    free: int | None = None
    block_size: int | None = None


def _text(raw: bytes) -> str | None:
    text = raw.split(b"\0", 1)[0].decode("utf-8", "replace").strip()
    return text or None


def _probe_ext(head: bytes) -> Probe | None:
    if len(head) < 2048:
        return None
    sb = ExtSuperblock.parse(head[1024:2048])
    if sb.magic != 0xEF53:
        return None
    incompat, compat, ro = sb.feature_incompat, sb.feature_compat, sb.feature_ro_compat
    if incompat & 0x0008:  # JOURNAL_DEV: an external journal, not a filesystem
        kind = "jbd"
    elif incompat & (0x0040 | 0x0080 | 0x0200 | 0x8000 | 0x10000) or ro & (0x0008 | 0x0010 | 0x0020 | 0x0400):
        kind = "ext4"          # extents, 64bit, flex_bg, inline data, ... ; huge_file, gdt_csum, dir_nlink, metadata_csum
    elif compat & 0x0004:
        kind = "ext3"          # has_journal
    else:
        kind = "ext2"
    block = 1024 << min(sb.log_block_size, 16)
    blocks = sb.blocks_count_lo | ((sb.blocks_count_hi << 32) if incompat & 0x80 else 0)
    free = sb.free_blocks_count_lo | ((sb.free_blocks_count_hi << 32) if incompat & 0x80 else 0)
    return Probe(kind, _text(sb.volume_name), str(uuid_mod.UUID(bytes=sb.uuid)),
                 size=blocks * block, used=(blocks - free) * block, free=free * block, block_size=block)


def _probe_xfs(head: bytes) -> Probe | None:
    if head[:4] != b"XFSB":
        return None
    sb = XfsSuperblock.parse(head[:0x98])
    size, free = sb.dblocks * sb.blocksize, sb.fdblocks * sb.blocksize
    return Probe("xfs", _text(sb.fname), str(uuid_mod.UUID(bytes=sb.uuid)),
                 size=size, used=max(0, size - free), free=free, block_size=sb.blocksize)


def _probe_fat(head: bytes) -> Probe | None:
    if len(head) < 512 or head[510:512] != b"\x55\xaa":
        return None
    bs = FatBootSector.parse(head[:512])
    if bs.bytes_per_sector not in (512, 1024, 2048, 4096) or bs.sectors_per_cluster == 0 \
            or bs.sectors_per_cluster & (bs.sectors_per_cluster - 1) or bs.fat_count not in (1, 2) \
            or bs.reserved_sectors == 0:
        return None
    if bs.fat_size16 == 0:   # FAT32: extended BPB at 0x40
        serial, label = head[0x43:0x47], head[0x47:0x52]
        if head[0x52:0x5A] != b"FAT32   " and head[0x42] != 0x29:
            return None
    else:
        serial, label = head[0x27:0x2B], head[0x2B:0x36]
        if head[0x26] not in (0x28, 0x29) and not head[0x36:0x39] == b"FAT":
            return None
    total = bs.total_sectors16 or bs.total_sectors32
    label_text = _text(label)
    if label_text == "NO NAME":
        label_text = None
    s = int.from_bytes(serial, "little")
    return Probe("vfat", label_text, f"{s >> 16:04X}-{s & 0xFFFF:04X}", size=total * bs.bytes_per_sector)


def _probe_ntfs(head: bytes) -> Probe | None:
    if head[3:11] != b"NTFS    ":
        return None
    serial = int.from_bytes(head[0x48:0x50], "little")
    sectors = int.from_bytes(head[0x28:0x30], "little")
    bps = int.from_bytes(head[0x0B:0x0D], "little")
    # NTFS keeps its label in the $Volume file, which TSK reads; blkid shows the serial as UUID.
    return Probe("ntfs", None, f"{serial:016X}", size=sectors * bps)


def _probe_f2fs(source: ByteSource) -> Probe | None:
    """f2fs superblock at 1 KiB (include/linux/f2fs_fs.h struct f2fs_super_block)."""
    sb = source.read(1024, 124 + 128)
    if len(sb) < 252 or sb[:4] != b"\x10\x20\xf5\xf2":
        return None
    label = sb[124:252].decode("utf-16-le", "replace").split("\0", 1)[0].strip() or None
    block = 1 << min(int.from_bytes(sb[16:20], "little"), 16)
    return Probe("f2fs", label, str(uuid_mod.UUID(bytes=sb[108:124])),
                 size=int.from_bytes(sb[36:44], "little") * block, block_size=block)


def _probe_jfs(source: ByteSource) -> Probe | None:
    """JFS superblock at 32 KiB (jfs_superblock.h: magic, ..., uuid at 136, label at 152)."""
    sb = source.read(32768, 168)
    if len(sb) < 168 or sb[:4] != b"JFS1":
        return None
    return Probe("jfs", _text(sb[152:168]), str(uuid_mod.UUID(bytes=sb[136:152])),
                 block_size=int.from_bytes(sb[16:20], "little") or None)


def _probe_reiserfs(source: ByteSource) -> Probe | None:
    """ReiserFS superblock at 64 KiB (8 KiB for 3.5): magic at 52, uuid at 84, label at 100."""
    for at in (65536, 8192):
        sb = source.read(at, 116)
        if len(sb) < 116 or not (sb[52:61] in (b"ReIsEr2Fs", b"ReIsEr3Fs") or sb[52:60] == b"ReIsErFs"):
            continue
        newer = sb[52:60] != b"ReIsErFs"   # 3.6 superblocks carry a UUID and a label
        uuid = str(uuid_mod.UUID(bytes=sb[84:100])) if newer and sb[84:100] != bytes(16) else None
        return Probe("reiserfs", _text(sb[100:116]) if newer else None, uuid)
    return None


def probe(source: ByteSource) -> Probe:
    """Identify the content of a volume (or a whole disk)."""
    head = source.read(0, 8192)
    for check in (_probe_ext, _probe_xfs, _probe_ntfs, _probe_fat):
        found = check(head)
        if found:
            return found
    if head[3:11] == b"EXFAT   ":
        serial = int.from_bytes(head[0x64:0x68], "little")
        return Probe("exfat", None, f"{serial >> 16:04X}-{serial & 0xFFFF:04X}")
    for sector in range(4):   # LVM2 label lives in one of the first four sectors
        if head[sector * 512:sector * 512 + 8] == b"LABELONE" and head[sector * 512 + 24:sector * 512 + 32] == b"LVM2 001":
            raw = head[sector * 512 + 32:sector * 512 + 64].decode("ascii", "replace")
            return Probe("LVM2_member", None, "-".join([raw[0:6], raw[6:10], raw[10:14], raw[14:18],
                                                         raw[18:22], raw[22:26], raw[26:32]]))
    if head[:6] == b"LUKS\xba\xbe":
        return Probe("crypto_LUKS", None, _text(head[168:208]))
    btrfs = source.read(0x10000, 0x1000)
    if btrfs[0x40:0x48] == b"_BHRfS_M":
        sb = BtrfsSuperblock.parse(btrfs)
        return Probe("btrfs", _text(sb.label), str(uuid_mod.UUID(bytes=sb.fsid)),
                     size=sb.total_bytes, used=sb.bytes_used)
    for page in (4096, 8192, 16384, 65536):
        tail = source.read(page - 10, 10)
        if tail in (b"SWAPSPACE2", b"SWAP-SPACE"):
            label = source.read(1024 + 28, 16)
            return Probe("swap", _text(label), str(uuid_mod.UUID(bytes=source.read(1024 + 12, 16))))
    for check in (_probe_f2fs, _probe_jfs, _probe_reiserfs):   # what only libguestfs reads
        found = check(source)
        if found:
            return found
    iso = source.read(0x8001, 5)
    if iso == b"CD001":
        return Probe("iso9660", _text(source.read(0x8028, 32)))
    hfs = head[1024:1026]
    if hfs in (b"H+", b"HX"):
        return Probe("hfsplus")
    if head[32:36] == b"NXSB":
        return Probe("apfs")
    if head[3:11] == b"-FVE-FS-":
        return Probe("BitLocker")
    if head[257:262] == b"ustar":   # a tar of a server's files (source/archives/ TarTreeSource)
        return Probe("tar")
    return Probe(None)
