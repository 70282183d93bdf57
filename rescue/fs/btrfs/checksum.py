"""btrfs checksums: crc32c, xxhash64, sha256, blake2b-256 (fs/btrfs/disk-io.c
csum_tree_block, btrfs_check_super_csum; crypto/crc32c.c) and the directory
name hash (fs/btrfs/ctree.h btrfs_name_hash: crc32c seeded with ~1, no final xor).

crc32c comes from rescue/crc32c.py (google-crc32c in C when installed).
"""

from __future__ import annotations

import hashlib
from typing import Callable

from ...crc32c import crc32c, crc32c_register
from .structs import CSUM_BLAKE2, CSUM_CRC32C, CSUM_SHA256, CSUM_XXHASH

try:
    import xxhash as _xxhash
except ImportError:   # pragma: no cover
    _xxhash = None


def name_hash(name: bytes) -> int:
    """btrfs_name_hash: the key offset of DIR_ITEM and XATTR_ITEM."""
    return crc32c_register(0xFFFFFFFE, name)


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
