"""LZO1X decompression and btrfs's LZO framing. The common LZO binding is
GPL (the project is MIT): `lzallright` (MIT, Rust, wheels everywhere) inflates
segments when installed, ~100x faster; the decoder written here is the
fallback and the reference the tests hold it to.

References:
- Linux lib/lzo/lzo1x_decompress_safe.c (the LZO1X instruction set: literal
  runs, M1-M4 matches, the end marker) and Documentation/staging/lzo.rst.
- Linux fs/btrfs/lzo.c: a compressed extent is a le32 total length, then
  segments of (le32 length, LZO1X data) each inflating to at most one sector;
  a segment header never straddles a sector boundary (the rest is padding).
"""

from __future__ import annotations

from typing import Iterator


try:
    from lzallright import LZOCompressor as _Lz
    from lzallright import LZOError as _LzError
except ImportError:   # pragma: no cover - an optional accelerator
    _Lz = None


class LzoError(ValueError):
    pass


def _copy_match(out: bytearray, dist: int, length: int) -> None:
    start = len(out) - dist
    if start < 0:
        raise LzoError("match before the start of the output")
    if dist >= length:
        out += out[start:start + length]
    else:   # overlapping: the last `dist` bytes repeat
        pattern = bytes(out[start:])
        out += (pattern * (length // dist + 1))[:length]


def lzo1x_decompress(src: bytes, limit: int, native: bool = True) -> bytes:
    """Inflate one LZO1X stream; at most `limit` bytes (more is an error)."""
    if native and _Lz is not None:
        try:
            out = _Lz.decompress(src, output_size_hint=limit)
        except _LzError as exc:   # InputNotConsumed (trailing bytes) is one too
            raise LzoError(f"LZO stream: {exc.args[0] if exc.args else exc}") from None
        if len(out) > limit:
            raise LzoError("output larger than expected")
        return out
    try:
        return _decompress(src, limit)
    except IndexError:
        raise LzoError("stream ends in the middle of an instruction") from None


def _decompress(src: bytes, limit: int) -> bytes:
    out = bytearray()
    n = len(src)
    if n < 3:
        raise LzoError("stream too short")
    ip = 0
    state = 0

    def run_length(t: int, base: int) -> int:
        nonlocal ip
        zeros = 0
        while src[ip] == 0:
            zeros += 1
            ip += 1
            if zeros > n:
                raise LzoError("runaway length")
        t += zeros * 255 + base + src[ip]
        ip += 1
        return t

    t = src[0]
    if t > 17:
        ip = 1
        t -= 17
        if t < 4:
            out += src[ip:ip + t]
            ip += t
            state = t
        else:
            out += src[ip:ip + t]
            ip += t
            state = 4
    while True:
        if ip >= n:
            raise LzoError("input ends without the end marker")
        t = src[ip]
        ip += 1
        if t < 16:
            if state == 0:
                if t == 0:
                    t = run_length(0, 15)
                t += 3
                if ip + t > n:
                    raise LzoError("literal run past the input")
                out += src[ip:ip + t]
                ip += t
                state = 4
                if len(out) > limit:
                    raise LzoError("output larger than expected")
                continue
            nxt = t & 3
            if state != 4:   # a 2-byte match close behind
                dist = 1 + (t >> 2) + (src[ip] << 2)
                ip += 1
                length = 2
            else:            # a 3-byte match 2 KiB behind
                dist = 1 + 0x0800 + (t >> 2) + (src[ip] << 2)
                ip += 1
                length = 3
        elif t >= 64:
            nxt = t & 3
            dist = 1 + ((t >> 2) & 7) + (src[ip] << 3)
            ip += 1
            length = (t >> 5) + 1
        elif t >= 32:
            length = (t & 31) + 2
            if length == 2:
                length = run_length(2, 31)
            word = src[ip] | (src[ip + 1] << 8)
            ip += 2
            dist = 1 + (word >> 2)
            nxt = word & 3
        else:                # 16..31: far match or the end marker
            far = (t & 8) << 11
            length = (t & 7) + 2
            if length == 2:
                length = run_length(2, 7)
            word = src[ip] | (src[ip + 1] << 8)
            ip += 2
            dist = far + (word >> 2)
            nxt = word & 3
            if dist == 0:
                if length != 3:
                    raise LzoError("bad end marker")
                return bytes(out)
            dist += 0x4000
        if len(out) + length > limit:
            raise LzoError("output larger than expected")
        _copy_match(out, dist, length)
        state = nxt
        if nxt:
            out += src[ip:ip + nxt]
            ip += nxt


def segments(data: bytes, sectorsize: int) -> Iterator[bytes]:
    """The LZO1X streams of a btrfs LZO extent (or inline item)."""
    if len(data) < 4:
        raise LzoError("extent shorter than its header")
    total = int.from_bytes(data[:4], "little")
    if total > len(data) or total < 4:
        raise LzoError(f"header says {total} bytes, extent holds {len(data)}")
    pos = 4
    while pos < total:
        left_in_sector = sectorsize - pos % sectorsize
        if left_in_sector < 4:
            pos += left_in_sector   # padding: headers never straddle sectors
            if pos >= total:
                break
        seg_len = int.from_bytes(data[pos:pos + 4], "little")
        pos += 4
        if seg_len == 0 or pos + seg_len > total:
            raise LzoError(f"segment of {seg_len} bytes at {pos - 4} runs past the extent")
        yield data[pos:pos + seg_len]
        pos += seg_len


def btrfs_lzo_decompress(data: bytes, sectorsize: int, ram_bytes: int, native: bool = True) -> bytes:
    """A btrfs LZO extent (or inline item) inflated to at most `ram_bytes`."""
    out = bytearray()
    for segment in segments(data, sectorsize):
        out += lzo1x_decompress(segment, max(sectorsize, 4096), native)
        if len(out) >= ram_bytes:
            break
    return bytes(out[:ram_bytes])
