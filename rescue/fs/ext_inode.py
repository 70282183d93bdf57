"""Raw ext2/3/4 inode metadata that The Sleuth Kit does not expose.

TSK gives names, modes, owners, sizes and data; it does not give extended
attributes, POSIX ACLs, device numbers or nanosecond/post-2038 timestamps.
`ExtInodeReader` reads exactly those from the raw inode and its EA block.

References:
- Linux fs/ext4/ext4.h (struct ext4_super_block, ext4_group_desc, ext4_inode,
  EXT4_FITS_IN_INODE, ext4_decode_extra_time), fs/ext4/super.c (descriptor_loc),
  fs/ext4/inode.c (old/new_decode_dev for i_block[0]/[1]).
- fs/ext4/xattr.h + xattr.c (ext4_xattr_header, ext4_xattr_entry, name indexes,
  in-inode EAs after i_extra_isize, EA inodes), fs/ext4/acl.h + acl.c (on-disk
  ACL format) and include/uapi/linux/posix_acl_xattr.h (what getxattr returns).
- https://www.kernel.org/doc/html/latest/filesystems/ext4/ (on-disk layout).
"""

from __future__ import annotations

import logging
import struct
from collections import namedtuple
from dataclasses import dataclass

from construct import Int8ul, Int16ul, Int32ul, Padding, Struct

from ..errors import DamagedRange, FilesystemError
from ..source.base import ByteSource
from .base import FileReadError

log = logging.getLogger(__name__)

SUPERBLOCK_OFFSET = 1024
INODE_CHUNK = 64 * 1024       # inode table read in pieces of this size
INODE_CHUNKS_CACHED = 256     # 16 MiB of inode table kept (a huge directory's inodes spread wide)
EXT_MAGIC = 0xEF53
EA_MAGIC = 0xEA020000

# Only the superblock fields we need; offsets per ext4.h.
Superblock = Struct(
    "s_inodes_count" / Int32ul,          # 0x00
    "s_blocks_count_lo" / Int32ul,       # 0x04
    Padding(0x14 - 0x08),
    "s_first_data_block" / Int32ul,      # 0x14
    "s_log_block_size" / Int32ul,        # 0x18
    "s_log_cluster_size" / Int32ul,      # 0x1C (bigalloc)
    "s_blocks_per_group" / Int32ul,      # 0x20
    Padding(0x28 - 0x24),
    "s_inodes_per_group" / Int32ul,      # 0x28
    Padding(0x38 - 0x2C),
    "s_magic" / Int16ul,                 # 0x38
    Padding(0x4C - 0x3A),
    "s_rev_level" / Int32ul,             # 0x4C
    Padding(0x58 - 0x50),
    "s_inode_size" / Int16ul,            # 0x58
    Padding(0x5C - 0x5A),
    "s_feature_compat" / Int32ul,        # 0x5C
    "s_feature_incompat" / Int32ul,      # 0x60
    "s_feature_ro_compat" / Int32ul,     # 0x64
    Padding(0xFE - 0x68),
    "s_desc_size" / Int16ul,             # 0xFE
    Padding(0x104 - 0x100),
    "s_first_meta_bg" / Int32ul,         # 0x104
    Padding(0x150 - 0x108),
    "s_blocks_count_hi" / Int32ul,       # 0x150
    Padding(0x24C - 0x154),
    "s_backup_bgs" / Int32ul[2],         # 0x24C (sparse_super2)
)

GroupDesc32 = Struct(
    "bg_block_bitmap_lo" / Int32ul,
    "bg_inode_bitmap_lo" / Int32ul,
    "bg_inode_table_lo" / Int32ul,
    Padding(0x12 - 0x0C),
    "bg_flags" / Int16ul,                # 0x12
)
GroupDescHigh = Struct(                  # the 64bit half, at 0x20
    "bg_block_bitmap_hi" / Int32ul,
    "bg_inode_bitmap_hi" / Int32ul,
    "bg_inode_table_hi" / Int32ul,
)

Inode = Struct(
    "i_mode" / Int16ul,                  # 0x00
    "i_uid" / Int16ul,
    "i_size_lo" / Int32ul,
    "i_atime" / Int32ul,                 # 0x08
    "i_ctime" / Int32ul,
    "i_mtime" / Int32ul,
    "i_dtime" / Int32ul,
    "i_gid" / Int16ul,                   # 0x18
    "i_links_count" / Int16ul,
    "i_blocks_lo" / Int32ul,
    "i_flags" / Int32ul,                 # 0x20
    "osd1" / Int32ul,
    "i_block" / Int32ul[15],             # 0x28
    "i_generation" / Int32ul,            # 0x64
    "i_file_acl_lo" / Int32ul,           # 0x68
    "i_size_high" / Int32ul,
    "i_obso_faddr" / Int32ul,
    "l_i_blocks_high" / Int16ul,         # 0x74
    "l_i_file_acl_high" / Int16ul,
    "l_i_uid_high" / Int16ul,
    "l_i_gid_high" / Int16ul,
    "l_i_checksum_lo" / Int16ul,
    "l_i_reserved" / Int16ul,
)                                        # 0x80 = 128 bytes, the "good old" inode
# The same two layouts for the hot path (one parse per file): construct's
# generic parser costs ~0.3 ms an inode, struct a microsecond. A test checks
# both agree.
_INODE = struct.Struct("<HHIIIIIHHIII15IIIIIHHHHHH")
_INODE_NAMES = ("i_mode i_uid i_size_lo i_atime i_ctime i_mtime i_dtime i_gid i_links_count i_blocks_lo "
                "i_flags osd1 i_block i_generation i_file_acl_lo i_size_high i_obso_faddr l_i_blocks_high "
                "l_i_file_acl_high l_i_uid_high l_i_gid_high l_i_checksum_lo l_i_reserved").split()
_InodeFields = namedtuple("_InodeFields", _INODE_NAMES)
_INODE_EXTRA = struct.Struct("<HHIIIII")
_InodeExtraFields = namedtuple("_InodeExtraFields", "i_extra_isize i_checksum_hi i_ctime_extra i_mtime_extra "
                                                    "i_atime_extra i_crtime i_crtime_extra")


def _fast_inode(raw: bytes) -> _InodeFields:
    v = _INODE.unpack_from(raw)
    return _InodeFields(*v[:12], v[12:27], *v[27:])


# What a walk needs of an inode, in one unpack (offsets as in Inode/InodeExtra
# above): i_mode, i_uid, i_size_lo, i_atime, i_ctime, i_mtime, i_gid,
# i_links_count, i_flags, i_file_acl_lo, i_size_high, l_i_file_acl_high,
# l_i_uid_high, l_i_gid_high; then i_extra_isize, i_ctime_extra,
# i_mtime_extra, i_atime_extra. A test checks it against the full parse.
_WALK_CORE = "<HHIIII4xHH4xI68xII4x2xHHH4x"
_WALK = struct.Struct(_WALK_CORE)
_WALK_EXTRA = struct.Struct(_WALK_CORE + "H2xIII")
_WALK_EXTRA_MIN = 0x8C + 4 - 128   # i_extra_isize reaching i_atime_extra: all three extra times there


InodeExtra = Struct(                     # after 128, present as far as i_extra_isize says
    "i_extra_isize" / Int16ul,           # 0x80
    "i_checksum_hi" / Int16ul,
    "i_ctime_extra" / Int32ul,           # 0x84
    "i_mtime_extra" / Int32ul,           # 0x88
    "i_atime_extra" / Int32ul,           # 0x8C
    "i_crtime" / Int32ul,                # 0x90
    "i_crtime_extra" / Int32ul,          # 0x94
)

XattrBlockHeader = Struct(
    "h_magic" / Int32ul,
    "h_refcount" / Int32ul,
    "h_blocks" / Int32ul,
    "h_hash" / Int32ul,
    "h_checksum" / Int32ul,
    Padding(12),
)                                        # 32 bytes; entries follow
XattrEntry = Struct(
    "e_name_len" / Int8ul,
    "e_name_index" / Int8ul,
    "e_value_offs" / Int16ul,
    "e_value_inum" / Int32ul,
    "e_value_size" / Int32ul,
    "e_hash" / Int32ul,
)                                        # 16 bytes, then the name, padded to 4
XATTR_ENTRY_SIZE = 16

# ext4 on-disk ACL (fs/ext4/acl.h) and the kernel's xattr ACL (posix_acl_xattr.h).
Ext4AclHeader = Struct("a_version" / Int32ul)
EXT4_ACL_VERSION = 1
POSIX_ACL_XATTR_VERSION = 2
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = 1, 2, 4, 8, 0x10, 0x20
ACL_UNDEFINED_ID = 0xFFFFFFFF

# e_name_index -> prefix (fs/ext4/xattr.h).
NAME_INDEX = {
    1: "user.",
    2: "system.posix_acl_access",
    3: "system.posix_acl_default",
    4: "trusted.",
    6: "security.",
    7: "system.",
    8: "system.richacl",
}

INCOMPAT_META_BG = 0x10
INCOMPAT_64BIT = 0x80
INCOMPAT_EA_INODE = 0x400
RO_COMPAT_SPARSE_SUPER = 0x1
RO_COMPAT_HUGE_FILE = 0x8
RO_COMPAT_BIGALLOC = 0x200
COMPAT_SPARSE_SUPER2 = 0x200
BG_INODE_UNINIT = 0x1

EXTENTS_FL = 0x80000
INLINE_DATA_FL = 0x10000000
HUGE_FILE_FL = 0x40000
EA_INODE_FL = 0x200000
MAX_SYMLINK = 65536             # longer targets are damage (PATH_MAX is 4096)
INLINE_DATA_SIZE = 60            # i_block holds the first 60 bytes of inline data
MAX_MAPPED_BLOCKS = 1 << 22      # block_runs() refuses longer files (metadata use only)
EXTENT_MAGIC = 0xF30A
EXT_INIT_MAX_LEN = 32768       # ee_len above this: an unwritten extent
MAX_EXTENT_DEPTH = 5

ExtentHeader = Struct(
    "eh_magic" / Int16ul,
    "eh_entries" / Int16ul,
    "eh_max" / Int16ul,
    "eh_depth" / Int16ul,
    "eh_generation" / Int32ul,
)
ExtentLeaf = Struct("ee_block" / Int32ul, "ee_len" / Int16ul, "ee_start_hi" / Int16ul,
                    "ee_start_lo" / Int32ul)
ExtentIndex = Struct("ei_block" / Int32ul, "ei_leaf_lo" / Int32ul, "ei_leaf_hi" / Int16ul,
                     Padding(2))
# The same three for the block-mapping loop (a test checks they agree).
_EXTENT_HEADER = struct.Struct("<HHHHI")
_EXTENT_LEAF = struct.Struct("<IHHI")
_EXTENT_INDEX = struct.Struct("<IIH2x")

S_IFMT, S_IFCHR, S_IFBLK, S_IFDIR = 0o170000, 0o020000, 0o060000, 0o040000
_U32_CACHE: dict[int, struct.Struct] = {}


def _u32s(data: bytes) -> tuple[int, ...]:
    n = len(data) // 4
    fmt = _U32_CACHE.get(n)
    if fmt is None:
        fmt = _U32_CACHE[n] = struct.Struct(f"<{n}I")
    return fmt.unpack_from(data)

_EA_MAGIC = struct.pack("<I", EA_MAGIC)   # in-inode EA area marker, as stored

MAX_EA_VALUE = 64 << 20          # EA-inode values: the kernel's XATTR_SIZE_MAX is 64 KiB; be generous
MAX_XATTRS = 65536


@dataclass
class InodeTimes:
    """Timestamps in ns since the epoch; crtime is None when the inode has no room for it."""

    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    crtime_ns: int | None


def _decode_time(seconds: int, extra: int | None) -> int:
    """ext4_decode_extra_time: signed 32-bit seconds, plus 2 epoch bits << 32, plus ns."""
    sec = seconds - (1 << 32) if seconds & 0x80000000 else seconds
    if extra is None:
        return sec * 1_000_000_000
    sec += (extra & 3) << 32
    return sec * 1_000_000_000 + ((extra >> 2) & 0x3FFFFFFF)


def ext4_acl_to_xattr(data: bytes) -> bytes:
    """ext4's compact on-disk ACL -> the posix_acl_xattr format getxattr returns
    (version 2 header, 8-byte entries, e_id 0xFFFFFFFF for the *_OBJ/MASK/OTHER tags).
    Raises ValueError for malformed data."""
    if len(data) < 4:
        raise ValueError(f"ACL of {len(data)} bytes has no header")
    version = Ext4AclHeader.parse(data).a_version
    if version == POSIX_ACL_XATTR_VERSION:
        return data  # already in xattr format (seen on some non-ext4 writers)
    if version != EXT4_ACL_VERSION:
        raise ValueError(f"ACL a_version={version:#x}, expected {EXT4_ACL_VERSION}")
    out = [struct.pack("<I", POSIX_ACL_XATTR_VERSION)]
    pos = 4
    while pos < len(data):
        if pos + 4 > len(data):
            raise ValueError(f"ACL entry at {pos} truncated")
        tag, perm = struct.unpack_from("<HH", data, pos)
        if tag in (ACL_USER, ACL_GROUP):
            if pos + 8 > len(data):
                raise ValueError(f"ACL entry at {pos} truncated")
            (ident,) = struct.unpack_from("<I", data, pos + 4)
            pos += 8
        elif tag in (ACL_USER_OBJ, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER):
            ident = ACL_UNDEFINED_ID
            pos += 4
        else:
            raise ValueError(f"ACL entry at {pos} has unknown e_tag={tag:#x}")
        out.append(struct.pack("<HHI", tag, perm, ident))
    return b"".join(out)


class ExtInodeReader:
    """Reads xattrs, device numbers and precise times of ext2/3/4 inodes.

    `source` is the filesystem's byte source (a partition window). Values stored in
    EA inodes (ea_inode feature) are read through the EA inode's extent tree or
    block map (`block_runs`, which the directory reader uses too).
    """

    def __init__(self, source: ByteSource) -> None:
        self.source = source
        self.name = source.name
        self._last = None   # (ino, parsed) of the last inode asked for
        self._descs: dict[int, tuple[int, int, int]] = {}   # group -> (inode table, bitmap, flags)
        self._table_at: dict[int, int] = {}   # group -> byte offset of its (valid) inode table
        self._chunks: dict[int, bytes] = {}   # inode table pieces, oldest first
        raw = self._read(SUPERBLOCK_OFFSET, 1024, "superblock")
        if len(raw) < 1024:
            raise FilesystemError("too small for an ext superblock", file=self.name)
        sb = Superblock.parse(raw)
        if sb.s_magic != EXT_MAGIC:
            raise FilesystemError(f"ext superblock s_magic={sb.s_magic:#06x}, expected 0xef53",
                                  file=self.name)
        if sb.s_log_block_size > 6:  # 64 KiB is the largest ext4 block
            raise FilesystemError(f"ext superblock s_log_block_size={sb.s_log_block_size} is "
                                  "out of range", file=self.name)
        self.sb = sb
        self.block_size = 1024 << sb.s_log_block_size
        self.inodes_count = sb.s_inodes_count
        self.inodes_per_group = sb.s_inodes_per_group
        self.inode_size = sb.s_inode_size if sb.s_rev_level >= 1 else 128
        if (self.inode_size < 128 or self.inode_size > self.block_size
                or self.inode_size & (self.inode_size - 1)):
            raise FilesystemError(f"ext superblock s_inode_size={self.inode_size} is invalid",
                                  file=self.name)
        if not 0 < self.inodes_per_group <= self.block_size * 8:
            raise FilesystemError(f"ext superblock s_inodes_per_group={self.inodes_per_group} "
                                  "is invalid", file=self.name)
        self.is_64bit = bool(sb.s_feature_incompat & INCOMPAT_64BIT)
        self.desc_size = sb.s_desc_size if self.is_64bit else 32
        if self.desc_size < 32 or self.desc_size > self.block_size or self.desc_size & (self.desc_size - 1):
            raise FilesystemError(f"ext superblock s_desc_size={self.desc_size} is invalid",
                                  file=self.name)
        self.blocks_count = sb.s_blocks_count_lo | (sb.s_blocks_count_hi << 32 if self.is_64bit else 0)
        if sb.s_blocks_per_group == 0:
            raise FilesystemError("ext superblock s_blocks_per_group=0", file=self.name)
        self.group_count = -(-(self.blocks_count - sb.s_first_data_block) // sb.s_blocks_per_group)
        self.descs_per_block = self.block_size // self.desc_size
        self.ea_inode = bool(sb.s_feature_incompat & INCOMPAT_EA_INODE)
        self.cluster_size = (1024 << min(sb.s_log_cluster_size, 30) if sb.s_feature_ro_compat & RO_COMPAT_BIGALLOC
                             else self.block_size)
        self._desc_blocks: dict[int, bytes] = {}   # descriptor block number -> bytes
        self._warned_ea_inode = False

    # -- low level ---------------------------------------------------------------

    def _inode_bytes(self, offset: int, ino: int) -> bytes:
        """Inodes are read in 64 KiB pieces of the inode table (a walk asks for
        neighbours in a row): one read per 256 inodes instead of one each."""
        base = offset - offset % INODE_CHUNK
        chunk = self._chunks.get(base)
        if chunk is None:
            try:
                chunk = self._read(base, INODE_CHUNK, f"inode table near inode {ino}")
            except FileReadError:   # a damaged piece: fall back to the inode alone
                return self._read(offset, self.inode_size, f"inode {ino}")
            if len(self._chunks) >= INODE_CHUNKS_CACHED:
                self._chunks.pop(next(iter(self._chunks)))
            self._chunks[base] = chunk
        start = offset - base
        if start + self.inode_size > len(chunk):   # straddles a piece or the end of the image
            return self._read(offset, self.inode_size, f"inode {ino}")
        return chunk[start:start + self.inode_size]

    def _read(self, offset: int, length: int, what: str) -> bytes:
        try:
            return self.source.read(offset, length)
        except DamagedRange as exc:
            raise FileReadError(f"{self.name}: {what} at byte {offset} is damaged: {exc}") from None

    def read_blocks(self, block: int, count: int, what: str) -> bytes:
        """`count` whole blocks from `block` on; FileReadError when damaged or
        past the end of the image."""
        data = self._read(block * self.block_size, count * self.block_size, what)
        if len(data) < count * self.block_size:
            raise FileReadError(f"{self.name}: {what}: block {block}+{count} is past the end of the image")
        return data

    def _bg_has_super(self, group: int) -> bool:
        if group == 0:
            return True
        if self.sb.s_feature_compat & COMPAT_SPARSE_SUPER2:
            return group in tuple(self.sb.s_backup_bgs)
        if not self.sb.s_feature_ro_compat & RO_COMPAT_SPARSE_SUPER or group == 1:
            return True
        if group & 1 == 0:
            return False
        for base in (3, 5, 7):
            n = base
            while n < group:
                n *= base
            if n == group:
                return True
        return False

    def _desc_block_location(self, nr: int) -> int:
        """fs/ext4/super.c descriptor_loc(): where descriptor block `nr` lives."""
        first = self.sb.s_first_data_block
        if not self.sb.s_feature_incompat & INCOMPAT_META_BG or nr < self.sb.s_first_meta_bg:
            return first + 1 + nr
        bg = self.descs_per_block * nr
        return first + bg * self.sb.s_blocks_per_group + (1 if self._bg_has_super(bg) else 0)

    def _group_desc(self, group: int) -> tuple[int, int, int]:
        cached = self._descs.get(group)
        if cached is None:
            if len(self._descs) > 65536:   # bounded: metadata, not image size
                self._descs.clear()
            cached = self._descs[group] = self._read_group_desc(group)
        return cached

    def _read_group_desc(self, group: int) -> tuple[int, int, int]:
        """(inode table block, inode bitmap block, bg_flags) of a block group."""
        if group >= self.group_count:
            raise FileReadError(f"{self.name}: block group {group} is past the last "
                                f"({self.group_count - 1})")
        nr, index = divmod(group, self.descs_per_block)
        block = self._desc_blocks.get(nr)
        if block is None:
            loc = self._desc_block_location(nr)
            block = self._read(loc * self.block_size, self.block_size, "group descriptors")
            if len(block) < self.block_size:
                raise FileReadError(f"{self.name}: group descriptor block {loc} is past the "
                                    "end of the filesystem")
            self._desc_blocks[nr] = block
        off = index * self.desc_size
        d = GroupDesc32.parse(block[off:off + 0x14])
        table, bitmap = d.bg_inode_table_lo, d.bg_inode_bitmap_lo
        if self.is_64bit and self.desc_size >= 64:
            h = GroupDescHigh.parse(block[off + 0x20:off + 0x2C])
            table |= h.bg_inode_table_hi << 32
            bitmap |= h.bg_inode_bitmap_hi << 32
        return table, bitmap, d.bg_flags

    def _check_ino(self, ino: int) -> None:
        if not 1 <= ino <= self.inodes_count:
            raise FileReadError(f"{self.name}: inode {ino} is out of range "
                                f"(1..{self.inodes_count})")

    def inode_offset(self, ino: int) -> int:
        """Byte offset of the inode in the filesystem."""
        self._check_ino(ino)
        group, index = divmod(ino - 1, self.inodes_per_group)
        table, _, _ = self._group_desc(group)
        if table == 0 or table >= self.blocks_count:
            raise FileReadError(f"{self.name}: inode {ino}: group {group} inode table at block "
                                f"{table} is outside the filesystem")
        if len(self._table_at) < 65536:   # bounded like _descs
            self._table_at[group] = table * self.block_size
        return table * self.block_size + index * self.inode_size

    def raw_inode(self, ino: int) -> bytes:
        """The inode's on-disk bytes (s_inode_size of them)."""
        # The walk's path: a group already located, its piece of the table held.
        table_at = self._table_at.get((ino - 1) // self.inodes_per_group) if 0 < ino <= self.inodes_count else None
        if table_at is not None:
            offset = table_at + (ino - 1) % self.inodes_per_group * self.inode_size
            start = offset % INODE_CHUNK
            chunk = self._chunks.get(offset - start)
            if chunk is not None and start + self.inode_size <= len(chunk):
                return chunk[start:start + self.inode_size]
        offset = self.inode_offset(ino)
        data = self._inode_bytes(offset, ino)
        if len(data) < self.inode_size:
            raise FileReadError(f"{self.name}: inode {ino} at byte {offset} is past the end "
                                "of the image")
        return data

    def in_use(self, ino: int) -> bool:
        """Whether the inode bitmap marks the inode allocated."""
        self._check_ino(ino)
        group, index = divmod(ino - 1, self.inodes_per_group)
        _, bitmap, flags = self._group_desc(group)
        if flags & BG_INODE_UNINIT:
            return False
        if bitmap == 0 or bitmap >= self.blocks_count:
            raise FileReadError(f"{self.name}: group {group} inode bitmap at block {bitmap} "
                                "is outside the filesystem")
        byte = self._read(bitmap * self.block_size + index // 8, 1, "inode bitmap")
        return bool(byte) and bool(byte[0] >> (index % 8) & 1)

    def _parse(self, ino: int):
        # times(), rdev() and xattrs() ask for the same inode in a row: keep the last one.
        if self._last is not None and self._last[0] == ino:
            return self._last[1]
        raw = self.raw_inode(ino)
        inode = _fast_inode(raw)
        extra_isize = 0
        extra = None
        if self.inode_size > 128:
            extra_isize = struct.unpack_from("<H", raw, 128)[0]
            if 128 + extra_isize > self.inode_size or extra_isize & 3:
                # The kernel refuses such an inode; its 128 core bytes are read as
                # a 128-byte inode's (as TSK reads them: handing it to TSK cost up
                # to a minute of block mapping when i_size is absurd too).
                log.debug("%s: inode %d: i_extra_isize=%d does not fit a %d-byte inode; its core fields "
                          "only", self.name, ino, extra_isize, self.inode_size)
                extra_isize = 0
            else:
                extra = _InodeExtraFields._make(_INODE_EXTRA.unpack(raw[128:128 + 24].ljust(24, b"\0")))
        parsed = raw, inode, extra_isize, extra
        self._last = (ino, parsed)
        return parsed

    # -- public API --------------------------------------------------------------

    def parsed(self, ino: int) -> tuple[bytes, _InodeFields, int, _InodeExtraFields | None]:
        """(raw bytes, core fields, i_extra_isize, extra fields or None) of an
        inode: one parse for everything a walk wants of it (times_of, rdev,
        xattrs, single_run). Raises FileReadError / ValueError / struct.error."""
        return self._parse(ino)

    def times(self, ino: int) -> InodeTimes:
        return self.times_of(self._parse(ino))

    @staticmethod
    def times_of(parsed: tuple) -> InodeTimes:
        _, inode, extra_isize, extra = parsed
        # EXT4_FITS_IN_INODE: a 4-byte field at offset o exists when o + 4 <= 128 + i_extra_isize.
        end = 128 + extra_isize if extra is not None else 0
        ctime_x = extra.i_ctime_extra if end >= 0x84 + 4 else None
        mtime_x = extra.i_mtime_extra if end >= 0x88 + 4 else None
        atime_x = extra.i_atime_extra if end >= 0x8C + 4 else None
        crtime = None
        if end >= 0x90 + 4:
            crtime = _decode_time(extra.i_crtime, extra.i_crtime_extra if end >= 0x94 + 4 else None)
        return InodeTimes(
            atime_ns=_decode_time(inode.i_atime, atime_x),
            mtime_ns=_decode_time(inode.i_mtime, mtime_x),
            ctime_ns=_decode_time(inode.i_ctime, ctime_x),
            crtime_ns=crtime,
        )

    def rdev(self, ino: int, parsed: tuple | None = None) -> tuple[int, int] | None:
        """(major, minor) of a character or block device, else None."""
        _, inode, _, _ = parsed or self._parse(ino)
        if inode.i_mode & S_IFMT not in (S_IFCHR, S_IFBLK):
            return None
        old, new = inode.i_block[0], inode.i_block[1]
        if old:   # old_decode_dev: 8-bit major, 8-bit minor
            return (old >> 8) & 0xFF, old & 0xFF
        # new_decode_dev: 12-bit major, 20-bit minor split around it
        return (new & 0xFFF00) >> 8, (new & 0xFF) | ((new >> 12) & 0xFFF00)

    def walk_fields(self, ino: int) -> tuple | None:
        """(i_mode, uid, gid, i_size, atime_ns, mtime_ns, ctime_ns, i_links_count,
        i_flags, may have xattrs, raw bytes) of an inode in one unpack: the
        per-inode cost of listing a directory. None when the inode needs the
        full parse (an inode too small for all three extra times, a bad
        i_extra_isize: parsed() says what is wrong). Raises FileReadError."""
        raw = self.raw_inode(ino)
        if self.inode_size >= _WALK_EXTRA.size:
            (mode, uid, size_lo, atime, ctime, mtime, gid, links, flags, acl_lo, size_hi, acl_hi, uid_hi, gid_hi,
             extra_isize, ctime_x, mtime_x, atime_x) = _WALK_EXTRA.unpack_from(raw)
            if extra_isize < _WALK_EXTRA_MIN or extra_isize & 3 or 128 + extra_isize > self.inode_size:
                return None
            ea_at = 128 + extra_isize
            xattrs = bool(acl_lo or acl_hi) or (ea_at + 4 <= self.inode_size and raw[ea_at:ea_at + 4] == _EA_MAGIC)
            # ext4_decode_extra_time, inline (see _decode_time)
            atime_ns = ((atime - ((atime & 0x80000000) << 1) + ((atime_x & 3) << 32)) * 1_000_000_000
                        + ((atime_x >> 2) & 0x3FFFFFFF))
            mtime_ns = ((mtime - ((mtime & 0x80000000) << 1) + ((mtime_x & 3) << 32)) * 1_000_000_000
                        + ((mtime_x >> 2) & 0x3FFFFFFF))
            ctime_ns = ((ctime - ((ctime & 0x80000000) << 1) + ((ctime_x & 3) << 32)) * 1_000_000_000
                        + ((ctime_x >> 2) & 0x3FFFFFFF))
        elif self.inode_size == 128:
            (mode, uid, size_lo, atime, ctime, mtime, gid, links, flags, acl_lo, size_hi, acl_hi, uid_hi,
             gid_hi) = _WALK.unpack_from(raw)
            xattrs = bool(acl_lo or acl_hi)
            atime_ns = (atime - ((atime & 0x80000000) << 1)) * 1_000_000_000
            mtime_ns = (mtime - ((mtime & 0x80000000) << 1)) * 1_000_000_000
            ctime_ns = (ctime - ((ctime & 0x80000000) << 1)) * 1_000_000_000
        else:
            return None
        return (mode, uid | (uid_hi << 16), gid | (gid_hi << 16), size_lo | (size_hi << 32), atime_ns, mtime_ns,
                ctime_ns, links, flags, xattrs, raw)

    def single_run(self, raw: bytes, flags: int, size: int) -> int | None:
        """Where on the volume (a byte offset) a file of `size` bytes lies in
        one piece from its first block: one written extent from block 0 in the
        inode, or contiguous direct block pointers. None for anything else
        (inline, several extents, holes, a pointer outside the filesystem):
        mapped_runs then maps it and says what is wrong. The walk asks this
        while it holds the raw inode, so a small file is parsed once."""
        if flags & INLINE_DATA_FL or size <= 0:
            return None
        bs = self.block_size
        nblocks = -(-size // bs)
        if flags & EXTENTS_FL:
            eh_magic, eh_entries, _, eh_depth, _ = _EXTENT_HEADER.unpack_from(raw, 0x28)
            if eh_magic != EXTENT_MAGIC or eh_entries != 1 or eh_depth:
                return None
            ee_block, ee_len, ee_start_hi, ee_start_lo = _EXTENT_LEAF.unpack_from(raw, 0x28 + 12)
            pblk = ee_start_lo | (ee_start_hi << 32)
            if ee_block or ee_len > EXT_INIT_MAX_LEN or ee_len < nblocks:
                return None
        else:
            if nblocks > 12:
                return None
            ptrs = _u32s(raw[0x28:0x28 + 4 * nblocks])
            pblk = ptrs[0]
            if ptrs != tuple(range(pblk, pblk + nblocks)):
                return None
        if pblk == 0 or pblk + nblocks > self.blocks_count:
            return None
        return pblk * bs

    def inode(self, ino: int) -> _InodeFields:
        """The inode's 128-byte core fields (i_mode, i_flags, i_block, ...)."""
        return self._parse(ino)[1]

    @staticmethod
    def size_of(inode: _InodeFields) -> int:
        return inode.i_size_lo | (inode.i_size_high << 32)

    def block_runs(self, ino: int, size: int | None = None, what: str | None = None) -> list[tuple[int, int, int]]:
        """(first logical block, first physical block, count) of every mapped
        block of the inode below its i_size (or `size`), in logical order; holes
        and unwritten extents are left out. For metadata-sized files (directories,
        EA values): raises FileReadError for a damaged map or more than
        MAX_MAPPED_BLOCKS blocks."""
        return [(lblk, pblk, count) for lblk, pblk, count, unwritten in self.mapped_runs(ino, size, what)
                if not unwritten]

    def mapped_runs(self, ino: int, size: int | None = None, what: str | None = None,
                    metadata: bool = True) -> list[tuple[int, int, int, bool]]:
        """(first logical block, first physical block, count, unwritten) of every
        mapped block below i_size (or `size`), in logical order, neighbours that
        continue each other merged; holes left out, unwritten (preallocated)
        extents flagged. `metadata=False` maps files of any length (file data);
        the number of runs stays bounded by MAX_MAPPED_BLOCKS either way.
        Raises FileReadError for a damaged map."""
        inode = self.inode(ino)
        what = what or f"{self.name}: inode {ino}"
        size = self.size_of(inode) if size is None else size
        nblocks = -(-size // self.block_size)
        if metadata and nblocks > MAX_MAPPED_BLOCKS:
            raise FileReadError(f"{what}: {size} bytes are too many to map")
        if inode.i_flags & INLINE_DATA_FL or not nblocks:
            return []
        runs: list[tuple[int, int, int, bool]] = []
        if inode.i_flags & EXTENTS_FL:
            raw = self._parse(ino)[0]
            eh_magic, eh_entries, _, eh_depth, _ = _EXTENT_HEADER.unpack_from(raw, 0x28)
            if eh_magic == EXTENT_MAGIC and eh_entries == 1 and eh_depth == 0:
                # most files: one extent in the inode itself (the per-file fast path)
                ee_block, ee_len, ee_start_hi, ee_start_lo = _EXTENT_LEAF.unpack_from(raw, 0x28 + 12)
                pblk, unwritten = ee_start_lo | (ee_start_hi << 32), ee_len > EXT_INIT_MAX_LEN
                count = min(ee_len - EXT_INIT_MAX_LEN if unwritten else ee_len, nblocks - ee_block)
                if count <= 0:
                    return []
                if not unwritten and (pblk == 0 or pblk + count > self.blocks_count):
                    raise FileReadError(f"{what}: block {pblk}+{count} is outside the filesystem "
                                        f"({self.blocks_count} blocks)")
                return [(ee_block, pblk, count, unwritten)]
            self._extent_runs(self._parse(ino)[0][0x28:0x28 + 60], MAX_EXTENT_DEPTH, nblocks, runs, what, [0])
            runs.sort()
        else:
            self._map_runs(inode.i_block, nblocks, runs, what)
        merged: list[tuple[int, int, int, bool]] = []
        last_end = 0
        for run in runs:
            lblk, pblk, count, unwritten = run
            if not unwritten and (pblk == 0 or pblk + count > self.blocks_count):
                raise FileReadError(f"{what}: block {pblk}+{count} is outside the filesystem "
                                    f"({self.blocks_count} blocks)")
            if lblk < last_end:
                raise FileReadError(f"{what}: logical block {lblk} is mapped twice")
            last_end = lblk + count
            if merged:
                prev = merged[-1]
                if prev[3] == unwritten and prev[0] + prev[2] == lblk and prev[1] + prev[2] == pblk:
                    merged[-1] = (prev[0], prev[1], prev[2] + count, unwritten)
                    continue
            merged.append(run)
        return merged

    def read_head(self, ino: int, size: int, what: str) -> bytes:
        """The first `size` bytes of an inode's data (holes and unwritten
        extents read as zeros): EA-inode values."""
        out = bytearray(size)
        bs = self.block_size
        for lblk, pblk, count in self.block_runs(ino, size, what):
            pos = lblk * bs
            n = min(count * bs, size - pos)
            out[pos:pos + n] = memoryview(self.read_blocks(pblk, count, what))[:n]
        return bytes(out)

    def _extent_runs(self, node: bytes, depth_left: int, nblocks: int, runs: list, what: str,
                     visited: list[int]) -> None:
        eh_magic, eh_entries, _, eh_depth, _ = _EXTENT_HEADER.unpack_from(node)
        if eh_magic != EXTENT_MAGIC or 12 + eh_entries * 12 > len(node):
            raise FileReadError(f"{what}: bad extent header (eh_magic={eh_magic:#x}, eh_entries={eh_entries})")
        if eh_depth > depth_left:
            raise FileReadError(f"{what}: extent tree eh_depth={eh_depth} too deep")
        for i in range(eh_entries):
            if eh_depth:
                _, ei_leaf_lo, ei_leaf_hi = _EXTENT_INDEX.unpack_from(node, 12 + i * 12)
                child = ei_leaf_lo | (ei_leaf_hi << 32)
                if child == 0 or child >= self.blocks_count:
                    raise FileReadError(f"{what}: extent index points at block {child}")
                visited[0] += 1
                if visited[0] > MAX_MAPPED_BLOCKS // 64:
                    raise FileReadError(f"{what}: extent tree has too many index blocks")
                block = self._read(child * self.block_size, self.block_size, f"{what} extent block")
                if len(block) < self.block_size:
                    raise FileReadError(f"{what}: extent block {child} is past the end of the image")
                self._extent_runs(block, eh_depth - 1, nblocks, runs, what, visited)
                continue
            ee_block, ee_len, ee_start_hi, ee_start_lo = _EXTENT_LEAF.unpack_from(node, 12 + i * 12)
            # ext4_ext_is_unwritten: a length above EXT_INIT_MAX_LEN (32768) marks a
            # preallocated extent of ee_len - 32768 blocks that reads as zeros.
            unwritten = ee_len > EXT_INIT_MAX_LEN
            if unwritten:
                ee_len -= EXT_INIT_MAX_LEN
            if ee_block >= nblocks:
                continue   # past i_size
            count = min(ee_len, nblocks - ee_block)
            if count:
                runs.append((ee_block, ee_start_lo | (ee_start_hi << 32), count, unwritten))
            if len(runs) > MAX_MAPPED_BLOCKS:
                raise FileReadError(f"{what}: more than {MAX_MAPPED_BLOCKS} extents")

    def _map_runs(self, i_block, nblocks: int, runs: list, what: str) -> None:
        """Classic block map: 12 direct pointers, then single, double and triple
        indirect blocks (each a block of 32-bit pointers)."""
        per = self.block_size // 4
        self._pointer_runs(i_block[:min(12, nblocks)], 0, runs, what)
        lblk = 12
        for level, top in ((1, i_block[12]), (2, i_block[13]), (3, i_block[14])):
            span = per ** level
            if lblk >= nblocks:
                return
            if top:
                self._indirect_runs(top, level, lblk, nblocks, runs, what)
            lblk += span

    @staticmethod
    def _pointer_runs(ptrs, lblk: int, runs: list, what: str) -> None:
        """Runs of a list of block pointers from logical block `lblk` (0 = a hole),
        merged as they go. A fully contiguous list (the usual case: a file written
        in one go) is one comparison in C, not a Python step per block."""
        n = len(ptrs)
        if not n:
            return
        first = ptrs[0]
        if first and ptrs[-1] == first + n - 1 and tuple(ptrs) == tuple(range(first, first + n)):
            pieces = (((lblk, first, n, False)),)
        else:
            pieces = ((lblk + i, p, 1, False) for i, p in enumerate(ptrs) if p)
        for piece in pieces:
            if runs:
                prev = runs[-1]
                if prev[0] + prev[2] == piece[0] and prev[1] + prev[2] == piece[1]:
                    runs[-1] = (prev[0], prev[1], prev[2] + piece[2], False)
                    continue
            runs.append(piece)
            if len(runs) > MAX_MAPPED_BLOCKS:
                raise FileReadError(f"{what}: more than {MAX_MAPPED_BLOCKS} separate runs")

    def _indirect_runs(self, block: int, level: int, lblk: int, nblocks: int, runs: list, what: str) -> None:
        if block >= self.blocks_count:
            raise FileReadError(f"{what}: indirect block {block} is outside the filesystem")
        data = self._read(block * self.block_size, self.block_size, f"{what} indirect block")
        if len(data) < self.block_size:
            raise FileReadError(f"{what}: indirect block {block} is past the end of the image")
        ptrs = _u32s(data)
        if level == 1:
            self._pointer_runs(ptrs[:max(0, nblocks - lblk)], lblk, runs, what)
            return
        span = (self.block_size // 4) ** (level - 1)
        for i, ptr in enumerate(ptrs):
            first = lblk + i * span
            if first >= nblocks:
                return
            if ptr:
                self._indirect_runs(ptr, level - 1, first, nblocks, runs, what)

    def symlink_target(self, ino: int, limit: int = MAX_SYMLINK) -> bytes:
        """A symlink's target as stored: in i_block (a fast symlink), in inline
        data, or in its data block(s) (a slow one), at most `limit` bytes.
        ext4_inode_is_fast_symlink: no blocks besides an EA block means i_block
        holds the text (an EA inode: i_size below 60)."""
        raw, inode, _, _ = self._parse(ino)
        size = min(self.size_of(inode), limit)
        if inode.i_flags & INLINE_DATA_FL:
            return self.inline_data(ino)[:size]
        if inode.i_flags & EA_INODE_FL:
            fast = size < INLINE_DATA_SIZE
        else:
            blocks = inode.i_blocks_lo
            if self.sb.s_feature_ro_compat & RO_COMPAT_HUGE_FILE:
                blocks |= inode.l_i_blocks_high << 32
                if inode.i_flags & HUGE_FILE_FL:
                    blocks *= self.block_size >> 9
            has_ea = inode.i_file_acl_lo or inode.l_i_file_acl_high
            fast = blocks - (self.cluster_size >> 9 if has_ea else 0) == 0
        if fast:
            return raw[0x28:0x28 + min(size, INLINE_DATA_SIZE)]
        return self.read_head(ino, size, f"{self.name}: symlink inode {ino}")

    def inline_data(self, ino: int) -> bytes:
        """An inline-data inode's bytes: the 60 bytes of i_block, then the value
        of its in-inode `system.data` attribute (fs/ext4/inline.c)."""
        raw, _, extra_isize, _ = self._parse(ino)
        data = raw[0x28:0x28 + INLINE_DATA_SIZE]
        found: dict[str, bytes] = {}
        start = 128 + extra_isize
        if self.inode_size > 128 and start + 4 <= self.inode_size and \
                struct.unpack_from("<I", raw, start)[0] == EA_MAGIC:
            area = raw[start + 4:]
            self._parse_entries(area, 0, area, ino, "in-inode EA area", found, keep_data=True)
        return data + found.get("system.data", b"")

    def xattrs(self, ino: int, parsed: tuple | None = None) -> dict[str, bytes]:
        """All extended attributes, named and valued as getxattr(2) on a mount shows
        them (POSIX ACLs converted to the kernel's xattr format; the inline-data
        marker `system.data` left out, as the kernel does). Raises FileReadError
        for a damaged EA area or block. `parsed`: the inode's parsed() already in hand."""
        raw, inode, extra_isize, _ = parsed or self._parse(ino)
        found: dict[str, bytes] = {}
        # In-inode EAs: magic right after the extra fields, entries after it; value
        # offsets count from the first entry.
        start = 128 + extra_isize
        if self.inode_size > 128 and start + 4 <= self.inode_size:
            if struct.unpack_from("<I", raw, start)[0] == EA_MAGIC:
                area = raw[start + 4:]
                self._parse_entries(area, 0, area, ino, "in-inode EA area", found)
        acl_block = inode.i_file_acl_lo | (inode.l_i_file_acl_high << 32)
        if acl_block:
            if acl_block >= self.blocks_count:
                raise FileReadError(f"{self.name}: inode {ino}: i_file_acl={acl_block} is past "
                                    f"the last block ({self.blocks_count - 1})")
            block = self._read(acl_block * self.block_size, self.block_size, f"EA block {acl_block}")
            if len(block) < self.block_size:
                raise FileReadError(f"{self.name}: inode {ino}: EA block {acl_block} is past the "
                                    "end of the image")
            hdr = XattrBlockHeader.parse(block)
            if hdr.h_magic != EA_MAGIC:
                raise FileReadError(f"{self.name}: inode {ino}: EA block {acl_block} has "
                                    f"h_magic={hdr.h_magic:#x}, expected {EA_MAGIC:#x}")
            if hdr.h_blocks != 1:
                raise FileReadError(f"{self.name}: inode {ino}: EA block {acl_block} has "
                                    f"h_blocks={hdr.h_blocks}, expected 1")
            self._parse_entries(block, 32, block, ino, f"EA block {acl_block}", found)
        return found

    def _parse_entries(self, area: bytes, pos: int, values: bytes, ino: int, where: str,
                       found: dict[str, bytes], keep_data: bool = False) -> None:
        """Walk ext4_xattr_entry records in `area` from `pos` until the 4 zero bytes;
        `values` is the buffer e_value_offs counts in (same buffer here in both cases)."""
        what = f"{self.name}: inode {ino}: {where}"
        count = 0
        while True:
            if pos + 4 > len(area):
                raise FileReadError(f"{what}: entry list runs past the end at byte {pos}")
            if area[pos:pos + 4] == b"\0\0\0\0":
                return
            if pos + XATTR_ENTRY_SIZE > len(area):
                raise FileReadError(f"{what}: entry at byte {pos} is truncated")
            count += 1
            if count > MAX_XATTRS:
                raise FileReadError(f"{what}: more than {MAX_XATTRS} entries")
            e = XattrEntry.parse(area[pos:pos + XATTR_ENTRY_SIZE])
            name_end = pos + XATTR_ENTRY_SIZE + e.e_name_len
            if name_end > len(area):
                raise FileReadError(f"{what}: entry at byte {pos} e_name_len={e.e_name_len} "
                                    "runs past the end")
            suffix = area[pos + XATTR_ENTRY_SIZE:name_end]
            pos = (name_end + 3) & ~3
            prefix = NAME_INDEX.get(e.e_name_index)
            if prefix is None:
                if e.e_name_index == 9:
                    continue  # fscrypt context: internal, never listed by the kernel
                log.warning("%s: xattr with unknown e_name_index=%d skipped", what, e.e_name_index)
                continue
            name = prefix + suffix.decode("utf-8", "surrogateescape")
            if e.e_value_inum:
                value = self._ea_inode_value(e.e_value_inum, e.e_value_size, what, name)
                if value is None:
                    continue
            else:
                end = e.e_value_offs + e.e_value_size
                if e.e_value_size and end > len(values):
                    raise FileReadError(f"{what}: {name}: value at {e.e_value_offs}+"
                                        f"{e.e_value_size} is outside the {len(values)}-byte area")
                value = values[e.e_value_offs:end] if e.e_value_size else b""
            if name == "system.data" and not keep_data:
                continue  # inline-data marker, not listed by the kernel
            if e.e_name_index in (2, 3):
                try:
                    value = ext4_acl_to_xattr(value)
                except ValueError as exc:
                    raise FileReadError(f"{what}: {name}: {exc}") from None
            found[name] = value

    def _ea_inode_value(self, value_ino: int, size: int, what: str, name: str) -> bytes | None:
        if not self.ea_inode:
            raise FileReadError(f"{what}: {name}: e_value_inum={value_ino} but the filesystem "
                                "has no ea_inode feature")
        if size > MAX_EA_VALUE:
            raise FileReadError(f"{what}: {name}: EA inode value of {size} bytes is too large")
        self._check_ino(value_ino)
        return self.read_head(value_ino, size, f"{what}: {name}: EA inode {value_ino}")
