"""CRC-32C (Castagnoli), the checksum of VHDX headers, XFS v5 metadata and
btrfs trees: one implementation for every reader.

google-crc32c computes it in C (wheels for Linux, macOS and Windows); the
table-driven fallback keeps every reader working without it, only slower.
"""

from __future__ import annotations

try:
    import google_crc32c as _c

    if _c.implementation != "c":   # its own pure-Python fallback is slower than ours
        raise ImportError
except ImportError:   # pragma: no cover - depends on the installation
    _c = None


def _make_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _make_table()


def _register_py(crc: int, data: bytes) -> int:
    table = _TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


def crc32c_register(seed: int, data: bytes) -> int:
    """The CRC register after `data`, starting from `seed`, with no inversion
    before or after: the Linux kernel's crc32c(seed, data)."""
    if _c is not None:
        return ~_c.extend(~seed & 0xFFFFFFFF, data) & 0xFFFFFFFF
    return _register_py(seed, data)


def crc32c(data: bytes) -> int:
    """The standard CRC-32C of `data` (check value of b"123456789": 0xE3069283)."""
    if _c is not None:
        return _c.value(data)
    return ~_register_py(0xFFFFFFFF, data) & 0xFFFFFFFF
