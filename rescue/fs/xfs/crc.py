"""CRC32C of v5 metadata blocks (xfs_cksum.h: crc32c over the block with the
CRC field taken as zero, stored little-endian)."""

from __future__ import annotations

import struct

from ...crc32c import crc32c


def crc_ok(block: bytes, offset: int) -> bool:
    """True when the little-endian CRC at `offset` matches the rest of `block`."""
    if len(block) < offset + 4:
        return False
    stored = struct.unpack_from("<I", block, offset)[0]
    return crc32c(b"".join((block[:offset], b"\0\0\0\0", block[offset + 4:]))) == stored
