"""CRC32C of v5 metadata blocks (xfs_cksum.h: crc32c over the block with the
CRC field taken as zero, stored little-endian)."""

from __future__ import annotations

import struct

try:  # C implementation (wheels for Linux, macOS, Windows); the pure-Python table below is the fallback
    from google_crc32c import value as _crc32c
except ImportError:  # pragma: no cover - exercised only without the wheel
    _crc32c = None

_TABLE: list[int] = []


def _table() -> list[int]:
    if not _TABLE:
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
            _TABLE.append(c)
    return _TABLE


def crc32c(data: bytes) -> int:
    if _crc32c is not None:
        return _crc32c(data)
    table = _table()
    crc = 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def crc_ok(block: bytes, offset: int) -> bool:
    """True when the little-endian CRC at `offset` matches the rest of `block`."""
    if len(block) < offset + 4:
        return False
    stored = struct.unpack_from("<I", block, offset)[0]
    return crc32c(b"".join((block[:offset], b"\0\0\0\0", block[offset + 4:]))) == stored
