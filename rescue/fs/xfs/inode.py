"""XFS inodes: locate by number, decode the core, map data and attr forks.

References: "XFS Algorithms & Data Structures" (Inode Numbers, On-disk Inode,
Data Extents, B+tree Extent List); xfs_format.h (xfs_dinode, XFS_INO_TO_AGNO /
AGINO / AGBNO / OFFSET, xfs_bmbt_rec, xfs_bmdr_block, xfs_btree_block,
XFS_DFORK_*), xfs_inode_buf.c (xfs_dinode_verify, xfs_inode_from_disk),
xfs_bmap_btree.c (xfs_bmbt_disk_get_all, xfs_bmdr_maxrecs), xfs_inode_util /
linux xfs_iops.c (sysv device numbers).
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass

from ...source.base import ByteSource
from ..base import BLOCK, CHAR, DIR, FIFO, FILE, SOCKET, SYMLINK, FileReadError
from .crc import crc_ok
from .structs import (
    BIGTIME_EPOCH_OFFSET, BMAP_CRC_MAGIC, BMAP_MAGIC, BMBT_CRC_OFF, BMBT_HDR_V4, BMBT_HDR_V5,
    DIFLAG_REALTIME, DIFLAG2_BIGTIME, DIFLAG2_NREXT64, EXT_FLAG_SHIFT, FMT_BTREE, FMT_EXTENTS, FMT_LOCAL,
    FORMAT_NAMES, INODE_CRC_OFF, INODE_FAST, INODE_MAGIC, INODE_V3_FAST, MASK54,
)
from .superblock import XfsSuper

INODE_CHUNK = 64 * 1024          # inode table read in aligned pieces this large
INODE_CHUNKS_CACHED = 256        # 16 MiB
INODES_CACHED = 16384            # decoded inodes (extract lists a tree, then reads it: ~10 MiB)
MAX_BMBT_LEVELS = 10             # 64-bit counts and 16-byte records cannot need more
MAX_EXTENTS = 1 << 24            # a fork claiming more is damage (16 M extents ~ 1 GiB of Python objects)

_REC = struct.Struct(">QQ")
_KINDS = {0o100000: FILE, 0o040000: DIR, 0o120000: SYMLINK, 0o010000: FIFO,
          0o020000: CHAR, 0o060000: BLOCK, 0o140000: SOCKET}


class XfsDamage(FileReadError):
    """One inode, directory or attribute block is unreadable (bad magic, CRC,
    pointer out of range): the file it belongs to is skipped, the rest is read."""


@dataclass(frozen=True)
class Extent:
    offset: int                  # file block
    block: int                   # filesystem block (AG-encoded)
    count: int
    unwritten: bool


@dataclass(slots=True)
class Inode:
    ino: int
    kind: str
    mode: int                    # 07777
    version: int
    data_format: int
    uid: int
    gid: int
    nlink: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    size: int
    nextents: int
    anextents: int
    forkoff: int                 # bytes from the literal area to the attr fork; 0: no attr fork
    attr_format: int
    flags: int
    flags2: int
    raw: bytes                   # the whole inode (forks are read from it)
    core: int                    # size of the core; the data fork starts here

    @property
    def data_fork(self) -> bytes:
        end = self.core + self.forkoff if self.forkoff else len(self.raw)
        return self.raw[self.core:end]

    @property
    def attr_fork(self) -> bytes:
        return self.raw[self.core + self.forkoff:] if self.forkoff else b""


_BIGTIME_NS = BIGTIME_EPOCH_OFFSET * 1_000_000_000


def _time(raw: int, bigtime: bool) -> int:
    if bigtime:
        return raw - BIGTIME_EPOCH_OFFSET * 1_000_000_000
    sec, nsec = raw >> 32, raw & 0xFFFFFFFF
    if sec & 0x80000000:
        sec -= 1 << 32
    return sec * 1_000_000_000 + min(nsec, 999_999_999)


def decode_extents(data: bytes, count: int) -> list[Extent]:
    """`count` packed 16-byte extent records (xfs_bmbt_rec) -> Extents."""
    if len(data) < 16 * count:
        raise XfsDamage(f"{count} extent records do not fit in {len(data)} bytes")
    return [Extent((l0 >> 9) & MASK54, ((l0 & 0x1FF) << 43) | (l1 >> 21), l1 & 0x1FFFFF, bool(l0 >> EXT_FLAG_SHIFT))
            for l0, l1 in _REC.iter_unpack(memoryview(data)[:16 * count])]


def sorted_map(extents: list[Extent], what: str) -> list[Extent]:
    """`extents` sorted by file block; overlapping ones are damage."""
    extents.sort(key=lambda e: e.offset)
    for prev, cur in zip(extents, extents[1:]):
        if cur.offset < prev.offset + prev.count:
            raise XfsDamage(f"{what}: extents overlap at file block {cur.offset}")
    return extents


def extent_records(inode: Inode) -> bytes | None:
    """The packed extent records of a regular file whose map lies in the inode
    (extents format, not realtime), for the walk to keep; None otherwise."""
    if inode.data_format != FMT_EXTENTS or inode.flags & DIFLAG_REALTIME or inode.kind != FILE:
        return None
    end = inode.core + 16 * inode.nextents
    if inode.nextents > MAX_EXTENTS or end > (inode.core + inode.forkoff if inode.forkoff else len(inode.raw)):
        return None   # file_runs decodes the inode again and reports the damage
    return inode.raw[inode.core:end]


class InodeReader:
    """Reads inodes and fork maps of one XFS filesystem; every damage is an XfsDamage."""

    def __init__(self, source: ByteSource, sb: XfsSuper, name: str) -> None:
        self.source = source
        self.sb = sb
        self.name = name
        self._chunks: OrderedDict[int, bytes] = OrderedDict()
        self._inodes: OrderedDict[int, Inode] = OrderedDict()
        self._agino_bits = sb.agblklog + sb.inopblog
        self._last_base, self._last_chunk = -1, b""   # the inode table piece read last

    # -- raw reads -------------------------------------------------------------------------
    def read_fsb(self, fsb: int, count: int, what: str) -> bytes:
        """`count` filesystem blocks from `fsb` (contiguous inside one AG)."""
        start = self.sb.fsb_to_byte(fsb)
        end = self.sb.fsb_to_byte(fsb + count - 1) if count else start
        if start is None or end is None or end < start:
            raise XfsDamage(f"{what}: block {fsb:#x} (+{count}) lies outside the filesystem")
        length = count << self.sb.block_log
        try:
            data = self.source.read(start, length)
        except OSError as exc:
            raise XfsDamage(f"{what}: unreadable at volume offset {start}: {exc}") from None
        if len(data) != length:
            raise XfsDamage(f"{what}: block {fsb:#x} lies past the end of the image (truncated?)")
        return data

    def ino_location(self, ino: int) -> int | None:
        sb = self.sb
        agno = ino >> self._agino_bits
        agbno = (ino >> sb.inopblog) & ((1 << sb.agblklog) - 1)
        if ino <= 0 or agno >= sb.agcount or agbno >= sb.agblocks:
            return None
        offset = ino & ((1 << sb.inopblog) - 1)
        return ((agno * sb.agblocks + agbno) << sb.block_log) + (offset << sb.inode_log)

    def _raw_inode(self, ino: int) -> bytes:
        pos = self.ino_location(ino)
        if pos is None:
            raise XfsDamage(f"inode {ino} is not a valid inode number for this filesystem")
        base = pos - pos % INODE_CHUNK
        if base == self._last_base:   # a directory's inodes mostly lie together: no cache walk
            chunk = self._last_chunk
        else:
            chunk = self._chunk(base, ino)
            self._last_base, self._last_chunk = base, chunk
        raw = chunk[pos - base:pos - base + self.sb.inode_size]
        if len(raw) != self.sb.inode_size:
            raise XfsDamage(f"inode {ino} lies past the end of the image (truncated?)")
        return raw

    def _chunk(self, base: int, ino: int) -> bytes:
        chunk = self._chunks.get(base)
        if chunk is None:
            try:
                chunk = self.source.read(base, INODE_CHUNK)
            except OSError as exc:
                raise XfsDamage(f"inode {ino}: unreadable: {exc}") from None
            self._chunks[base] = chunk
            if len(self._chunks) > INODE_CHUNKS_CACHED:
                self._chunks.popitem(last=False)
        else:
            self._chunks.move_to_end(base)
        return chunk

    # -- inode core -------------------------------------------------------------------------
    def inode(self, ino: int) -> Inode:
        """The decoded inode. Directories are cached (every path lookup passes
        through them); other inodes are decoded once by the walk, which keeps
        what reading the file needs in its Entry (`native`), so caching them
        would only churn the cache on a big tree."""
        cached = self._inodes.get(ino)
        if cached is not None:
            self._inodes.move_to_end(ino)
            return cached
        inode = self._decode(ino)
        if inode.kind == DIR:
            self._inodes[ino] = inode
            if len(self._inodes) > INODES_CACHED:
                self._inodes.popitem(last=False)
        return inode

    def _decode(self, ino: int) -> Inode:
        raw = self._raw_inode(ino)
        (magic, mode, version, fmt, onlink, uid, gid, nlink, _plo, _phi, big_nextents, atime, mtime,
         ctime, size, _nblocks, _extsize, nextents, anextents, forkoff, aformat, _dmev, _dmst, flags,
         _gen, _unlinked) = INODE_FAST.unpack_from(raw)
        if magic != INODE_MAGIC:
            raise XfsDamage(f"inode {ino}: bad magic {magic!r} (not an inode, or damaged)")
        flags2 = 0
        if self.sb.crc:
            if version != 3:
                raise XfsDamage(f"inode {ino}: version {version} on a v5 filesystem")
            if not crc_ok(raw, INODE_CRC_OFF):
                raise XfsDamage(f"inode {ino}: CRC mismatch (damaged inode)")
            _crc, _chg, _lsn, flags2, _cow, _crtime, di_ino, _uuid = INODE_V3_FAST.unpack_from(raw, INODE_CRC_OFF)
            if di_ino != ino:
                raise XfsDamage(f"inode {ino}: records itself as inode {di_ino}")
            core = self.sb.inode_core
        else:
            if version not in (1, 2):
                raise XfsDamage(f"inode {ino}: version {version} on a v4 filesystem")
            core = self.sb.inode_core
        if mode == 0:
            raise XfsDamage(f"inode {ino} is free (mode 0)")
        kind = _KINDS.get(mode & 0o170000)
        if kind is None:
            raise XfsDamage(f"inode {ino}: unknown file type in mode {mode:#o}")
        if size >= 1 << 63:     # XFS_MAXIOFFSET: anything larger is a damaged di_size
            raise XfsDamage(f"inode {ino}: size {size} is larger than XFS allows")
        if flags2 & DIFLAG2_NREXT64:
            nextents, anextents = big_nextents, nextents
        if version == 1:
            nlink = onlink
        fork_bytes = forkoff * 8
        if fork_bytes and core + fork_bytes >= len(raw):
            raise XfsDamage(f"inode {ino}: attr fork offset {fork_bytes} is past the inode")
        if flags2 & DIFLAG2_BIGTIME:   # inline: three calls of _time cost ~1 us a file
            atime_ns, mtime_ns, ctime_ns = atime - _BIGTIME_NS, mtime - _BIGTIME_NS, ctime - _BIGTIME_NS
        else:
            atime_ns, mtime_ns, ctime_ns = _time(atime, False), _time(mtime, False), _time(ctime, False)
        # positional, in field order: keywords cost a third more per inode
        return Inode(ino, kind, mode & 0o7777, version, fmt, uid, gid, nlink, atime_ns, mtime_ns, ctime_ns,
                     size, nextents, anextents, fork_bytes, aformat, flags, flags2, raw, core)

    # -- fork maps --------------------------------------------------------------------------
    def extents(self, inode: Inode, attr: bool = False) -> list[Extent]:
        """The extent map of the data (or attr) fork, sorted by file block."""
        fork = inode.attr_fork if attr else inode.data_fork
        fmt = inode.attr_format if attr else inode.data_format
        count = inode.anextents if attr else inode.nextents
        what = f"inode {inode.ino} {'attr' if attr else 'data'} fork"
        if count > MAX_EXTENTS:
            raise XfsDamage(f"{what}: claims {count} extents")
        if fmt == FMT_EXTENTS:
            if count * 16 > len(fork):
                raise XfsDamage(f"{what}: {count} extents do not fit in the inode")
            out = decode_extents(fork, count)
        elif fmt == FMT_BTREE:
            out = self._btree_extents(fork, count, what)
        else:
            raise XfsDamage(f"{what}: format {FORMAT_NAMES.get(fmt, fmt)} has no extent map")
        return sorted_map(out, what)

    def _btree_extents(self, fork: bytes, count: int, what: str) -> list[Extent]:
        if len(fork) < 4:
            raise XfsDamage(f"{what}: btree root does not fit")
        level, numrecs = struct.unpack_from(">HH", fork)
        maxrecs = (len(fork) - 4) // 16
        if level == 0 or level > MAX_BMBT_LEVELS or numrecs == 0 or numrecs > maxrecs:
            raise XfsDamage(f"{what}: btree root level {level} with {numrecs} records is impossible")
        ptrs = struct.unpack_from(f">{numrecs}Q", fork, 4 + maxrecs * 8)
        out: list[Extent] = []
        seen: set[int] = set()
        for ptr in ptrs:
            self._bmbt_block(ptr, level - 1, out, seen, count, what)
        return out

    def _bmbt_block(self, fsb: int, level: int, out: list[Extent], seen: set[int], count: int,
                    what: str) -> None:
        if fsb in seen:
            raise XfsDamage(f"{what}: btree block {fsb:#x} is referenced twice (loop)")
        seen.add(fsb)
        block = self.read_fsb(fsb, 1, f"{what} btree block")
        sb = self.sb
        magic = block[:4]
        if magic != (BMAP_CRC_MAGIC if sb.crc else BMAP_MAGIC):
            raise XfsDamage(f"{what}: btree block {fsb:#x} has bad magic {magic!r}")
        if sb.crc and not crc_ok(block, BMBT_CRC_OFF):
            raise XfsDamage(f"{what}: btree block {fsb:#x} CRC mismatch")
        blevel, numrecs = struct.unpack_from(">HH", block, 4)
        hdr = BMBT_HDR_V5 if sb.crc else BMBT_HDR_V4
        if blevel != level:
            raise XfsDamage(f"{what}: btree block {fsb:#x} is at level {blevel}, expected {level}")
        if level == 0:
            if hdr + numrecs * 16 > len(block):
                raise XfsDamage(f"{what}: btree leaf {fsb:#x} claims {numrecs} records")
            if len(out) + numrecs > count:
                raise XfsDamage(f"{what}: btree holds more extents than the inode's {count}")
            out.extend(decode_extents(block[hdr:], numrecs))
            return
        maxrecs = (len(block) - hdr) // 16
        if numrecs == 0 or numrecs > maxrecs:
            raise XfsDamage(f"{what}: btree node {fsb:#x} claims {numrecs} records")
        ptrs = struct.unpack_from(f">{numrecs}Q", block, hdr + maxrecs * 8)
        for ptr in ptrs:
            self._bmbt_block(ptr, level - 1, out, seen, count, what)

    def read_mapped(self, extents: list[Extent], lblock: int, nblocks: int, what: str,
                    allow_holes: bool = False) -> bytes:
        """Fork blocks [lblock, lblock + nblocks) through the extent map (metadata reads)."""
        parts: list[bytes] = []
        pos, end = lblock, lblock + nblocks
        for ext in extents:
            if ext.offset + ext.count <= pos:
                continue
            if ext.offset >= end:
                break
            if ext.offset > pos:
                if not allow_holes:
                    raise XfsDamage(f"{what}: block {pos} of the fork is not mapped")
                parts.append(bytes((ext.offset - pos) << self.sb.block_log))
                pos = ext.offset
            take = min(end, ext.offset + ext.count) - pos
            parts.append(self.read_fsb(ext.block + (pos - ext.offset), take, what))
            pos += take
        if pos < end:
            if not allow_holes:
                raise XfsDamage(f"{what}: block {pos} of the fork is not mapped")
            parts.append(bytes((end - pos) << self.sb.block_log))
        return b"".join(parts)


def rdev(inode: Inode) -> tuple[int, int]:
    """A device inode's number: XFS stores the old sysv encoding (14-bit major << 18 | minor)."""
    (dev,) = struct.unpack_from(">I", inode.data_fork)
    return (dev >> 18) & 0x3FFF, dev & 0x3FFFF


__all__ = ["Extent", "Inode", "InodeReader", "XfsDamage", "decode_extents", "extent_records", "rdev",
           "sorted_map", "FMT_LOCAL", "FMT_EXTENTS", "FMT_BTREE"]
