"""gzip (RFC 1952, deflate RFC 1951) through indexed_gzip (zran seek points).

The first open reads the stream through once, which builds the index, gives
the size and checks the CRC-32/length trailer; the index (32 KiB window per
seek point, zstd-compressed) is cached. Memory and cache stay bounded:
spacing grows with the file so there are at most a few thousand points.
(rapidgzip was measured too: faster, but its memory grows with the
decompressed size while it builds the index; see README.) A zip deflate
member is framed as a gzip member (`deflate_as_gzip`) and read the same way.
"""

from __future__ import annotations

import io

from ...errors import DamagedRange
from ..base import ByteSource, BytesSource
from ..cache import IndexCache
from ..fileobj import SourceFile
from .base import CACHE_CHUNK, READ_CHUNK, STATS, ChunkCache, CompressedSource, Progress, log

NAME = "gzip"


def detect(source: ByteSource) -> bool:
    return source.read(0, 3) == b"\x1f\x8b\x08"   # CM 8 = deflate, the only method RFC 1952 defines


def open(source: ByteSource, **options) -> CompressedSource:   # noqa: A001 (the registry's verb)
    return GzipSource(source, **options)


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
        self._cache = ChunkCache(self._fetch)

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


def deflate_as_gzip(source: ByteSource, crc32: int | None, size: int) -> ByteSource:
    """A raw deflate stream (a zip member) framed as a gzip member, so that the
    gzip reader can index it: header and trailer come from the zip directory
    (no trailer, crc32 None: a member the end of a cut zip cuts short)."""
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    if crc32 is None:
        return Concat([BytesSource(header), source], name=source.name)
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
