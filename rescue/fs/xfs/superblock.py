"""The XFS superblock: geometry, features, and whether the log is clean.

References: xfs_format.h (xfs_dsb, xfs_sb_good_version, feature bits),
xfs_sb.c (xfs_validate_sb_common), xfs_log_recover.c (xlog_find_head,
xlog_find_tail, xlog_check_unmount_rec), xfs_log_format.h (xlog_rec_header).
"""

from __future__ import annotations

import logging
import struct
import uuid as uuid_mod
from dataclasses import dataclass

from ...errors import FilesystemError
from ...source.base import ByteSource
from .crc import crc_ok
from .structs import (
    INCOMPAT_BIGTIME, INCOMPAT_FTYPE, INCOMPAT_NAMES, INCOMPAT_NEEDSREPAIR, INCOMPAT_UNREAD,
    INODE_CORE_V2, INODE_CORE_V3, RO_COMPAT_NAMES, SB_CRC_OFF, SB_MAGIC, SB_SIZE, VERSION2_CRCBIT,
    VERSION2_FTYPE, VERSION_DIRV2BIT, VERSION_MOREBITSBIT, VERSION_NLINKBIT, VERSION_NUMBITS,
    XLOG_HEADER_CYCLE_SIZE, XLOG_HEADER_MAGIC, XLOG_OP_HDR_FLAGS, XLOG_UNMOUNT_TRANS, XLOG_VERSION_2,
    LogRecHeader, Superblock,
)

log = logging.getLogger(__name__)
BBSIZE = 512                       # the log counts in 512-byte basic blocks


@dataclass
class XfsSuper:
    """What the reader needs from the primary superblock."""

    version: int                   # 4 or 5
    block_size: int
    block_log: int
    dblocks: int
    agblocks: int
    agcount: int
    agblklog: int
    inode_size: int
    inode_log: int
    inopblog: int
    dir_block_size: int            # bytes per directory block (>= block_size)
    rootino: int
    label: str
    uuid: str
    fdblocks: int
    ftype: bool                    # directory entries carry a file type byte
    bigtime: bool
    crc: bool                      # v5: metadata blocks carry CRC32C + owner headers
    inode_core: int                # bytes of inode core before the data fork
    nlink_v2: bool                 # v4 without NLINKBIT may still hold v1 inodes
    logstart: int
    logblocks: int
    features: list[str]
    needsrepair: bool
    rblocks: int

    def fsb_to_byte(self, fsb: int) -> int | None:
        """Byte offset of filesystem block `fsb` (AG number in the high bits), or None when
        it lies outside the filesystem."""
        agno = fsb >> self.agblklog
        agbno = fsb & ((1 << self.agblklog) - 1)
        if agno >= self.agcount or agbno >= self.agblocks:
            return None
        return (agno * self.agblocks + agbno) << self.block_log


def _pow2(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def parse_superblock(raw: bytes, name: str) -> XfsSuper:
    """Validate and decode the primary superblock; FilesystemError names what is wrong."""
    def bad(problem: str) -> FilesystemError:
        return FilesystemError(f"XFS superblock: {problem}", file=name)

    if len(raw) < SB_SIZE or raw[:4] != SB_MAGIC:
        raise bad("no XFS magic at the start of the volume")
    sb = Superblock.parse(raw[:SB_SIZE])
    version = sb.versionnum & VERSION_NUMBITS
    if version not in (4, 5):
        raise bad(f"version {version} is not one XFS has used since 2.6 kernels (4 or 5)")
    if not _pow2(sb.blocksize) or not 512 <= sb.blocksize <= 65536 or sb.blocksize != 1 << sb.blocklog:
        raise bad(f"block size {sb.blocksize} (log {sb.blocklog}) is not a power of two in 512..65536")
    if not _pow2(sb.inodesize) or not 256 <= sb.inodesize <= 2048 or sb.inodesize != 1 << sb.inodelog:
        raise bad(f"inode size {sb.inodesize} is not a power of two in 256..2048")
    if sb.inodesize > sb.blocksize or sb.inopblock != sb.blocksize // sb.inodesize \
            or 1 << sb.inopblog != sb.inopblock:
        raise bad(f"{sb.inopblock} inodes per block does not match block size {sb.blocksize}")
    if sb.agcount == 0 or sb.agblocks < 5 or sb.agblklog > 31 or (1 << sb.agblklog) < sb.agblocks:
        raise bad(f"allocation groups of {sb.agblocks} blocks (log {sb.agblklog}) x {sb.agcount} are impossible")
    if sb.dblocks == 0 or sb.dblocks > sb.agcount * sb.agblocks:
        raise bad(f"{sb.dblocks} data blocks do not fit {sb.agcount} groups of {sb.agblocks}")
    dir_block = sb.blocksize << sb.dirblklog
    if sb.dirblklog > 16 or dir_block > 65536:
        raise bad(f"directory block size {dir_block} is larger than 64 KiB")
    features: list[str] = []
    crc = version == 5
    if version == 4:
        if not sb.versionnum & VERSION_DIRV2BIT:
            raise bad("version 1 directories (IRIX-era XFS) are not supported")
        more = sb.features2 if sb.versionnum & VERSION_MOREBITSBIT else 0
        if more & VERSION2_CRCBIT:
            raise bad("v4 superblock claims metadata CRCs")
        ftype = bool(more & VERSION2_FTYPE)
        bigtime = False
        needsrepair = False
        nlink_v2 = bool(sb.versionnum & VERSION_NLINKBIT)
        features.append("v4")
        if ftype:
            features.append("ftype")
    else:
        if not crc_ok(raw[:sb.sectsize if 512 <= sb.sectsize <= len(raw) else SB_SIZE], SB_CRC_OFF):
            # The kernel refuses such a superblock; we read on and say so, since it may be all we have.
            log.warning("%s: XFS superblock CRC does not match (damaged superblock?); reading on", name)
        incompat = sb.features_incompat
        unknown = incompat & ~sum(INCOMPAT_NAMES)
        if unknown:
            names = [INCOMPAT_UNREAD.get(1 << b, f"unknown bit {1 << b:#x}") for b in range(32) if unknown >> b & 1]
            raise FilesystemError(f"XFS uses incompatible feature(s) this reader does not know: "
                                  f"{', '.join(names)}", file=name,
                                  hint="try --backend guestfs (a newer kernel may read it)")
        ftype = bool(incompat & INCOMPAT_FTYPE)
        bigtime = bool(incompat & INCOMPAT_BIGTIME)
        needsrepair = bool(incompat & INCOMPAT_NEEDSREPAIR)
        nlink_v2 = True
        features.append("v5")
        features += [n for bit, n in INCOMPAT_NAMES.items() if incompat & bit]
        features += [n for bit, n in RO_COMPAT_NAMES.items() if sb.features_ro_compat & bit]
    if sb.inprogress:
        raise bad("mkfs did not finish (sb_inprogress is set)")
    label = sb.fname.split(b"\0", 1)[0].decode("utf-8", "replace")
    return XfsSuper(
        version=version, block_size=sb.blocksize, block_log=sb.blocklog, dblocks=sb.dblocks,
        agblocks=sb.agblocks, agcount=sb.agcount, agblklog=sb.agblklog, inode_size=sb.inodesize,
        inode_log=sb.inodelog, inopblog=sb.inopblog, dir_block_size=dir_block, rootino=sb.rootino,
        label=label, uuid=str(uuid_mod.UUID(bytes=sb.uuid)), fdblocks=sb.fdblocks, ftype=ftype,
        bigtime=bigtime, crc=crc, inode_core=INODE_CORE_V3 if crc else INODE_CORE_V2,
        nlink_v2=nlink_v2, logstart=sb.logstart, logblocks=sb.logblocks, features=features,
        needsrepair=needsrepair, rblocks=sb.rblocks,
    )


def log_state(source: ByteSource, sb: XfsSuper) -> str:
    """'clean', 'dirty', 'external' or 'unknown: why' for the internal log.

    Like xlog_find_head + xlog_check_unmount_rec: every 512-byte block of the
    log starts with its cycle number (a record header holds it at +4); the head
    is where the cycle drops, and a cleanly unmounted log ends with a record
    holding one operation flagged XLOG_UNMOUNT_TRANS. A few binary-search reads."""
    if sb.logstart == 0:
        return "external"
    start = sb.fsb_to_byte(sb.logstart)
    nbb = (sb.logblocks << sb.block_log) // BBSIZE
    if start is None or nbb < 2 or start + nbb * BBSIZE > source.size:
        return "unknown: the log lies outside the volume"

    def block(i: int) -> bytes:
        data = source.read(start + i * BBSIZE, BBSIZE)
        if len(data) != BBSIZE:
            raise ValueError("short read")
        return data

    def cycle(i: int) -> int:
        data = block(i)
        word = struct.unpack_from(">I", data)[0]
        return struct.unpack_from(">I", data, 4)[0] if word == XLOG_HEADER_MAGIC else word

    first, last = cycle(0), cycle(nbb - 1)
    if first == 0:
        return "unknown: the log was never written"
    if first == last:
        head = nbb          # the whole log is one cycle: the head wrapped to the start
    else:
        lo, hi = 0, nbb - 1  # cycle(lo) == first, cycle(hi) == last
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if cycle(mid) == first:
                lo = mid
            else:
                hi = mid
        head = hi
    # The last record header before the head (at most a record's length back), read in
    # 32 KiB pieces: one or two reads, not hundreds of sectors (a remote image).
    piece = 64
    window = min(nbb, 600)
    back = 0
    while back < window:
        n = min(piece, window - back)
        first_bb = head - back - n          # may be negative: the log wraps
        if first_bb >= 0:
            data = source.read(start + first_bb * BBSIZE, n * BBSIZE)
        else:
            data = b"".join(block(i % nbb) for i in range(first_bb, head - back))
        if len(data) != n * BBSIZE:
            raise ValueError("short read")
        for k in range(n - 1, -1, -1):
            if struct.unpack_from(">I", data, k * BBSIZE)[0] != XLOG_HEADER_MAGIC:
                continue
            i = (first_bb + k) % nbb
            hdr = LogRecHeader.parse(data[k * BBSIZE:(k + 1) * BBSIZE])
            hblocks = 1
            if hdr.h_version & XLOG_VERSION_2 and hdr.h_size > XLOG_HEADER_CYCLE_SIZE:
                hblocks = -(-hdr.h_size // XLOG_HEADER_CYCLE_SIZE)
            if hdr.h_num_logops != 1:
                return "dirty"
            op = block((i + hblocks) % nbb)
            return "clean" if op[XLOG_OP_HDR_FLAGS] & XLOG_UNMOUNT_TRANS else "dirty"
        back += n
    return "unknown: no log record found before the head"
