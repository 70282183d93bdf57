"""Compressed streams read in place, with random access and a cached seek index.

References: RFC 1952 (gzip), RFC 1951 (deflate), RFC 8878 (Zstandard frames),
the .xz file format 1.1.0, bzip2 (Seward). We write no decompressor and no
gzip index of our own:

- gzip, bzip2 and raw deflate (zip members): rapidgzip. The first open reads
  the stream through once (parallel decompression, progress reported); that
  builds rapidgzip's seek index, which we export in gztool format (windows
  stored compressed and sparse: ~330 KiB for a 1 GiB disk) into the cache.
  Later opens import it and seek at once.
- xz: python-xz seeks by xz block, from the stream's own index (no scan).
- zstd: python-zstandard; the first open walks the frames once (decompressing,
  so damage is found early) and caches the frame table. Seeks go to the
  frame's start; a single-frame stream (what `zstd` and `tar --zstd` write)
  can only be decompressed forward, so a backward seek restarts it: a bounded
  chunk cache absorbs small back-and-forth, and a warning says when a restart
  costs a re-read. Same for an xz stream with one block.
"""

from __future__ import annotations

import atexit
import bisect
import io
import logging
import os
import threading
import weakref
from collections import OrderedDict
from typing import Callable

from ..errors import DamagedRange, SourceError
from .base import ByteSource, Window
from .cache import IndexCache
from .fileobj import SourceFile

log = logging.getLogger("rescue.source")

Progress = Callable[[int, int], None]

# How many seek indexes were built (not loaded from the cache): tests check
# that a second open reuses the cached one.
STATS = {"index_builds": 0, "stream_restarts": 0}

READ_CHUNK = 16 << 20          # read-through step while building an index
CACHE_CHUNK = 1 << 20          # unit of the decompressed-chunk cache
CACHE_CHUNKS = 64              # -> at most 64 MiB of decompressed chunks held

# Magic bytes at offset 0 -> codec name.
MAGIC = [
    (b"\x1f\x8b", "gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"BZh", "bzip2"),
]


def detect_codec(source: ByteSource) -> str | None:
    head = source.read(0, 8)
    for magic, name in MAGIC:
        if head.startswith(magic):
            if name == "bzip2" and not (len(head) > 3 and 0x31 <= head[3] <= 0x39):
                continue
            return name
    return None


_open_readers: "weakref.WeakSet" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    # rapidgzip aborts the interpreter if its threads outlive finalisation.
    for reader in list(_open_readers):
        try:
            reader.close()
        except Exception:
            pass


class _ChunkCache:
    """LRU of decompressed CACHE_CHUNK-sized chunks (bounded memory)."""

    def __init__(self, fetch: Callable[[int], bytes]) -> None:
        self._fetch = fetch
        self._chunks: OrderedDict[int, bytes] = OrderedDict()

    def read(self, offset: int, length: int, size: int) -> bytes:
        end = min(offset + length, size)
        parts = []
        pos = offset
        while pos < end:  # one step per MiB chunk, never per sector
            index = pos // CACHE_CHUNK
            chunk = self._chunks.get(index)
            if chunk is None:
                chunk = self._fetch(index * CACHE_CHUNK)
                self._chunks[index] = chunk
                if len(self._chunks) > CACHE_CHUNKS:
                    self._chunks.popitem(last=False)
            else:
                self._chunks.move_to_end(index)
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
        from .base import open_relative
        return open_relative(self.source, name)

    def _error(self, problem: str, hint: str | None = None) -> SourceError:
        return SourceError(problem, file=self.source.name, hint=hint)

    def close(self) -> None:
        self._close_stream()
        if self.owns_source:
            self.owns_source = False
            self.source.close()

    def _close_stream(self) -> None:
        pass


class RapidgzipSource(CompressedSource):
    """gzip, bzip2 or raw deflate through rapidgzip, with a cached index."""

    def __init__(self, source: ByteSource, codec: str, *, cache: IndexCache | None = None,
                 progress: Progress | None = None, name: str | None = None,
                 cache_name: str = "stream") -> None:
        import rapidgzip
        super().__init__(source, name)
        self.codec = codec
        self._raw = SourceFile(source)
        threads = max(1, min(4, os.cpu_count() or 1))
        self._f = rapidgzip.RapidgzipFile(self._raw, parallelization=threads)
        _open_readers.add(self)
        try:
            self._load_or_build(rapidgzip, cache, progress, cache_name)
        except BaseException:
            self._close_stream()
            raise

    def _load_or_build(self, rapidgzip, cache, progress, cache_name) -> None:
        meta = cache.load_json(f"{cache_name}.json") if cache else None
        index_path = cache.path(f"{cache_name}.gzindex") if cache else None
        if meta and index_path and index_path.is_file():
            try:
                with open(index_path, "rb") as fh:
                    self._f.import_index(fh)
                self.size = int(meta["size"])
                return
            except Exception:
                log.info("cached index for %s unusable; rebuilding", self.name)
                self._f.close()
                self._f = rapidgzip.RapidgzipFile(self._raw, parallelization=self._threads())
        self._build(progress)
        if index_path is not None:
            try:
                index_path.parent.mkdir(parents=True, exist_ok=True)
                tmp = index_path.with_name(index_path.name + f".tmp{os.getpid()}")
                self._f.export_index(str(tmp), rapidgzip.IndexFormat.GZTOOL)
                os.replace(tmp, index_path)
                cache.store_json(f"{cache_name}.json", {"size": self.size, "codec": self.codec})
            except Exception as exc:  # cache is an optimisation only
                log.info("could not cache index for %s: %s", self.name, exc)

    @staticmethod
    def _threads() -> int:
        return max(1, min(4, os.cpu_count() or 1))

    def _build(self, progress: Progress | None) -> None:
        """Read the stream through once: builds the index, finds the size, checks CRCs."""
        STATS["index_builds"] += 1
        total = self.source.size
        done = 0
        try:
            while True:
                data = self._f.read(READ_CHUNK)
                if not data:
                    break
                done += len(data)
                if progress:
                    progress(min(self._f.tell_compressed() // 8, total), total)
            consumed = self._f.tell_compressed() // 8
        except Exception as exc:
            raise self._error(f"{self.codec} data is corrupt after {done} decompressed bytes: {exc}",
                              hint="the download may be damaged; check its checksum") from None
        if consumed < total:
            rest = self.source.read(consumed, min(total - consumed, 1 << 16))
            if rest.strip(b"\0"):
                raise self._error(
                    f"{self.codec} stream ends early: {total - consumed} bytes after byte "
                    f"{consumed} are not part of it (truncated or damaged file)",
                    hint="re-download the snapshot and compare its checksum")
        if done == 0:
            raise self._error(f"{self.codec} stream decompresses to nothing")
        self.size = done
        if progress:
            progress(total, total)

    def read(self, offset: int, length: int) -> bytes:
        if offset >= self.size or length <= 0:
            return b""
        length = min(length, self.size - offset)
        with self._lock:
            try:
                self._f.seek(offset)
                return self._f.read(length)
            except Exception as exc:
                raise DamagedRange(f"{self.name}: {self.codec} data at {offset}: {exc}") from None

    def _close_stream(self) -> None:
        f = getattr(self, "_f", None)
        if f is not None:
            self._f = None
            try:
                f.close()
            except Exception:
                pass


class XzSource(CompressedSource):
    """xz through python-xz (block-level seeking from the xz index)."""

    codec = "xz"

    def __init__(self, source: ByteSource, *, name: str | None = None, **_ignored) -> None:
        import lzma

        import xz
        super().__init__(source, name)
        try:
            self._f = xz.open(SourceFile(source), "rb")
            self.size = len(self._f)
            blocks = len(self._f.block_boundaries)
        except (xz.XZError, lzma.LZMAError, EOFError, ValueError) as exc:
            raise self._error(f"xz data is damaged or truncated: {exc}",
                              hint="re-download the snapshot and compare its checksum") from None
        if blocks <= 1 and self.size > 4 * CACHE_CHUNK * CACHE_CHUNKS:
            self._note_single_block("xz stream has a single block")
        self._cache = _ChunkCache(self._fetch)

    def _note_single_block(self, what: str) -> None:
        note = (f"{what}: random access decompresses forward from its start, so reading "
                f"the disk may re-read it several times (slow, but no scratch space)")
        self.notes.append(note)
        log.warning("%s: %s", self.name, note)

    def _fetch(self, offset: int) -> bytes:
        import lzma
        try:
            self._f.seek(offset)
            return self._f.read(CACHE_CHUNK)
        except (lzma.LZMAError, EOFError, ValueError) as exc:
            raise DamagedRange(f"{self.name}: xz data at {offset}: {exc}") from None

    def read(self, offset: int, length: int) -> bytes:
        if offset >= self.size or length <= 0:
            return b""
        with self._lock:
            return self._cache.read(offset, length, self.size)

    def _close_stream(self) -> None:
        try:
            self._f.close()
        except Exception:
            pass


class ZstdSource(CompressedSource):
    """zstd through python-zstandard with a cached frame table."""

    codec = "zstd"

    def __init__(self, source: ByteSource, *, cache: IndexCache | None = None,
                 progress: Progress | None = None, name: str | None = None,
                 cache_name: str = "stream") -> None:
        super().__init__(source, name)
        meta = cache.load_json(f"{cache_name}.zframes.json") if cache else None
        if meta:
            self._frames = [tuple(f) for f in meta["frames"]]
        else:
            self._frames = self._walk(progress)
            if cache:
                cache.store_json(f"{cache_name}.zframes.json", {"frames": self._frames})
        # frames: (compressed offset, compressed size, decompressed offset, decompressed size)
        self.size = self._frames[-1][2] + self._frames[-1][3] if self._frames else 0
        if len(self._frames) == 1 and self.size > 4 * CACHE_CHUNK * CACHE_CHUNKS:
            XzSource._note_single_block(self, "zstd stream is one frame")
        self._starts = [f[2] for f in self._frames]
        self._cursor = None  # [frame index, position in frame, reader]
        self._cache = _ChunkCache(self._fetch)

    def _walk(self, progress: Progress | None) -> list[tuple[int, int, int, int]]:
        """Decompress once, frame by frame, noting where each frame starts and ends."""
        import zstandard
        STATS["index_builds"] += 1
        total = self.source.size
        frames = []
        pos = 0
        out = 0
        dctx = zstandard.ZstdDecompressor(max_window_size=1 << 31)
        try:
            while pos < total:
                head = self.source.read(pos, 8)
                magic = int.from_bytes(head[:4], "little")
                if len(head) >= 8 and magic & 0xFFFFFFF0 == 0x184D2A50:  # skippable frame
                    pos += 8 + int.from_bytes(head[4:8], "little")
                    continue
                if magic != 0xFD2FB528:
                    if not head.strip(b"\0"):
                        break  # zero padding after the last frame
                    raise self._error(f"zstd frame expected at byte {pos}, found {head[:4].hex()}",
                                      hint="the file is damaged or not zstd")
                obj = dctx.decompressobj()
                start, produced = pos, 0
                while not obj.eof:
                    chunk = self.source.read(pos, 1 << 20)
                    if not chunk:
                        raise self._error(f"zstd stream truncated at byte {pos} (frame starting "
                                          f"at {start} is incomplete)",
                                          hint="re-download the snapshot and compare its checksum")
                    produced += len(obj.decompress(chunk))
                    pos += len(chunk) - len(obj.unused_data)
                    if progress:
                        progress(pos, total)
                frames.append((start, pos - start, out, produced))
                out += produced
        except zstandard.ZstdError as exc:
            raise self._error(f"zstd data is corrupt near byte {pos}: {exc}",
                              hint="re-download the snapshot and compare its checksum") from None
        if not frames:
            raise self._error("zstd stream holds no frames")
        return frames

    def _frame_at(self, offset: int) -> int:
        return max(0, bisect.bisect_right(self._starts, offset) - 1)

    def _fetch(self, offset: int) -> bytes:
        import zstandard
        parts = []
        want = min(CACHE_CHUNK, self.size - offset)
        while want > 0:
            index = self._frame_at(offset)
            cstart, csize, ustart, usize = self._frames[index]
            inner = offset - ustart
            cur = self._cursor
            if cur is None or cur[0] != index or cur[1] > inner:
                if cur is not None and cur[0] == index:
                    STATS["stream_restarts"] += 1
                reader = zstandard.ZstdDecompressor(max_window_size=1 << 31).stream_reader(
                    SourceFile(Window(self.source, cstart, csize)), read_size=1 << 20)
                cur = self._cursor = [index, 0, reader]
            try:
                while cur[1] < inner:  # decompress forward to the wanted position
                    skipped = len(cur[2].read(min(inner - cur[1], 8 << 20)))
                    if not skipped:
                        break
                    cur[1] += skipped
                data = cur[2].read(min(want, usize - inner))
            except zstandard.ZstdError as exc:
                self._cursor = None
                raise DamagedRange(f"{self.name}: zstd data at {offset}: {exc}") from None
            if not data:
                break
            cur[1] += len(data)
            parts.append(data)
            offset += len(data)
            want -= len(data)
        return b"".join(parts)

    def read(self, offset: int, length: int) -> bytes:
        if offset >= self.size or length <= 0:
            return b""
        with self._lock:
            return self._cache.read(offset, length, self.size)


def open_compressed(source: ByteSource, codec: str, *, cache: IndexCache | None = None,
                    progress: Progress | None = None, name: str | None = None,
                    cache_name: str = "stream") -> CompressedSource:
    """A random-access decompressed view of `source` compressed with `codec`."""
    if codec in ("gzip", "bzip2", "deflate"):
        return RapidgzipSource(source, codec, cache=cache, progress=progress, name=name,
                               cache_name=cache_name)
    if codec == "zstd":
        return ZstdSource(source, cache=cache, progress=progress, name=name, cache_name=cache_name)
    if codec == "xz":
        return XzSource(source, name=name)
    raise SourceError(f"unknown compression {codec!r}", file=source.name)
