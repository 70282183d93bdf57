"""XFS extended attributes: shortform, leaf, node (and btree-mapped) forks,
local and remote values, namespaces, and POSIX ACLs in Linux xattr form.

References: "XFS Algorithms & Data Structures" (Extended Attributes: Short
Form, Leaf, Node, B+tree, Remote Values); xfs_da_format.h (xfs_attr_sf_hdr /
entry, xfs_attr_leaf_hdr / xfs_attr3_leaf_hdr, xfs_attr_leaf_entry,
xfs_attr_leaf_name_local / remote, xfs_da_intnode, xfs_attr3_rmt_hdr,
XFS_ATTR_ROOT/SECURE/PARENT/INCOMPLETE/LOCAL), xfs_attr_remote.c
(xfs_attr3_rmt_blocks), xfs_acl.h + xfs_acl.c (xfs_acl_from_disk) and
include/uapi/linux/posix_acl_xattr.h (what getxattr returns).
"""

from __future__ import annotations

import struct

from .crc import crc_ok
from .inode import FMT_BTREE, FMT_EXTENTS, FMT_LOCAL, Inode, InodeReader, XfsDamage
from .structs import (
    ACL_ATTRS, ATTR3_LEAF_MAGIC, ATTR_INCOMPLETE, ATTR_LEAF_ENTRY, ATTR_LEAF_HDR_V4,
    ATTR_LEAF_HDR_V5, ATTR_LEAF_MAGIC, ATTR_LOCAL, ATTR_NAME_LOCAL, ATTR_NAME_REMOTE, ATTR_PARENT,
    ATTR_RMT_MAGIC, ATTR_ROOT, ATTR_SECURE, ATTR_SF_ENTRY, DA3_CRC_OFF, DA3_NODE_MAGIC,
    DA_NODE_ENTRY, DA_NODE_HDR_V4, DA_NODE_HDR_V5, DA_NODE_MAGIC, REMOTE_CRC_OFF, REMOTE_HDR,
    XFS_ACL_ENTRY,
)

MAX_ATTR_BLOCKS = 1 << 16       # tree blocks visited per inode before calling it damage
MAX_VALUE = 1 << 16             # XFS_XATTR_SIZE_MAX
POSIX_ACL_XATTR_VERSION = 2
ACL_USER, ACL_GROUP = 2, 8
ACL_TAGS = {1, 2, 4, 8, 0x10, 0x20}
ACL_UNDEFINED_ID = 0xFFFFFFFF
XFS_ACL_MAX_ENTRIES = 25000     # the v5 limit; v4 allows 25


def xfs_acl_to_xattr(data: bytes) -> bytes:
    """XFS's big-endian struct xfs_acl -> the posix_acl_xattr blob getfattr shows
    (version 2, then e_tag u16, e_perm u16, e_id u32, little-endian; e_id
    0xFFFFFFFF for the entries that name nobody). Raises ValueError when malformed."""
    if len(data) < 4:
        raise ValueError("ACL shorter than its count")
    (count,) = struct.unpack_from(">I", data)
    if count > XFS_ACL_MAX_ENTRIES or 4 + count * XFS_ACL_ENTRY.size > len(data):
        raise ValueError(f"ACL claims {count} entries in {len(data)} bytes")
    out = [struct.pack("<I", POSIX_ACL_XATTR_VERSION)]
    for tag, ident, perm in XFS_ACL_ENTRY.iter_unpack(data[4:4 + count * XFS_ACL_ENTRY.size]):
        if tag not in ACL_TAGS:
            raise ValueError(f"ACL entry tag {tag:#x} is unknown")
        out.append(struct.pack("<HHI", tag, perm & 0xFFFF,
                               ident if tag in (ACL_USER, ACL_GROUP) else ACL_UNDEFINED_ID))
    return b"".join(out)


def _xattr_name(flags: int, name: bytes) -> str | None:
    """The Linux name of an XFS attribute, None for ones Linux does not show
    (parent pointers, half-written values)."""
    if flags & (ATTR_PARENT | ATTR_INCOMPLETE):
        return None
    text = name.decode("utf-8", "surrogateescape")
    if flags & ATTR_SECURE:
        return "security." + text
    if flags & ATTR_ROOT:
        acl = ACL_ATTRS.get(name)
        return acl if acl is not None else "trusted." + text
    return "user." + text


def _put(out: dict[str, bytes], flags: int, name: bytes, value: bytes, what: str) -> None:
    key = _xattr_name(flags, name)
    if key is None:
        return
    if flags & ATTR_ROOT and name in ACL_ATTRS:
        try:
            value = xfs_acl_to_xattr(value)
        except ValueError as exc:
            raise XfsDamage(f"{what}: ACL {name.decode()}: {exc}") from None
    out[key] = value


def read_xattrs(reader: InodeReader, inode: Inode) -> dict[str, bytes]:
    """Every attribute of `inode`, by Linux name. Raises XfsDamage."""
    if not inode.forkoff:
        return {}
    what = f"inode {inode.ino} attributes"
    out: dict[str, bytes] = {}
    if inode.attr_format == FMT_LOCAL:
        fork = inode.attr_fork
        totsize, count = struct.unpack_from(">HB", fork)
        fork = fork[:totsize]
        pos = 4
        for _ in range(count):
            namelen, valuelen, flags = ATTR_SF_ENTRY.unpack_from(fork, pos)
            name_at = pos + 3
            end = name_at + namelen + valuelen
            if end > len(fork):
                raise XfsDamage(f"{what}: shortform entry at {pos} runs past the fork")
            _put(out, flags, fork[name_at:name_at + namelen], fork[name_at + namelen:end], what)
            pos = end
        return out
    if inode.attr_format not in (FMT_EXTENTS, FMT_BTREE):
        raise XfsDamage(f"{what}: fork format {inode.attr_format} is not an attribute fork's")
    if inode.anextents == 0:
        return {}
    extents = reader.extents(inode, attr=True)
    seen: set[int] = set()
    _attr_block(reader, extents, 0, out, seen, what, depth=0)
    return out


def _attr_block(reader: InodeReader, extents: list, lblk: int, out: dict[str, bytes], seen: set[int],
                what: str, depth: int) -> None:
    if lblk in seen or len(seen) > MAX_ATTR_BLOCKS or depth > 8:
        raise XfsDamage(f"{what}: attribute tree loops or is too deep (block {lblk})")
    seen.add(lblk)
    sb = reader.sb
    block = reader.read_mapped(extents, lblk, 1, f"{what} block {lblk}")
    (magic,) = struct.unpack_from(">H", block, 8)
    crc = sb.crc
    if magic in (DA_NODE_MAGIC, DA3_NODE_MAGIC):
        if (magic == DA3_NODE_MAGIC) != crc:
            raise XfsDamage(f"{what}: block {lblk} has a node magic of the wrong version")
        if crc and not crc_ok(block, DA3_CRC_OFF):
            raise XfsDamage(f"{what}: node block {lblk} CRC mismatch")
        hdr = DA_NODE_HDR_V5 if crc else DA_NODE_HDR_V4
        count, _level = struct.unpack_from(">HH", block, hdr - (8 if crc else 4))
        if hdr + count * 8 > len(block):
            raise XfsDamage(f"{what}: node block {lblk} claims {count} entries")
        for _hash, before in DA_NODE_ENTRY.iter_unpack(block[hdr:hdr + count * 8]):
            _attr_block(reader, extents, before, out, seen, what, depth + 1)
        return
    if magic not in (ATTR_LEAF_MAGIC, ATTR3_LEAF_MAGIC) or (magic == ATTR3_LEAF_MAGIC) != crc:
        raise XfsDamage(f"{what}: block {lblk} has bad magic {magic:#x}")
    if crc and not crc_ok(block, DA3_CRC_OFF):
        raise XfsDamage(f"{what}: leaf block {lblk} CRC mismatch")
    hdr = ATTR_LEAF_HDR_V5 if crc else ATTR_LEAF_HDR_V4
    (count,) = struct.unpack_from(">H", block, 56 if crc else 12)
    if hdr + count * 8 > len(block):
        raise XfsDamage(f"{what}: leaf block {lblk} claims {count} entries")
    for _hash, nameidx, flags in ATTR_LEAF_ENTRY.iter_unpack(block[hdr:hdr + count * 8]):
        if flags & ATTR_INCOMPLETE:
            continue
        if flags & ATTR_LOCAL:
            valuelen, namelen = ATTR_NAME_LOCAL.unpack_from(block, nameidx)
            name_at = nameidx + 3
            end = name_at + namelen + valuelen
            if end > len(block):
                raise XfsDamage(f"{what}: leaf block {lblk} entry at {nameidx} runs past the block")
            _put(out, flags, block[name_at:name_at + namelen], block[name_at + namelen:end], what)
        else:
            valueblk, valuelen, namelen = ATTR_NAME_REMOTE.unpack_from(block, nameidx)
            name_at = nameidx + 9
            if name_at + namelen > len(block):
                raise XfsDamage(f"{what}: leaf block {lblk} entry at {nameidx} runs past the block")
            name = block[name_at:name_at + namelen]
            if _xattr_name(flags, name) is None:
                continue
            value = _remote_value(reader, extents, valueblk, valuelen, f"{what} {name!r}")
            _put(out, flags, name, value, what)


def _remote_value(reader: InodeReader, extents: list, valueblk: int, valuelen: int, what: str) -> bytes:
    """A value stored in its own attr-fork blocks (v5: each block has a header)."""
    sb = reader.sb
    if valuelen > MAX_VALUE:
        raise XfsDamage(f"{what}: remote value of {valuelen} bytes is larger than XFS allows")
    per_block = sb.block_size - (REMOTE_HDR if sb.crc else 0)
    nblocks = max(1, -(-valuelen // per_block))
    data = reader.read_mapped(extents, valueblk, nblocks, f"{what} remote value")
    if not sb.crc:
        return data[:valuelen]
    parts = []
    left = valuelen
    for i in range(nblocks):
        block = data[i * sb.block_size:(i + 1) * sb.block_size]
        if block[:4] != ATTR_RMT_MAGIC:
            raise XfsDamage(f"{what}: remote value block {valueblk + i} has bad magic {block[:4]!r}")
        if not crc_ok(block, REMOTE_CRC_OFF):
            raise XfsDamage(f"{what}: remote value block {valueblk + i} CRC mismatch")
        offset, nbytes = struct.unpack_from(">II", block, 4)
        if nbytes > per_block or nbytes > left:
            raise XfsDamage(f"{what}: remote value block {valueblk + i} claims {nbytes} bytes")
        parts.append(block[REMOTE_HDR:REMOTE_HDR + nbytes])
        left -= nbytes
    return b"".join(parts)
