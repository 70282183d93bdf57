"""btrfs on-disk structures, declared once.

References:
- btrfs documentation, "On-disk Format" (https://btrfs.readthedocs.io/en/latest/dev/On-disk-format.html)
- Linux include/uapi/linux/btrfs_tree.h (keys, item structs, block group flags),
  include/uapi/linux/btrfs.h (feature flags), fs/btrfs/fs.h (BTRFS_FEATURE_INCOMPAT_SUPP),
  fs/btrfs/disk-io.c (btrfs_validate_super, super mirrors), fs/btrfs/volumes.c (chunk mapping),
  fs/btrfs/accessors.h (btrfs_super_block field layout).

All integers are little-endian. The `construct` Structs describe the layout (and
build test images); hot paths (one parse per item) use the `struct` twins below
them, checked against the Structs by tests.
"""

from __future__ import annotations

import struct

from construct import Array, Bytes, Const, Int8ul, Int16ul, Int32ul, Int64sl, Int64ul, Padding, Struct

MAGIC = b"_BHRfS_M"
SUPER_INFO_OFFSET = 0x10000          # primary superblock at 64 KiB
SUPER_INFO_SIZE = 4096
SUPER_MIRROR_SHIFT = 12              # mirrors at 16 KiB << (12 * i): 64 MiB, 256 GiB
SUPER_MIRRORS = (SUPER_INFO_OFFSET, 0x4000 << 12, 0x4000 << 24)

DiskKey = Struct(
    "objectid" / Int64ul,
    "type" / Int8ul,
    "offset" / Int64ul,
)
DISK_KEY = struct.Struct("<QBQ")     # 17 bytes

DevItem = Struct(                    # struct btrfs_dev_item, 98 bytes
    "devid" / Int64ul,
    "total_bytes" / Int64ul,
    "bytes_used" / Int64ul,
    "io_align" / Int32ul,
    "io_width" / Int32ul,
    "sector_size" / Int32ul,
    "type" / Int64ul,
    "generation" / Int64ul,
    "start_offset" / Int64ul,
    "dev_group" / Int32ul,
    "seek_speed" / Int8ul,
    "bandwidth" / Int8ul,
    "uuid" / Bytes(16),
    "fsid" / Bytes(16),
)

Superblock = Struct(                 # struct btrfs_super_block (4096 bytes at 64 KiB)
    "csum" / Bytes(32),              # 0x000 over bytes 0x20..0x1000
    "fsid" / Bytes(16),              # 0x020
    "bytenr" / Int64ul,              # 0x030 where this copy lives
    "flags" / Int64ul,               # 0x038
    "magic" / Const(MAGIC),          # 0x040
    "generation" / Int64ul,          # 0x048
    "root" / Int64ul,                # 0x050 root tree (logical)
    "chunk_root" / Int64ul,          # 0x058
    "log_root" / Int64ul,            # 0x060
    "log_root_transid" / Int64ul,    # 0x068 (unused)
    "total_bytes" / Int64ul,         # 0x070
    "bytes_used" / Int64ul,          # 0x078
    "root_dir_objectid" / Int64ul,   # 0x080 (6)
    "num_devices" / Int64ul,         # 0x088
    "sectorsize" / Int32ul,          # 0x090
    "nodesize" / Int32ul,            # 0x094
    "leafsize" / Int32ul,            # 0x098 (unused, = nodesize)
    "stripesize" / Int32ul,          # 0x09c
    "sys_chunk_array_size" / Int32ul,  # 0x0a0
    "chunk_root_generation" / Int64ul,  # 0x0a4
    "compat_flags" / Int64ul,        # 0x0ac
    "compat_ro_flags" / Int64ul,     # 0x0b4
    "incompat_flags" / Int64ul,      # 0x0bc
    "csum_type" / Int16ul,           # 0x0c4
    "root_level" / Int8ul,           # 0x0c6
    "chunk_root_level" / Int8ul,     # 0x0c7
    "log_root_level" / Int8ul,       # 0x0c8
    "dev_item" / DevItem,            # 0x0c9
    "label" / Bytes(256),            # 0x12b
    "cache_generation" / Int64ul,    # 0x22b
    "uuid_tree_generation" / Int64ul,  # 0x233
    "metadata_uuid" / Bytes(16),     # 0x23b
    "nr_global_roots" / Int64ul,     # 0x24b
    Padding(0x32B - 0x253),          # reserved
    "sys_chunk_array" / Bytes(2048),  # 0x32b
    Padding(SUPER_INFO_SIZE - 0xB2B),  # super_roots backups, padding
)

Header = Struct(                     # struct btrfs_header, 101 bytes at the start of every tree block
    "csum" / Bytes(32),
    "fsid" / Bytes(16),
    "bytenr" / Int64ul,
    "flags" / Int64ul,
    "chunk_tree_uuid" / Bytes(16),
    "generation" / Int64ul,
    "owner" / Int64ul,
    "nritems" / Int32ul,
    "level" / Int8ul,
)
HEADER_SIZE = 101
# bytenr, flags, chunk_tree_uuid, generation, owner, nritems, level (after csum + fsid)
HEADER = struct.Struct("<QQ16sQQIB")

Item = Struct(                       # struct btrfs_item: leaf item header
    "key" / DiskKey,
    "offset" / Int32ul,              # of the data, from the end of the header
    "size" / Int32ul,
)
ITEM = struct.Struct("<QBQII")       # 25 bytes

KeyPtr = Struct(                     # struct btrfs_key_ptr: node entry
    "key" / DiskKey,
    "blockptr" / Int64ul,
    "generation" / Int64ul,
)
KEY_PTR = struct.Struct("<QBQQQ")    # 33 bytes

Stripe = Struct(
    "devid" / Int64ul,
    "offset" / Int64ul,
    "dev_uuid" / Bytes(16),
)
STRIPE = struct.Struct("<QQ16s")     # 32 bytes

Chunk = Struct(                      # struct btrfs_chunk (stripes follow)
    "length" / Int64ul,
    "owner" / Int64ul,
    "stripe_len" / Int64ul,
    "type" / Int64ul,
    "io_align" / Int32ul,
    "io_width" / Int32ul,
    "sector_size" / Int32ul,
    "num_stripes" / Int16ul,
    "sub_stripes" / Int16ul,
)
CHUNK = struct.Struct("<QQQQIIIHH")  # 48 bytes

Timespec = Struct("sec" / Int64sl, "nsec" / Int32ul)

InodeItem = Struct(                  # struct btrfs_inode_item, 160 bytes
    "generation" / Int64ul,
    "transid" / Int64ul,
    "size" / Int64ul,
    "nbytes" / Int64ul,
    "block_group" / Int64ul,
    "nlink" / Int32ul,
    "uid" / Int32ul,
    "gid" / Int32ul,
    "mode" / Int32ul,
    "rdev" / Int64ul,
    "flags" / Int64ul,
    "sequence" / Int64ul,
    "reserved" / Array(4, Int64ul),
    "atime" / Timespec,
    "ctime" / Timespec,
    "mtime" / Timespec,
    "otime" / Timespec,
)
INODE_ITEM = struct.Struct("<QQQQQIIIIQQQ32xqIqIqIqI")   # 160 bytes
INODE_ITEM_SIZE = 160

RootItem = Struct(                   # struct btrfs_root_item (the fields we read; 239 bytes in old filesystems)
    "inode" / InodeItem,
    "generation" / Int64ul,          # 160
    "root_dirid" / Int64ul,          # 168
    "bytenr" / Int64ul,              # 176 the tree's root block
    "byte_limit" / Int64ul,
    "bytes_used" / Int64ul,
    "last_snapshot" / Int64ul,
    "flags" / Int64ul,               # 208 (1: read-only)
    "refs" / Int32ul,                # 216
    "drop_progress" / DiskKey,       # 220
    "drop_level" / Int8ul,           # 237
    "level" / Int8ul,                # 238
    "generation_v2" / Int64ul,       # 239: the fields below are valid when equal to generation
    "uuid" / Bytes(16),              # 247
    "parent_uuid" / Bytes(16),       # 263 the subvolume this is a snapshot of
    "received_uuid" / Bytes(16),
    "ctransid" / Int64ul,
    "otransid" / Int64ul,
    "stransid" / Int64ul,
    "rtransid" / Int64ul,
    "ctime" / Timespec,
    "otime" / Timespec,
)
ROOT_ITEM_V1 = struct.Struct("<160xQQQQQQQIQBQBB")       # up to `level`, 239 bytes
ROOT_ITEM_V2 = struct.Struct("<Q16s16s")                 # generation_v2, uuid, parent_uuid at 239

RootRef = Struct(                    # struct btrfs_root_ref (ROOT_REF and ROOT_BACKREF), name follows
    "dirid" / Int64ul,
    "sequence" / Int64ul,
    "name_len" / Int16ul,
)
ROOT_REF = struct.Struct("<QQH")     # 18 bytes

InodeRef = Struct("index" / Int64ul, "name_len" / Int16ul)    # name follows; several per item
INODE_REF = struct.Struct("<QH")     # 10 bytes
InodeExtref = Struct("parent_objectid" / Int64ul, "index" / Int64ul, "name_len" / Int16ul)
INODE_EXTREF = struct.Struct("<QQH")  # 18 bytes

DirItem = Struct(                    # struct btrfs_dir_item (DIR_ITEM, DIR_INDEX, XATTR_ITEM); name then data follow
    "location" / DiskKey,
    "transid" / Int64ul,
    "data_len" / Int16ul,
    "name_len" / Int16ul,
    "type" / Int8ul,
)
DIR_ITEM = struct.Struct("<QBQQHHB")  # 30 bytes

FileExtentItem = Struct(             # struct btrfs_file_extent_item; inline data starts at disk_bytenr's offset (21)
    "generation" / Int64ul,
    "ram_bytes" / Int64ul,
    "compression" / Int8ul,
    "encryption" / Int8ul,
    "other_encoding" / Int16ul,
    "type" / Int8ul,
    "disk_bytenr" / Int64ul,
    "disk_num_bytes" / Int64ul,
    "offset" / Int64ul,
    "num_bytes" / Int64ul,
)
FILE_EXTENT_HEAD = struct.Struct("<QQBBHB")   # 21 bytes
FILE_EXTENT_DISK = struct.Struct("<QQQQ")      # 32 bytes after the head
FILE_EXTENT_INLINE_START = 21

# Object ids (btrfs_tree.h)
ROOT_TREE_OBJECTID = 1
CHUNK_TREE_OBJECTID = 3
FS_TREE_OBJECTID = 5
ROOT_TREE_DIR_OBJECTID = 6
CSUM_TREE_OBJECTID = 7
EXTENT_CSUM_OBJECTID = (1 << 64) - 10
FIRST_FREE_OBJECTID = 256
LAST_FREE_OBJECTID = (1 << 64) - 256
EMPTY_SUBVOL_DIR_OBJECTID = 2
FIRST_CHUNK_TREE_OBJECTID = 256

# Item key types
INODE_ITEM_KEY = 1
INODE_REF_KEY = 12
INODE_EXTREF_KEY = 13
XATTR_ITEM_KEY = 24
DIR_ITEM_KEY = 84
DIR_INDEX_KEY = 96
EXTENT_DATA_KEY = 108
ROOT_ITEM_KEY = 132
EXTENT_CSUM_KEY = 128
ROOT_BACKREF_KEY = 144
ROOT_REF_KEY = 156
DEV_ITEM_KEY = 216
CHUNK_ITEM_KEY = 228

# Directory entry types (btrfs_dir_item.type)
FT_REG_FILE, FT_DIR, FT_CHRDEV, FT_BLKDEV, FT_FIFO, FT_SOCK, FT_SYMLINK = 1, 2, 3, 4, 5, 6, 7

# File extent types and compression
FILE_EXTENT_INLINE, FILE_EXTENT_REG, FILE_EXTENT_PREALLOC = 0, 1, 2
COMPRESS_NONE, COMPRESS_ZLIB, COMPRESS_LZO, COMPRESS_ZSTD = 0, 1, 2, 3

# Block group (chunk) type flags
BG_DATA, BG_SYSTEM, BG_METADATA = 1 << 0, 1 << 1, 1 << 2
BG_RAID0, BG_RAID1, BG_DUP, BG_RAID10 = 1 << 3, 1 << 4, 1 << 5, 1 << 6
BG_RAID5, BG_RAID6, BG_RAID1C3, BG_RAID1C4 = 1 << 7, 1 << 8, 1 << 9, 1 << 10

# Checksum types (csum_type)
CSUM_CRC32C, CSUM_XXHASH, CSUM_SHA256, CSUM_BLAKE2 = 0, 1, 2, 3
CSUM_NAMES = {CSUM_CRC32C: "crc32c", CSUM_XXHASH: "xxhash64", CSUM_SHA256: "sha256", CSUM_BLAKE2: "blake2b"}

# Incompat feature flags (include/uapi/linux/btrfs.h). A reader must refuse any
# it does not know; these are the ones whose on-disk meaning we read.
INCOMPAT_NAMES = {
    1 << 0: "mixed_backref", 1 << 1: "default_subvol", 1 << 2: "mixed_groups", 1 << 3: "compress_lzo",
    1 << 4: "compress_zstd", 1 << 5: "big_metadata", 1 << 6: "extended_iref", 1 << 7: "raid56",
    1 << 8: "skinny_metadata", 1 << 9: "no_holes", 1 << 10: "metadata_uuid", 1 << 11: "raid1c34",
    1 << 12: "zoned", 1 << 13: "extent_tree_v2", 1 << 14: "raid_stripe_tree", 1 << 16: "simple_quota",
    1 << 17: "remap_tree",
}
INCOMPAT_METADATA_UUID = 1 << 10
INCOMPAT_SUPPORTED = ((1 << 12) - 1) | (1 << 16)   # bits 0-11, and simple_quota (accounting only)
