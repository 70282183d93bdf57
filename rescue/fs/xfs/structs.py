"""XFS on-disk structures, declared once (all big-endian except CRCs).

References:
- "XFS Algorithms & Data Structures", 3rd ed. (kernel.org xfs-documentation,
  design/XFS_Filesystem_Structure): superblock, inode core, data/attr forks,
  extent records, BMBT, directory and attribute block formats.
- Linux fs/xfs/libxfs/xfs_format.h (xfs_dsb, xfs_dinode, xfs_bmbt_rec,
  xfs_btree_block, xfs_dsymlink_hdr, feature bits, XFS_BIGTIME_EPOCH_OFFSET),
  xfs_da_format.h (xfs_da_blkinfo/xfs_da3_blkinfo, xfs_dir2_sf_*, xfs_dir2/3
  data headers, dir2_data_entry, attr shortform/leaf/remote headers, XFS_ATTR_*
  flags), xfs_log_format.h (xlog_rec_header, xlog_op_header, XLOG_UNMOUNT_TRANS),
  xfs_acl.h (struct xfs_acl: the big-endian ACL behind SGI_ACL_FILE).

The hot paths (inode cores, directory entries, extent records) unpack with
`struct` formats that mirror these Structs; tests check the two agree.
"""

from __future__ import annotations

import struct

from construct import Bytes, Const, Int8ub, Int16ub, Int32ub, Int32ul, Int64ub, Padding, Struct

SB_MAGIC = b"XFSB"

Superblock = Struct(
    "magicnum" / Const(SB_MAGIC),        # 0x00
    "blocksize" / Int32ub,               # 0x04
    "dblocks" / Int64ub,                 # 0x08
    "rblocks" / Int64ub,                 # 0x10
    "rextents" / Int64ub,                # 0x18
    "uuid" / Bytes(16),                  # 0x20
    "logstart" / Int64ub,                # 0x30
    "rootino" / Int64ub,                 # 0x38
    "rbmino" / Int64ub,                  # 0x40 (metadir: the metadata directory root)
    "rsumino" / Int64ub,                 # 0x48
    "rextsize" / Int32ub,                # 0x50
    "agblocks" / Int32ub,                # 0x54
    "agcount" / Int32ub,                 # 0x58
    "rbmblocks" / Int32ub,               # 0x5C
    "logblocks" / Int32ub,               # 0x60
    "versionnum" / Int16ub,              # 0x64
    "sectsize" / Int16ub,                # 0x66
    "inodesize" / Int16ub,               # 0x68
    "inopblock" / Int16ub,               # 0x6A
    "fname" / Bytes(12),                 # 0x6C
    "blocklog" / Int8ub,                 # 0x78
    "sectlog" / Int8ub,
    "inodelog" / Int8ub,
    "inopblog" / Int8ub,
    "agblklog" / Int8ub,
    "rextslog" / Int8ub,
    "inprogress" / Int8ub,
    "imax_pct" / Int8ub,
    "icount" / Int64ub,                  # 0x80
    "ifree" / Int64ub,
    "fdblocks" / Int64ub,                # 0x90: free data blocks (lazy count: approximate when dirty)
    "frextents" / Int64ub,
    "uquotino" / Int64ub,                # 0xA0
    "gquotino" / Int64ub,
    "qflags" / Int16ub,                  # 0xB0
    "flags" / Int8ub,
    "shared_vn" / Int8ub,
    "inoalignmt" / Int32ub,
    "unit" / Int32ub,                    # 0xB8
    "width" / Int32ub,
    "dirblklog" / Int8ub,                # 0xC0
    "logsectlog" / Int8ub,
    "logsectsize" / Int16ub,
    "logsunit" / Int32ub,
    "features2" / Int32ub,               # 0xC8
    "bad_features2" / Int32ub,
    # version 5 (CRC) fields
    "features_compat" / Int32ub,         # 0xD0
    "features_ro_compat" / Int32ub,
    "features_incompat" / Int32ub,       # 0xD8
    "features_log_incompat" / Int32ub,
    "crc" / Int32ul,                     # 0xE0
    "spino_align" / Int32ub,
    "pquotino" / Int64ub,                # 0xE8
    "lsn" / Int64ub,                     # 0xF0
    "meta_uuid" / Bytes(16),             # 0xF8
)
SB_CRC_OFF = 0xE0
SB_SIZE = Superblock.sizeof()            # 0x108

VERSION_NUMBITS = 0x000F
VERSION_NLINKBIT = 0x0020
VERSION_SHAREDBIT = 0x0200
VERSION_DIRV2BIT = 0x2000
VERSION_BORGBIT = 0x4000                  # ASCII case-insensitive names (lookups only)
VERSION_MOREBITSBIT = 0x8000
VERSION2_CRCBIT = 0x100
VERSION2_FTYPE = 0x200

# sb_features_incompat (v5) we read, by name; anything else is refused by name.
INCOMPAT_NAMES = {
    0x1: "ftype", 0x2: "sparse inodes", 0x4: "meta_uuid", 0x8: "bigtime",
    0x10: "needsrepair", 0x20: "nrext64", 0x40: "exchange-range", 0x80: "parent pointers",
    0x100: "metadir",
}
INCOMPAT_UNREAD = {0x200: "zoned realtime device"}
INCOMPAT_FTYPE, INCOMPAT_NEEDSREPAIR, INCOMPAT_BIGTIME, INCOMPAT_NREXT64 = 0x1, 0x10, 0x8, 0x20
RO_COMPAT_NAMES = {0x1: "finobt", 0x2: "rmapbt", 0x4: "reflink", 0x8: "inobtcount"}

# Inode core (xfs_dinode). v1/v2 cores are 100 bytes, v3 176; the fork
# ("literal area") follows. With nrext64 (di_flags2 & NREXT64) the data
# extent count is the u64 at 0x18 and the attr count the u32 at 0x4C.
INODE_MAGIC = b"IN"
InodeCore = Struct(
    "di_magic" / Const(INODE_MAGIC),     # 0x00
    "di_mode" / Int16ub,
    "di_version" / Int8ub,               # 0x04
    "di_format" / Int8ub,
    "di_onlink" / Int16ub,               # v1 link count (metadir: di_metatype)
    "di_uid" / Int32ub,                  # 0x08
    "di_gid" / Int32ub,
    "di_nlink" / Int32ub,                # 0x10
    "di_projid_lo" / Int16ub,
    "di_projid_hi" / Int16ub,
    "di_big_nextents" / Int64ub,         # 0x18: nrext64 data extents, else pad[6] + di_flushiter
    "di_atime" / Int64ub,                # 0x20: (s32 sec, u32 nsec) or bigtime ns
    "di_mtime" / Int64ub,
    "di_ctime" / Int64ub,
    "di_size" / Int64ub,                 # 0x38
    "di_nblocks" / Int64ub,
    "di_extsize" / Int32ub,              # 0x48
    "di_nextents" / Int32ub,             # 0x4C (nrext64: attr extents)
    "di_anextents" / Int16ub,            # 0x50
    "di_forkoff" / Int8ub,               # attr fork offset in 8-byte units
    "di_aformat" / Int8ub,
    "di_dmevmask" / Int32ub,             # 0x54
    "di_dmstate" / Int16ub,
    "di_flags" / Int16ub,                # 0x5A
    "di_gen" / Int32ub,
    "di_next_unlinked" / Int32ub,        # 0x60
    # v3 only
    "di_crc" / Int32ul,                  # 0x64
    "di_changecount" / Int64ub,
    "di_lsn" / Int64ub,                  # 0x70
    "di_flags2" / Int64ub,               # 0x78
    "di_cowextsize" / Int32ub,           # 0x80
    Padding(12),
    "di_crtime" / Int64ub,               # 0x90
    "di_ino" / Int64ub,                  # 0x98
    "di_uuid" / Bytes(16),               # 0xA0
)
INODE_CORE_V2 = 0x64
INODE_CORE_V3 = InodeCore.sizeof()       # 0xB0
INODE_CRC_OFF = 0x64
# The same fields for the per-inode path (through di_next_unlinked).
INODE_FAST = struct.Struct(">2sHBBHIIIHHQQQQQQIIHBBIHHII")
INODE_V3_FAST = struct.Struct(">IQQQI12xQQ16s")   # di_crc .. di_uuid, at 0x64

FMT_DEV, FMT_LOCAL, FMT_EXTENTS, FMT_BTREE = 0, 1, 2, 3
FORMAT_NAMES = {0: "dev", 1: "local", 2: "extents", 3: "btree", 4: "uuid", 5: "rmap", 6: "refcount"}
DIFLAG_REALTIME = 0x1
DIFLAG2_BIGTIME = 0x8
DIFLAG2_NREXT64 = 0x10
BIGTIME_EPOCH_OFFSET = 1 << 31           # bigtime stores (unix seconds + 2^31) * 1e9 + ns

# Extent record (xfs_bmbt_rec): 128 bits, flag:1 startoff:54 startblock:52 blockcount:21.
BmbtRec = Struct("l0" / Int64ub, "l1" / Int64ub)
EXT_FLAG_SHIFT = 63
MASK54 = (1 << 54) - 1

# Long-format btree block (BMBT) header: v4 24 bytes, v5 72 (CRC at 64).
BMAP_MAGIC, BMAP_CRC_MAGIC = b"BMAP", b"BMA3"
BtreeLBlock = Struct(
    "bb_magic" / Bytes(4),
    "bb_level" / Int16ub,
    "bb_numrecs" / Int16ub,
    "bb_leftsib" / Int64ub,
    "bb_rightsib" / Int64ub,
)
BtreeLBlockCrc = Struct(
    "bb_magic" / Bytes(4), "bb_level" / Int16ub, "bb_numrecs" / Int16ub,
    "bb_leftsib" / Int64ub, "bb_rightsib" / Int64ub,
    "bb_blkno" / Int64ub, "bb_lsn" / Int64ub, "bb_uuid" / Bytes(16), "bb_owner" / Int64ub,
    "bb_crc" / Int32ul, Padding(4),
)
BMBT_HDR_V4, BMBT_HDR_V5, BMBT_CRC_OFF = BtreeLBlock.sizeof(), BtreeLBlockCrc.sizeof(), 64
# The root of a btree-format fork, inside the inode (xfs_bmdr_block).
BmdrBlock = Struct("bb_level" / Int16ub, "bb_numrecs" / Int16ub)

# Directories (xfs_da_format.h). Shortform header: count, i8count, parent (4 or 8 bytes).
DIR2_SF_HDR = struct.Struct(">BB")
DIR2_DATA_MAGIC = {b"XD2B": False, b"XD2D": False, b"XDB3": True, b"XDD3": True}  # -> has v5 header
DIR2_BLOCK_MAGICS = (b"XD2B", b"XDB3")   # single-block form: a leaf + tail at the end
Dir2DataHdr = Struct("magic" / Bytes(4), "bestfree" / Bytes(12))                  # 16 bytes
Dir3DataHdr = Struct(
    "magic" / Bytes(4), "crc" / Int32ul, "blkno" / Int64ub, "lsn" / Int64ub,
    "uuid" / Bytes(16), "owner" / Int64ub, "bestfree" / Bytes(12), Padding(4),
)                                                                                 # 64 bytes
DIR2_DATA_HDR, DIR3_DATA_HDR, DIR3_CRC_OFF = Dir2DataHdr.sizeof(), Dir3DataHdr.sizeof(), 4
Dir2BlockTail = Struct("count" / Int32ub, "stale" / Int32ub)
DIR2_DATA_FREE_TAG = 0xFFFF
DIR2_LEAF_OFFSET = 32 << 30              # data blocks live below this byte offset of the directory
# xfs_dir2_data_entry: inumber u64, namelen u8, name, [ftype u8], pad to 8, tag u16
DIR_ENTRY_HEAD = struct.Struct(">QB")

# Attributes. Shortform: xfs_attr_sf_hdr then entries (namelen, valuelen, flags, name, value).
AttrSfHdr = Struct("totsize" / Int16ub, "count" / Int8ub, Padding(1))
ATTR_SF_ENTRY = struct.Struct(">BBB")
# xfs_da_blkinfo (12 bytes) / xfs_da3_blkinfo (56 bytes, CRC at 12): every dir/attr tree block.
DaBlkinfo = Struct("forw" / Int32ub, "back" / Int32ub, "magic" / Int16ub, Padding(2))
Da3Blkinfo = Struct(
    "forw" / Int32ub, "back" / Int32ub, "magic" / Int16ub, Padding(2),
    "crc" / Int32ul, "blkno" / Int64ub, "lsn" / Int64ub, "uuid" / Bytes(16), "owner" / Int64ub,
)
DA3_CRC_OFF = 12
ATTR_LEAF_MAGIC, ATTR3_LEAF_MAGIC = 0xFBEE, 0x3BEE
DA_NODE_MAGIC, DA3_NODE_MAGIC = 0xFEBE, 0x3EBE
# Leaf header after the blkinfo: count, usedbytes, firstused, holes, pad, freemap[3] (+ pad2 on v5).
AttrLeafHdr = Struct("count" / Int16ub, "usedbytes" / Int16ub, "firstused" / Int16ub,
                     "holes" / Int8ub, Padding(1), "freemap" / Bytes(12))
ATTR_LEAF_HDR_V4 = DaBlkinfo.sizeof() + AttrLeafHdr.sizeof()           # 32
ATTR_LEAF_HDR_V5 = Da3Blkinfo.sizeof() + AttrLeafHdr.sizeof() + 4      # 80
AttrLeafEntry = Struct("hashval" / Int32ub, "nameidx" / Int16ub, "flags" / Int8ub, Padding(1))
ATTR_LEAF_ENTRY = struct.Struct(">IHBx")
ATTR_NAME_LOCAL = struct.Struct(">HB")    # valuelen, namelen, then name and value
ATTR_NAME_REMOTE = struct.Struct(">IIB")  # valueblk, valuelen, namelen, then name
DaNodeHdr = Struct("count" / Int16ub, "level" / Int16ub)
DA_NODE_HDR_V4 = DaBlkinfo.sizeof() + DaNodeHdr.sizeof()               # 16
DA_NODE_HDR_V5 = Da3Blkinfo.sizeof() + DaNodeHdr.sizeof() + 4          # 64
DA_NODE_ENTRY = struct.Struct(">II")      # hashval, before (block in the fork)
ATTR_LOCAL, ATTR_ROOT, ATTR_SECURE, ATTR_PARENT, ATTR_INCOMPLETE = 0x1, 0x2, 0x4, 0x8, 0x80

# v5 remote blocks (attribute values, symlink targets) carry a 56-byte header.
RemoteHdr = Struct(
    "magic" / Bytes(4), "offset" / Int32ub, "bytes" / Int32ub, "crc" / Int32ul,
    "uuid" / Bytes(16), "owner" / Int64ub, "blkno" / Int64ub, "lsn" / Int64ub,
)
REMOTE_HDR, REMOTE_CRC_OFF = RemoteHdr.sizeof(), 12
ATTR_RMT_MAGIC, SYMLINK_MAGIC = b"XARM", b"XSLM"

# POSIX ACLs: XFS keeps them as root-namespace attributes in big-endian
# struct xfs_acl {be32 acl_cnt; {be32 ae_tag; be32 ae_id; be16 ae_perm; be16 pad} ...}.
ACL_ATTRS = {b"SGI_ACL_FILE": "system.posix_acl_access",
             b"SGI_ACL_DEFAULT": "system.posix_acl_default"}
XfsAclEntry = Struct("ae_tag" / Int32ub, "ae_id" / Int32ub, "ae_perm" / Int16ub, Padding(2))
XFS_ACL_ENTRY = struct.Struct(">IIH2x")

# Log (xfs_log_format.h): record header in the first 512-byte sector of a record.
XLOG_HEADER_MAGIC = 0xFEEDBABE
LogRecHeader = Struct(
    "h_magicno" / Int32ub, "h_cycle" / Int32ub, "h_version" / Int32ub, "h_len" / Int32ub,
    "h_lsn" / Int64ub, "h_tail_lsn" / Int64ub, "h_crc" / Int32ul, "h_prev_block" / Int32ub,
    "h_num_logops" / Int32ub, Padding(256), "h_fmt" / Int32ub, "h_fs_uuid" / Bytes(16),
    "h_size" / Int32ub,
)
XLOG_HEADER_CYCLE_SIZE = 32 * 1024
XLOG_VERSION_2 = 2
XLOG_OP_HDR_FLAGS = 9                    # xlog_op_header: tid u32, len u32, clientid u8, flags u8
XLOG_UNMOUNT_TRANS = 0x20
