"""Streams made of independently decodable frames (zstd frames, bzip2
streams): a cached frame table and a few forward-only decoders."""

from __future__ import annotations

import bisect

from ...errors import DamagedRange
from ..base import ByteSource, Window
from ..cache import IndexCache
from .base import CACHE_CHUNK, SINGLE_BLOCK_WARNING, STATS, ChunkCache, CompressedSource, Progress


class FramedStreamSource(CompressedSource):
    """A stream made of independently decodable frames (zstd frames, bzip2
    streams), read through forward-only decoders.

    The frame table (compressed and decompressed offsets) is built once and
    cached. A read goes to its frame and decodes forward from the nearest
    decoder already positioned before it (up to MAX_CURSORS kept), else from
    the frame's start: with a single frame that is a re-read from the top."""

    MAX_CURSORS = 4

    def __init__(self, source: ByteSource, *, cache: IndexCache | None = None,
                 progress: Progress | None = None, name: str | None = None,
                 cache_name: str = "stream", partial: bool = False) -> None:
        super().__init__(source, name)
        self.partial = partial          # --partial: a stream cut short gives what it holds
        self.truncated: str | None = None   # then: what was cut (never cached, so a plain open refuses)
        key = f"{cache_name}.{self.codec}frames.json"
        meta = cache.load_json(key) if cache else None
        if meta:
            self._frames = [tuple(f) for f in meta["frames"]]
        else:
            STATS["index_builds"] += 1
            self._frames = self._walk(progress)
            if not self._frames:
                if self.truncated:   # --partial, but the cut falls in the first frame (or bzip2 block)
                    raise self._error(f"{self.truncated}; nothing before the cut can be decompressed",
                                      hint="download it again (`rescue download` resumes)")
                raise self._error(f"{self.codec} stream holds no frames")
            if cache and self.truncated is None:
                cache.store_json(key, {"frames": self._frames})
        # frames: (compressed offset, compressed size, decompressed offset, decompressed size)
        self.size = self._frames[-1][2] + self._frames[-1][3]
        self._starts = [f[2] for f in self._frames]
        self._cursors: list[list] = []  # [frame index, position in frame, reader]
        if len(self._frames) == 1 and self.size > SINGLE_BLOCK_WARNING:
            self._note_single_block(f"{self.codec} stream is one frame")
        self._cache = ChunkCache(self._fetch)

    def _walk(self, progress: Progress | None) -> list[tuple[int, int, int, int]]:
        raise NotImplementedError

    def _reader(self, frame_source: ByteSource):
        raise NotImplementedError

    def _cursor_for(self, index: int, inner: int) -> list:
        best = None
        for cur in self._cursors:
            if cur[0] == index and cur[1] <= inner and (best is None or cur[1] > best[1]):
                best = cur
        if (best is not None and len(self._cursors) < self.MAX_CURSORS
                and inner - best[1] > max(best[1], 16 << 20)):
            # A long jump ahead (the backup GPT at the disk's end): leave this
            # decoder parked near the metadata it serves and reach the target
            # with a new one; that costs at most twice the jump.
            best = None
        if best is None:
            if any(cur[0] == index and cur[1] > inner for cur in self._cursors):
                STATS["stream_restarts"] += 1
            cstart, csize, _, _ = self._frames[index]
            window = Window(self.source, cstart, csize)
            if self.truncated is not None and index == len(self._frames) - 1:   # --partial: cut short
                best = [index, 0, self._reader(window, cut=True)]
            else:
                best = [index, 0, self._reader(window)]
            self._cursors.append(best)
            if len(self._cursors) > self.MAX_CURSORS:
                self._cursors.pop(0)
        else:  # most recently used last
            self._cursors.remove(best)
            self._cursors.append(best)
        return best

    def _fetch(self, offset: int) -> bytes:
        parts = []
        want = min(CACHE_CHUNK, self.size - offset)
        while want > 0:
            index = max(0, bisect.bisect_right(self._starts, offset) - 1)
            _, _, ustart, usize = self._frames[index]
            inner = offset - ustart
            cur = self._cursor_for(index, inner)
            try:
                while cur[1] < inner:  # decode forward to the wanted position
                    skipped = len(cur[2].read(min(inner - cur[1], 8 << 20)))
                    if not skipped:
                        break
                    cur[1] += skipped
                data = cur[2].read(min(want, usize - inner))
            except Exception as exc:
                self._cursors.remove(cur)
                raise DamagedRange(f"{self.name}: {self.codec} data at {offset}: {exc}") from None
            if not data:
                raise DamagedRange(f"{self.name}: {self.codec} frame {index} ends early at {offset}")
            cur[1] += len(data)
            parts.append(data)
            offset += len(data)
            want -= len(data)
        return b"".join(parts)

    def _close_stream(self) -> None:
        self._cursors.clear()


class ForwardReader:
    """Forward reads through a stdlib decompressor object (bz2.BZ2Decompressor,
    lzma.LZMADecompressor) that stop quietly where the input ends: for a frame
    the end of the file cuts short (--partial), everything decoded before the
    cut is given, then b"". Memory stays bounded (max_length per call)."""

    FEED = 1 << 20

    def __init__(self, source: ByteSource, decompressor) -> None:
        self._source = source
        self._dec = decompressor
        self._fed = 0
        self._out = bytearray()

    @property
    def ended(self) -> bool:
        """The stream ended whole (its end marker was decoded)."""
        return self._dec.eof

    def read(self, n: int) -> bytes:
        dec = self._dec
        while len(self._out) < n and not dec.eof:
            if dec.needs_input:
                chunk = self._source.read(self._fed, self.FEED)
                if not chunk:
                    break   # the input ends here (a cut): what was decoded stands
                self._fed += len(chunk)
            else:
                chunk = b""
            self._out += dec.decompress(chunk, max_length=max(n - len(self._out), 1 << 16))
        out = bytes(self._out[:n])
        del self._out[:n]
        return out
