"""btrfs checksums: crc32c, xxhash64, sha256, blake2b-256 (fs/btrfs/disk-io.c
csum_tree_block, btrfs_check_super_csum; crypto/crc32c.c) and the directory
name hash (fs/btrfs/ctree.h btrfs_name_hash: crc32c seeded with ~1, no final xor).

crc32c uses google-crc32c (C, wheels everywhere) when installed; a table-driven
fallback keeps the reader working without it (slower: ~1 ms per 16 KiB node).
"""

from __future__ import annotations

import hashlib
from typing import Callable

from .structs import CSUM_BLAKE2, CSUM_CRC32C, CSUM_SHA256, CSUM_XXHASH

try:
    import google_crc32c as _gcrc

    if _gcrc.implementation != "c":   # its pure-Python fallback is slower than ours
        raise ImportError
except ImportError:   # pragma: no cover - depends on the installation
    _gcrc = None

try:
    import xxhash as _xxhash
except ImportError:   # pragma: no cover
    _xxhash = None


def _make_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _make_table()


def _crc32c_raw_py(crc: int, data: bytes) -> int:
    table = _TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


def crc32c_raw(seed: int, data: bytes) -> int:
    """The CRC register after `data`, starting from `seed` (Linux crc32c())."""
    if _gcrc is not None:
        return ~_gcrc.extend(~seed & 0xFFFFFFFF, data) & 0xFFFFFFFF
    return _crc32c_raw_py(seed, data)


def crc32c(data: bytes) -> int:
    """The standard CRC-32C of `data`."""
    if _gcrc is not None:
        return _gcrc.value(data)
    return ~_crc32c_raw_py(0xFFFFFFFF, data) & 0xFFFFFFFF


def name_hash(name: bytes) -> int:
    """btrfs_name_hash: the key offset of DIR_ITEM and XATTR_ITEM."""
    return crc32c_raw(0xFFFFFFFE, name)


def checksummer(csum_type: int) -> Callable[[bytes], bytes] | None:
    """The function producing the stored checksum bytes of a block, or None
    when the type is unknown or its library is missing."""
    if csum_type == CSUM_CRC32C:
        return lambda data: crc32c(data).to_bytes(4, "little")
    if csum_type == CSUM_XXHASH:
        if _xxhash is None:
            return None
        return lambda data: _xxhash.xxh64_intdigest(data).to_bytes(8, "little")
    if csum_type == CSUM_SHA256:
        return lambda data: hashlib.sha256(data).digest()
    if csum_type == CSUM_BLAKE2:
        return lambda data: hashlib.blake2b(data, digest_size=32).digest()
    return None


CSUM_SIZES = {CSUM_CRC32C: 4, CSUM_XXHASH: 8, CSUM_SHA256: 32, CSUM_BLAKE2: 32}
