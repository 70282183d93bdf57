"""A block cache with sequential read-ahead for remote byte sources.

Remote reads cost a round trip each, so a source that reads over a network keeps
the blocks it fetched (fixed-size blocks, bounded LRU) and, when the reader goes
sequentially, fetches a growing window ahead (doubling up to `max_readahead`), so
streaming a large file costs few round trips and a small extract moves little.
The HTTP source (http.py) and the SSH source read through it; a source provides
`_fetch(start, end) -> bytes`.
"""

from __future__ import annotations

import threading

from ..lru import LRU
from .base import clip_read


class CachedRemote:
    """Mixin: `read()` through the cache; the subclass implements `_fetch` and sets `size`."""

    size: int

    def _init_cache(self, block_size: int, cache_size: int, max_readahead: int) -> None:
        if block_size <= 0 or cache_size < 4 * block_size:
            raise ValueError("cache must hold at least four blocks")
        self.block_size = block_size
        self.cache_size = cache_size
        # Read-ahead stays within a quarter of the cache so one request's blocks survive.
        self.max_readahead = max(0, min(max_readahead, cache_size // 4))
        self._cache: LRU[int, bytes] = LRU(cache_size, weight=len)
        self._next = -1
        self._readahead = 0
        self._lock = threading.RLock()

    def _fetch(self, start: int, end: int) -> bytes:
        raise NotImplementedError

    def read(self, offset: int, length: int) -> bytes:
        length = clip_read(self.size, offset, length)
        if not length:
            return b""
        with self._lock:
            self._track_sequential(offset, length)
            if length > self.cache_size // 4:
                return self._fetch(offset, offset + length)   # would only flush the cache
            bs = self.block_size
            first, last = offset // bs, (offset + length - 1) // bs
            blocks = self._blocks(first, last)
            data = b"".join(blocks[b] for b in range(first, last + 1))
            skip = offset - first * bs
            return data[skip:skip + length]

    def _track_sequential(self, offset: int, length: int) -> None:
        if offset == self._next and self.max_readahead:
            self._readahead = min(max(self._readahead * 2, self.block_size), self.max_readahead)
        elif offset != self._next:
            self._readahead = 0
        self._next = offset + length

    def _blocks(self, first: int, last: int) -> dict[int, bytes]:
        bs = self.block_size
        nblocks = (self.size + bs - 1) // bs
        got: dict[int, bytes] = {}
        b = first
        while b <= last:
            hit = self._cache.peek(b)
            if hit is not None:
                got[b] = hit
                b += 1
                continue
            end = b
            while end + 1 <= last and (end + 1) not in self._cache:
                end += 1
            if end == last and self._readahead:
                limit = min(nblocks - 1, last + self._readahead // bs)
                while end + 1 <= limit and (end + 1) not in self._cache:
                    end += 1
            data = self._fetch(b * bs, min((end + 1) * bs, self.size))
            for i, blk in enumerate(range(b, end + 1)):
                piece = data[i * bs:(i + 1) * bs]
                self._cache.put(blk, piece)
                if blk <= last:
                    got[blk] = piece
            b = end + 1
        return got

    def _drop_cache(self) -> None:
        with self._lock:
            self._cache.clear()
