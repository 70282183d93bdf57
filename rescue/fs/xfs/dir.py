"""XFS directories (version 2/3) in every form: shortform, block, leaf, node, btree.

References: "XFS Algorithms & Data Structures" (Directories: Short Form,
Block, Leaf, Node, B+tree); xfs_da_format.h (xfs_dir2_sf_hdr/entry,
xfs_dir2_data_hdr / xfs_dir3_data_hdr, xfs_dir2_data_entry/unused,
xfs_dir2_block_tail, XFS_DIR2_LEAF_OFFSET), xfs_dir2_data.c (__xfs_dir3_data_check).

Every form keeps its names in data blocks below XFS_DIR2_LEAF_OFFSET (the leaf,
node and free blocks above it only index them), so a listing reads exactly
those: one pass over the data blocks whatever the form. A damaged data block
loses only its own names.
"""

from __future__ import annotations

import struct

from .crc import crc_ok
from .inode import FMT_EXTENTS, FMT_BTREE, FMT_LOCAL, Inode, InodeReader, XfsDamage
from .structs import (
    DIR2_BLOCK_MAGICS, DIR2_DATA_FREE_TAG, DIR2_DATA_HDR, DIR2_DATA_MAGIC, DIR2_LEAF_OFFSET,
    DIR2_SF_HDR, DIR3_CRC_OFF, DIR3_DATA_HDR, DIR_ENTRY_HEAD,
)

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
MAX_DIR_ENTRIES = 1 << 26       # more names than this in one directory is damage
MAX_DIR_BLOCKS = 1 << 20        # ditto for data blocks (4 GiB of names at 4 KiB)


def read_directory(reader: InodeReader, inode: Inode) -> tuple[list[tuple[bytes, int]], list[str]]:
    """(name, inode number) pairs without '.' and '..', and the damage met on
    the way (each string one damaged block). Raises XfsDamage when nothing of
    the directory can be read."""
    if inode.data_format == FMT_LOCAL:
        return _shortform(inode, reader.sb.ftype), []
    if inode.data_format not in (FMT_EXTENTS, FMT_BTREE):
        raise XfsDamage(f"directory inode {inode.ino}: data fork format {inode.data_format} is not a directory's")
    sb = reader.sb
    extents = reader.extents(inode)
    fsb_per_dirblk = sb.dir_block_size >> sb.block_log
    leaf_fsb = DIR2_LEAF_OFFSET >> sb.block_log
    names: list[tuple[bytes, int]] = []
    damage: list[str] = []
    # The directory blocks that hold any mapped data block.
    dblocks: list[int] = []
    for ext in extents:
        if ext.offset >= leaf_fsb:
            break
        first = ext.offset // fsb_per_dirblk
        last = (min(ext.offset + ext.count, leaf_fsb) - 1) // fsb_per_dirblk
        if dblocks and dblocks[-1] >= first:
            first = dblocks[-1] + 1
        if len(dblocks) + last - first > MAX_DIR_BLOCKS:
            raise XfsDamage(f"directory inode {inode.ino}: absurd number of data blocks")
        dblocks.extend(range(first, last + 1))
    for dblk in dblocks:
        what = f"directory inode {inode.ino} block {dblk}"
        try:
            block = reader.read_mapped(extents, dblk * fsb_per_dirblk, fsb_per_dirblk, what)
            _data_block(block, sb.ftype, sb.crc, names, what)
        except XfsDamage as exc:
            damage.append(str(exc))
        except (struct.error, IndexError, ValueError) as exc:
            damage.append(f"{what}: malformed ({exc})")
        if len(names) > MAX_DIR_ENTRIES:
            raise XfsDamage(f"directory inode {inode.ino}: more than {MAX_DIR_ENTRIES} names")
    if damage and not names and len(damage) == len(dblocks):
        raise XfsDamage(damage[0] if len(damage) == 1 else f"{damage[0]} (and {len(damage) - 1} more)")
    return names, damage


def _shortform(inode: Inode, ftype: bool) -> list[tuple[bytes, int]]:
    fork = inode.data_fork[:max(0, min(inode.size, len(inode.data_fork)))]
    count, i8count = DIR2_SF_HDR.unpack_from(fork)
    isize = 8 if i8count else 4
    pos = 2 + isize                     # after the parent's inode number
    extra = 1 if ftype else 0
    out = []
    for _ in range(count):
        namelen = fork[pos]
        name_at = pos + 3               # namelen u8 + offset[2]
        ino_at = name_at + namelen + extra
        if namelen == 0 or ino_at + isize > len(fork):
            raise XfsDamage(f"directory inode {inode.ino}: shortform entry at {pos} runs past the fork")
        name = fork[name_at:name_at + namelen]
        ino = int.from_bytes(fork[ino_at:ino_at + isize], "big")
        out.append((name, ino))
        pos = ino_at + isize
    return out


def _data_block(block: bytes, ftype: bool, crc: bool, names: list, what: str) -> None:
    magic = block[:4]
    v5 = DIR2_DATA_MAGIC.get(magic)
    if v5 is None or v5 != crc:
        raise XfsDamage(f"{what}: bad magic {magic!r}")
    if crc and not crc_ok(block, DIR3_CRC_OFF):
        raise XfsDamage(f"{what}: CRC mismatch")
    pos = DIR3_DATA_HDR if crc else DIR2_DATA_HDR
    end = len(block)
    if magic in DIR2_BLOCK_MAGICS:     # single-block form: leaf entries and tail at the end
        count = _U32.unpack_from(block, end - 8)[0]
        end -= 8 + 8 * count
        if end < pos:
            raise XfsDamage(f"{what}: block tail claims {count} leaf entries")
    extra = 1 if ftype else 0
    head = DIR_ENTRY_HEAD.unpack_from
    u16 = _U16.unpack_from
    while pos < end:
        if u16(block, pos)[0] == DIR2_DATA_FREE_TAG:
            length = u16(block, pos + 2)[0]
            if length < 8 or length & 7 or pos + length > end:
                raise XfsDamage(f"{what}: free space at {pos} has length {length}")
            pos += length
            continue
        ino, namelen = head(block, pos)
        size = (8 + 1 + namelen + extra + 2 + 7) & ~7
        if namelen == 0 or pos + size > end:
            raise XfsDamage(f"{what}: entry at {pos} runs past the block")
        name = block[pos + 9:pos + 9 + namelen]
        if name != b"." and name != b"..":
            names.append((name, ino))
        pos += size
