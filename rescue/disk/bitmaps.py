"""Allocation bitmaps (VHD and VHDX sector bitmaps, Bochs extent bitmaps, VMA
block masks) turned into runs of set and clear bits.

The bits are found by a regex over the bitmap's bit string (C speed) instead
of a Python loop per bit: a bitmap costs a few calls, however large.
"""

from __future__ import annotations

import re
from typing import Callable, Iterator

from .mapping import Piece

_RUN_RE = re.compile(r"0+|1+")


def bitmap_runs(bitmap: bytes, nbits: int, lsb_first: bool) -> list[tuple[int, int, int]]:
    """(first_bit, count, bit) runs of the first `nbits` bits of `bitmap`
    (bits past its end count as clear)."""
    width = len(bitmap) * 8
    if lsb_first:
        bits = format(int.from_bytes(bitmap, "little"), f"0{width}b")[::-1]
    else:
        bits = format(int.from_bytes(bitmap, "big"), f"0{width}b")
    bits = bits[:nbits].ljust(nbits, "0")
    return [(m.start(), m.end() - m.start(), 1 if bits[m.start()] == "1" else 0)
            for m in _RUN_RE.finditer(bits)]


def bitmap_pieces(bruns: list[tuple[int, int, int]], unit: int, base: int, start: int, length: int,
                  stored: Callable[[int, int], Piece], absent: Callable[[int, int], Piece]
                  ) -> Iterator[Piece]:
    """Cut [start, start+length) (bytes within a block at virtual `base`) by
    the bitmap runs of `unit`-byte sectors; `stored`/`absent` make the piece
    for (virtual offset, length) of set and clear bits."""
    end = start + length
    for first, count, bit in bruns:
        lo, hi = max(first * unit, start), min((first + count) * unit, end)
        if lo < hi:
            yield (stored if bit else absent)(base + lo, hi - lo)
