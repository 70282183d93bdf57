"""The common part of the compressed-stream readers: a decompressed view with
random access, served from a bounded cache of decompressed chunks (rescue/lru.py).

Within one zstd frame, bzip2 stream or xz block, a decoder can only go
forward, so a backward seek restarts it at the frame start: a few decoders
are kept at different positions and a bounded cache of decompressed chunks
absorbs small back-and-forth; a warning says when a single huge frame makes
random access a re-read (what `zstd`, `tar --zstd` and `bzip2` write).
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from ...errors import SourceError
from ...lru import LRU
from ..base import ByteSource, open_relative
from ..summary import ArchiveSummary, with_outer

log = logging.getLogger("rescue.source")

Progress = Callable[[int, int], None]

# How many seek indexes were built (not loaded from the cache): tests check
# that a second open reuses the cached one.
STATS = {"index_builds": 0, "stream_restarts": 0}

READ_CHUNK = 16 << 20          # read-through step while building an index
CACHE_CHUNK = 1 << 20          # unit of the decompressed-chunk cache
CACHE_CHUNKS = 64              # -> at most 64 MiB of decompressed chunks held
SINGLE_BLOCK_WARNING = 4 * CACHE_CHUNK * CACHE_CHUNKS   # one frame bigger than this: say reads are slow


class ChunkCache:
    """LRU of decompressed CACHE_CHUNK-sized chunks (bounded memory)."""

    def __init__(self, fetch: Callable[[int], bytes]) -> None:
        self._fetch = fetch
        self._chunks: LRU[int, bytes] = LRU(CACHE_CHUNKS)

    def read(self, offset: int, length: int, size: int) -> bytes:
        end = min(offset + length, size)
        parts = []
        pos = offset
        while pos < end:  # one step per MiB chunk, never per sector
            index = pos // CACHE_CHUNK
            chunk = self._chunks.get(index, lambda: self._fetch(index * CACHE_CHUNK))
            start = pos - index * CACHE_CHUNK
            piece = chunk[start:start + (end - pos)]
            if not piece:
                break
            parts.append(piece)
            pos += len(piece)
        return b"".join(parts)


class CompressedSource:
    """A decompressed view of `source` with random access (common part)."""

    codec = "?"

    def __init__(self, source: ByteSource, name: str | None = None) -> None:
        self.source = source
        self.name = name or source.name
        self.size = 0
        self._lock = threading.Lock()
        self.notes: list[str] = []
        self.owns_source = False  # set when this view is what open_source handed out

    def open_relative(self, name: str) -> ByteSource:
        return open_relative(self.source, name)

    def archive_info(self):
        """For `inspect`: a bare compressed disk (or one inside an archive member)."""
        info = ArchiveSummary(format="compressed", compression=self.codec, size=self.size)
        return with_outer(info, self.notes, self.source)

    def _note_single_block(self, what: str) -> None:
        note = (f"{what}: random access decompresses forward from its start, so reading "
                f"the disk may re-read it several times (slow, but no scratch space)")
        self.notes.append(note)
        log.warning("%s: %s", self.name, note)

    def read(self, offset: int, length: int) -> bytes:
        """Served from the subclass's chunk cache (`_cache`, filled by `_fetch`)."""
        if offset >= self.size or length <= 0:
            return b""
        with self._lock:
            return self._cache.read(offset, length, self.size)

    def _error(self, problem: str, hint: str | None = None) -> SourceError:
        return SourceError(problem, file=self.source.name, hint=hint)

    def close(self) -> None:
        self._close_stream()
        if self.owns_source:
            self.owns_source = False
            self.source.close()

    def _close_stream(self) -> None:
        pass
