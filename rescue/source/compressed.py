"""Compressed streams read in place, with random access and a cached seek index.

References: RFC 1952 (gzip), RFC 1951 (deflate), RFC 8878 (Zstandard frames),
the .xz file format 1.1.0, bzip2 (Seward). We write no decompressor and no
gzip index of our own:

- gzip (and zip deflate members, framed as gzip): indexed_gzip (zran seek
  points). The first open reads the stream through once, which builds the
  index, gives the size and checks the CRC-32/length trailer; the index
  (32 KiB window per seek point, zstd-compressed) is cached. Memory and
  cache stay bounded: spacing grows with the file so there are at most a few
  thousand points. (rapidgzip was measured too: faster, but its memory grows
  with the decompressed size while it builds the index; see README.)
- xz: python-xz seeks by xz block, from the stream's own index (no scan).
- zstd: python-zstandard; the frame table is found by hopping over block
  headers (no decoding unless a frame does not state its size) and cached.
- bzip2: the stdlib; each bzip2 stream is a frame.

Within one zstd frame, bzip2 stream or xz block, a decoder can only go
forward, so a backward seek restarts it at the frame start: a few decoders
are kept at different positions and a bounded cache of decompressed chunks
absorbs small back-and-forth; a warning says when a single huge frame makes
random access a re-read (what `zstd`, `tar --zstd` and `bzip2` write).
"""

from __future__ import annotations

import bisect
import io
import logging
import threading
from typing import Callable

from construct import BitsInteger, BitStruct, Flag

from ..errors import BAD_BYTES, DamagedRange, SourceError, describe, is_bad_bytes
from ..lru import LRU
from .base import ByteSource, BytesSource, Window
from .cache import IndexCache
from .fileobj import SourceFile
from .summary import ArchiveSummary

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
    (b"\x1f\x8b\x08", "gzip"),  # CM 8 = deflate, the only method RFC 1952 defines
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


class _ChunkCache:
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
        from .base import open_relative
        return open_relative(self.source, name)

    def archive_info(self):
        """For `inspect`: a bare compressed disk (or one inside an archive member)."""
        info = ArchiveSummary(format="compressed", compression=self.codec, size=self.size)
        if self.notes:
            info["notes"] = list(self.notes)
        outer = getattr(self.source, "archive_info", None)
        if outer is not None:
            info["inside"] = outer()
        return info

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


class GzipSource(CompressedSource):
    """gzip through indexed_gzip (zran seek points), with the index cached.

    The first open reads the stream through once: that builds the seek
    points, gives the size, and checks the trailer (CRC-32 and length)."""

    codec = "gzip"

    # Seek points every `spacing` decompressed bytes, each holding a 32 KiB
    # window: aim at TARGET_POINTS whatever the disk size, so the index (RAM
    # and cache) stays in the tens of MiB; never more than MAX_POINTS.
    TARGET_POINTS = 2048
    MAX_POINTS = 4096
    MIN_SPACING, MAX_SPACING = 4 << 20, 1 << 30

    def __init__(self, source: ByteSource, *, cache: IndexCache | None = None,
                 progress: Progress | None = None, name: str | None = None,
                 cache_name: str = "stream", size_hint: int | None = None, partial: bool = False) -> None:
        super().__init__(source, name)
        self._cache_store = cache
        self._cache_name = cache_name
        self.partial = partial          # --partial: a stream cut short gives what it holds
        self.truncated: str | None = None   # then: what was cut (never cached, so a plain open refuses)
        self._spacing = self._spacing_for(size_hint or self._estimate_size())
        self._f = self._open()
        try:
            if not self._load_index():
                while not self._build(progress):  # too many points: wider spacing, again
                    self._close_stream()
                    self._f = self._open()
                if self.truncated is None:
                    self._store_index()
        except BaseException:
            self._close_stream()
            raise
        self._cache = _ChunkCache(self._fetch)

    def _spacing_for(self, size: int) -> int:
        return min(max(size // self.TARGET_POINTS, self.MIN_SPACING), self.MAX_SPACING)

    def _estimate_size(self) -> int:
        """The disk size before decoding it all: the first tar member's size
        when the stream holds a tar (a mostly empty disk compresses 100:1, so
        the compressed size says little), else the trailer's length mod 4 GiB."""
        import tarfile
        import zlib
        guess = self.source.size * 4
        try:
            head = zlib.decompressobj(31).decompress(self.source.read(0, 1 << 16), 1 << 16)
            if head[257:262] == b"ustar":
                tf = tarfile.open(fileobj=io.BytesIO(head + bytes(1 << 16)), mode="r:")
                info = tf.next()
                if info is not None:
                    return max(info.size, guess)
        except (zlib.error, tarfile.TarError, EOFError, ValueError):
            pass
        isize = int.from_bytes(self.source.read(self.source.size - 4, 4), "little")
        return max(isize, guess)

    def _open(self):
        import indexed_gzip
        self._raw = SourceFile(self.source)
        return indexed_gzip.IndexedGzipFile(fileobj=self._raw, spacing=self._spacing,
                                            readbuf_size=1 << 20, buffer_size=1 << 20)

    def _load_index(self) -> bool:
        cache = self._cache_store
        meta = cache.load_json(f"{self._cache_name}.json") if cache else None
        stored = cache.read_bytes(f"{self._cache_name}.gzidx.zst") if (cache and meta) else None
        if not stored:
            return False
        try:
            import zstandard
            data = zstandard.ZstdDecompressor().decompress(stored)
            self._f.import_index(fileobj=io.BytesIO(data))
            self.size = int(meta["size"])
            return True
        except Exception:
            log.info("cached index for %s unusable; rebuilding", self.name)
            self._close_stream()
            self._f = self._open()
            return False

    def _store_index(self) -> None:
        cache = self._cache_store
        if not cache or not cache.enabled:
            return
        try:
            import zstandard
            buf = io.BytesIO()
            self._f.export_index(fileobj=buf)
            # Windows of empty disk space are zeros: compressed, the index shrinks a lot.
            cache.store_bytes(f"{self._cache_name}.gzidx.zst",
                              zstandard.ZstdCompressor(level=3).compress(buf.getvalue()))
            cache.store_json(f"{self._cache_name}.json", {"size": self.size, "codec": self.codec})
        except Exception as exc:  # the cache is an optimisation only
            log.info("could not cache index for %s: %s", self.name, exc)

    def _build(self, progress: Progress | None) -> bool:
        """Read the stream through once; False when the spacing must grow."""
        import zlib
        STATS["index_builds"] += 1
        total = self.source.size
        done, crc = 0, 0
        try:
            while True:
                data = self._f.read(READ_CHUNK)
                if not data:
                    break
                done += len(data)
                if done // self._spacing > self.MAX_POINTS and self._spacing < self.MAX_SPACING:
                    # Far bigger than estimated: start over with room for 4x the size.
                    self._spacing = max(2 * self._spacing, self._spacing_for(4 * done))
                    return False
                crc = zlib.crc32(data, crc)
                if progress:
                    progress(min(self._raw.tell(), total), total)
        except Exception as exc:
            raise self._error(f"gzip data is corrupt after {done} decompressed bytes: {exc}",
                              hint="re-download the snapshot and compare its checksum") from None
        if done == 0:
            raise self._error("gzip stream decompresses to nothing (truncated or damaged)")
        self._check_trailer(done, crc)
        self.size = done
        if progress:
            progress(total, total)
        return True

    def _check_trailer(self, size: int, crc: int) -> None:
        """RFC 1952 2.3.1: a member ends with CRC-32 and ISIZE (length mod 2^32).

        indexed_gzip stops quietly at a cut-off end, so we compare ourselves.
        A stream of several members (BGZF, `cat a.gz b.gz`) ends with the last
        member's trailer only: when the trailer does not match the whole, the
        members are walked once more with zlib, which checks each of them."""
        tail = self.source.read(self.source.size - 8, 8)
        want_crc, want_size = int.from_bytes(tail[:4], "little"), int.from_bytes(tail[4:], "little")
        if want_size == size & 0xFFFFFFFF and want_crc == crc:
            return
        self._verify_members(size)

    def _verify_members(self, size: int) -> None:
        import zlib
        total, pos, members, produced = self.source.size, 0, 0, 0
        dec, fed = zlib.decompressobj(31), False
        try:
            while pos < total:
                chunk = self.source.read(pos, 1 << 20)
                pos += len(chunk)
                while chunk:
                    if not fed and not chunk.strip(b"\0"):
                        break  # zero padding after the last member
                    fed = True
                    produced += len(dec.decompress(chunk, 16 << 20))
                    chunk = dec.unconsumed_tail
                    if dec.eof:
                        members += 1
                        chunk = dec.unused_data
                        dec, fed = zlib.decompressobj(31), False
        except zlib.error as exc:
            raise self._error(f"gzip data is corrupt in member {members + 1}: {exc}",
                              hint="re-download the snapshot and compare its checksum") from None
        if fed or members == 0:
            problem = (f"gzip stream is truncated: member {members + 1} does not end before the end "
                       f"of the file ({size} bytes decompressed)")
            if self.partial:   # everything decompressed before the cut is usable
                self.truncated = problem
                self.notes.append(f"{problem}; --partial: reading the {size} bytes before the cut")
                return
            raise self._error(problem, hint="download it again (`rescue download` resumes), or add --partial "
                                            "to rescue what was decompressed before the cut")
        if produced != size:
            raise self._error(f"gzip stream is damaged: {produced} bytes in its members, "
                              f"{size} read through the index",
                              hint="re-download the snapshot and compare its checksum")

    def _fetch(self, offset: int) -> bytes:
        try:
            self._f.seek(offset)
            return self._f.read(CACHE_CHUNK)
        except Exception as exc:
            raise DamagedRange(f"{self.name}: gzip data at {offset}: {exc}") from None

    def _close_stream(self) -> None:
        f = getattr(self, "_f", None)
        if f is not None:
            self._f = None
            try:
                f.close()
            except Exception:
                pass


def deflate_as_gzip(source: ByteSource, crc32: int, size: int) -> ByteSource:
    """A raw deflate stream (a zip member) framed as a gzip member, so that the
    gzip reader can index it: header and trailer come from the zip directory."""
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    trailer = crc32.to_bytes(4, "little") + (size & 0xFFFFFFFF).to_bytes(4, "little")
    return Concat([BytesSource(header), source, BytesSource(trailer)], name=source.name)


class Concat:
    """Byte sources end to end (a few parts: a linear scan is fine)."""

    def __init__(self, parts: list[ByteSource], name: str) -> None:
        self.parts = parts
        self.name = name
        self.size = sum(p.size for p in parts)
        self.identity = getattr(parts[1] if len(parts) > 1 else parts[0], "identity", None)

    def read(self, offset: int, length: int) -> bytes:
        out = []
        pos = 0
        end = min(offset + max(length, 0), self.size)
        for part in self.parts:
            lo, hi = max(offset, pos), min(end, pos + part.size)
            if lo < hi:
                out.append(part.read(lo - pos, hi - lo))
            pos += part.size
        return b"".join(out)

    def close(self) -> None:
        for part in self.parts:
            part.close()


class XzSource(CompressedSource):
    """xz through python-xz (block-level seeking from the xz index)."""

    codec = "xz"

    def __init__(self, source: ByteSource, *, name: str | None = None, **_ignored) -> None:
        import xz
        super().__init__(source, name)
        try:
            self._f = xz.open(SourceFile(source), "rb")
            self.size = len(self._f)
            blocks = len(self._f.block_boundaries)
        except BAD_BYTES as exc:   # XZError, LZMAError, and OSError for a seek before the start
            if not is_bad_bytes(exc):
                raise
            raise self._error(f"xz data is damaged or truncated: {describe(exc)}",
                              hint="re-download the snapshot and compare its checksum") from None
        if blocks <= 1 and self.size > 4 * CACHE_CHUNK * CACHE_CHUNKS:
            self._note_single_block("xz stream has a single block")
        self._cache = _ChunkCache(self._fetch)

    def _fetch(self, offset: int) -> bytes:
        try:
            self._f.seek(offset)
            return self._f.read(CACHE_CHUNK)
        except BAD_BYTES as exc:   # XZError "Corrupt input data", LZMAError, EOFError...
            if not is_bad_bytes(exc):
                raise
            raise DamagedRange(f"{self.name}: xz data at {offset}: {describe(exc)}") from None

    def _close_stream(self) -> None:
        try:
            self._f.close()
        except Exception:
            pass


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
                 cache_name: str = "stream") -> None:
        super().__init__(source, name)
        key = f"{cache_name}.{self.codec}frames.json"
        meta = cache.load_json(key) if cache else None
        if meta:
            self._frames = [tuple(f) for f in meta["frames"]]
        else:
            STATS["index_builds"] += 1
            self._frames = self._walk(progress)
            if not self._frames:
                raise self._error(f"{self.codec} stream holds no frames")
            if cache:
                cache.store_json(key, {"frames": self._frames})
        # frames: (compressed offset, compressed size, decompressed offset, decompressed size)
        self.size = self._frames[-1][2] + self._frames[-1][3]
        self._starts = [f[2] for f in self._frames]
        self._cursors: list[list] = []  # [frame index, position in frame, reader]
        if len(self._frames) == 1 and self.size > 4 * CACHE_CHUNK * CACHE_CHUNKS:
            self._note_single_block(f"{self.codec} stream is one frame")
        self._cache = _ChunkCache(self._fetch)

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
            best = [index, 0, self._reader(Window(self.source, cstart, csize))]
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


# RFC 8878 3.1.1.1.1: Frame_Header_Descriptor, most significant bit first.
ZstdFrameHeaderDescriptor = BitStruct(
    "fcs_flag" / BitsInteger(2),
    "single_segment" / Flag,
    "unused" / Flag,
    "reserved" / Flag,
    "checksum" / Flag,
    "dict_id_flag" / BitsInteger(2),
)
ZSTD_MAGIC = 0xFD2FB528
ZSTD_SKIPPABLE_MASK, ZSTD_SKIPPABLE = 0xFFFFFFF0, 0x184D2A50


class ZstdSource(FramedStreamSource):
    """zstd through python-zstandard. Frames are found by hopping over block
    headers (RFC 8878 3.1.1.2), not by decoding; a frame without a content
    size in its header is decoded once to measure it."""

    codec = "zstd"

    def _reader(self, frame_source: ByteSource):
        import zstandard
        return zstandard.ZstdDecompressor(max_window_size=1 << 31).stream_reader(
            SourceFile(frame_source), read_size=1 << 20, read_across_frames=False)

    def _walk(self, progress: Progress | None) -> list[tuple[int, int, int, int]]:
        total = self.source.size
        frames = []
        pos, out = 0, 0
        while pos < total:
            head = self.source.read(pos, 18)
            magic = int.from_bytes(head[:4], "little")
            if magic & ZSTD_SKIPPABLE_MASK == ZSTD_SKIPPABLE and len(head) >= 8:
                pos += 8 + int.from_bytes(head[4:8], "little")
                continue
            if magic != ZSTD_MAGIC:
                if not self.source.read(pos, 1 << 16).strip(b"\0"):
                    break  # zero padding after the last frame
                raise self._error(f"zstd frame expected at byte {pos}, found {head[:4].hex()}",
                                  hint="the file is damaged or not zstd")
            start = pos
            content_size, pos = self._frame_header(head, pos)
            pos = self._skip_blocks(start, pos, total, progress)
            if content_size is None:
                content_size = self._measure(start, pos - start)
            frames.append((start, pos - start, out, content_size))
            out += content_size
        return frames

    def _frame_header(self, head: bytes, pos: int) -> tuple[int | None, int]:
        if len(head) < 6:
            raise self._error(f"zstd stream truncated at byte {pos} (frame header)",
                              hint="re-download the snapshot and compare its checksum")
        fhd = ZstdFrameHeaderDescriptor.parse(head[4:5])
        at = 5 + (0 if fhd.single_segment else 1) + (0, 1, 2, 4)[fhd.dict_id_flag]
        fcs_len = (1 if fhd.single_segment else 0, 2, 4, 8)[fhd.fcs_flag]
        size = int.from_bytes(head[at:at + fcs_len], "little") if fcs_len else None
        if fcs_len == 2:
            size += 256
        self._checksum = fhd.checksum
        return size, pos + at + fcs_len

    def _skip_blocks(self, start: int, pos: int, total: int, progress: Progress | None) -> int:
        buf, buf_at = b"", pos
        reported = pos
        while True:  # one step per block (<= 128 KiB): this is the index build, not the data path
            if pos + 3 > buf_at + len(buf):
                buf, buf_at = self.source.read(pos, 1 << 20), pos
            header = buf[pos - buf_at:pos - buf_at + 3]
            if len(header) < 3:
                raise self._error(f"zstd stream truncated at byte {pos} (frame starting at "
                                  f"{start} is incomplete)",
                                  hint="re-download the snapshot and compare its checksum")
            value = int.from_bytes(header, "little")
            last, kind, size = value & 1, (value >> 1) & 3, value >> 3
            if kind == 3:
                raise self._error(f"zstd data is corrupt at byte {pos}: reserved block type",
                                  hint="re-download the snapshot and compare its checksum")
            pos += 3 + (1 if kind == 1 else size)
            if last:
                pos += 4 if self._checksum else 0
                break
            if progress and pos - reported >= 16 << 20:
                reported = pos
                progress(min(pos, total), total)
        if pos > total:
            raise self._error(f"zstd stream truncated: the frame at byte {start} needs {pos} "
                              f"bytes, the file has {total}",
                              hint="re-download the snapshot and compare its checksum")
        if progress:
            progress(pos, total)
        return pos

    def _measure(self, start: int, length: int) -> int:
        """Decode a frame that does not state its size (`zstd` fed from a pipe)."""
        import zstandard
        reader = self._reader(Window(self.source, start, length))
        size = 0
        try:
            while True:
                got = len(reader.read(8 << 20))
                if not got:
                    return size
                size += got
        except zstandard.ZstdError as exc:
            raise self._error(f"zstd data is corrupt in the frame at byte {start}: {exc}",
                              hint="re-download the snapshot and compare its checksum") from None


class Bzip2Source(FramedStreamSource):
    """bzip2 through the stdlib. Each bzip2 stream is a frame: pbzip2/lbzip2
    output has many and seeks well; `bzip2` output is one stream."""

    codec = "bzip2"

    def _reader(self, frame_source: ByteSource):
        import bz2
        return bz2.BZ2File(SourceFile(frame_source))

    def _walk(self, progress: Progress | None) -> list[tuple[int, int, int, int]]:
        import bz2
        total = self.source.size
        frames = []
        pos, out = 0, 0
        while pos < total:
            if self.source.read(pos, 3) != b"BZh":
                if not self.source.read(pos, 1 << 16).strip(b"\0"):
                    break
                raise self._error(f"bzip2 stream expected at byte {pos}",
                                  hint="the file is damaged or not bzip2")
            dec = bz2.BZ2Decompressor()
            start, produced, feed_at = pos, 0, pos
            try:
                while not dec.eof:
                    if dec.needs_input:
                        chunk = self.source.read(feed_at, 1 << 20)
                        if not chunk:
                            raise self._error(
                                f"bzip2 stream truncated at byte {feed_at} (stream starting at "
                                f"{start} is incomplete)",
                                hint="re-download the snapshot and compare its checksum")
                        feed_at += len(chunk)
                    else:
                        chunk = b""
                    produced += len(dec.decompress(chunk, max_length=8 << 20))
                    if progress:
                        progress(min(feed_at, total), total)
            except (OSError, ValueError) as exc:
                raise self._error(f"bzip2 data is corrupt near byte {feed_at}: {exc}",
                                  hint="re-download the snapshot and compare its checksum") from None
            pos = feed_at - len(dec.unused_data)
            frames.append((start, pos - start, out, produced))
            out += produced
        return frames


def open_compressed(source: ByteSource, codec: str, *, cache: IndexCache | None = None,
                    progress: Progress | None = None, name: str | None = None,
                    cache_name: str = "stream", size_hint: int | None = None,
                    partial: bool = False) -> CompressedSource:
    """A random-access decompressed view of `source` compressed with `codec`;
    `partial`: a gzip stream cut short is read up to the cut (a note says so)."""
    if codec == "gzip":
        return GzipSource(source, cache=cache, progress=progress, name=name, cache_name=cache_name,
                          size_hint=size_hint, partial=partial)
    if codec == "bzip2":
        return Bzip2Source(source, cache=cache, progress=progress, name=name, cache_name=cache_name)
    if codec == "zstd":
        return ZstdSource(source, cache=cache, progress=progress, name=name, cache_name=cache_name)
    if codec == "xz":
        return XzSource(source, name=name)
    raise SourceError(f"unknown compression {codec!r}", file=source.name)
