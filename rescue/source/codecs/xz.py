"""xz (the .xz file format 1.1.0) through python-xz, which seeks by xz block
from the stream's own index (no scan, nothing cached).

A file cut short (an interrupted download) has no index: it is refused in one
line, or with --partial walked forward block by block (XzCutSource; spec 3.1
Block Header: a block written by `xz -T` states its compressed size, so the
walk hops; one without it is decoded to its end) and read up to the cut."""

from __future__ import annotations

import zlib

from ...errors import BAD_BYTES, DamagedRange, SourceError, describe, is_bad_bytes
from ..base import ByteSource, BytesSource, Window
from ..fileobj import SourceFile
from .base import CACHE_CHUNK, SINGLE_BLOCK_WARNING, ChunkCache, CompressedSource, Progress
from .framed import ForwardReader, FramedStreamSource
from .gzip import Concat

NAME = "xz"
XZ_MAGIC = b"\xfd7zXZ\x00"
XZ_FOOTER_MAGIC = b"YZ"
# spec 2.1.1.2: the size of the check of each Check ID (0x00-0x0F)
CHECK_SIZES = (0, 4, 4, 4, 8, 8, 8, 16, 16, 16, 32, 32, 32, 64, 64, 64)
TRUNCATED_HINT = ("download it again (`rescue download` resumes), or add --partial to rescue what "
                  "was decompressed before the cut")


def detect(source: ByteSource) -> bool:
    return source.read(0, 6) == XZ_MAGIC


def open(source: ByteSource, *, name: str | None = None, cache=None, progress: Progress | None = None,   # noqa: A001
         cache_name: str = "stream", partial: bool = False, **_ignored) -> CompressedSource:
    try:
        return XzSource(source, name=name)
    except SourceError as whole_error:
        if not _ends_with_footer(source):   # no index at the end: cut short (an interrupted download)
            if not partial:
                raise SourceError(f"xz stream is truncated: the file ends at byte {source.size} without "
                                  "the stream footer (its index is lost with the end)", file=source.name,
                                  hint=TRUNCATED_HINT) from None
            try:   # read forward up to the cut
                return XzCutSource(source, name=name, cache=None, progress=progress, partial=True)
            except _NotCut:
                pass
        raise whole_error from None


def _ends_with_footer(source: ByteSource) -> bool:
    """spec 2.1.2 and 2.2: the file ends with a stream footer ("YZ"), maybe then stream padding."""
    tail = source.read(max(0, source.size - (1 << 16)), 1 << 16).rstrip(b"\0")
    return tail.endswith(XZ_FOOTER_MAGIC)


class XzSource(CompressedSource):
    """xz through python-xz (block-level seeking from the xz index)."""

    codec = "xz"

    def __init__(self, source: ByteSource, *, name: str | None = None, **_ignored) -> None:
        import xz  # python-xz (this module is rescue.source.codecs.xz)
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
        if blocks <= 1 and self.size > SINGLE_BLOCK_WARNING:
            self._note_single_block("xz stream has a single block")
        self._cache = ChunkCache(self._fetch)

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


class _NotCut(Exception):
    """The forward walk reached a whole end: the file's trouble is damage, not a cut."""


def _varint(buf: bytes, at: int) -> tuple[int, int]:
    """spec 1.2 multibyte integer: (value, position after it)."""
    value = shift = 0
    for i in range(9):
        if at + i >= len(buf):
            raise ValueError("multibyte integer runs past its field")
        byte = buf[at + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at + i + 1
        shift += 7
    raise ValueError("multibyte integer too long")


class XzCutSource(FramedStreamSource):
    """An xz file the end cuts short, read forward. Frames are blocks that state
    their compressed size (hopped over), or the run of blocks from one that does
    not to the next index; each is decoded as its stream header followed by the
    block bytes (liblzma stops quietly where the input ends)."""

    codec = "xz"

    def _reader(self, frame_source: ByteSource, cut: bool = False):
        import lzma
        head = self._heads[frame_source.start]
        return ForwardReader(Concat([BytesSource(head), frame_source], name=frame_source.name),
                             lzma.LZMADecompressor(lzma.FORMAT_XZ))

    def _walk(self, progress: Progress | None) -> list[tuple[int, int, int, int]]:
        self._heads: dict[int, bytes] = {}   # frame start -> its stream header
        total = self.source.size
        frames: list[tuple[int, int, int, int]] = []
        pos = out = 0
        try:
            while pos < total:
                head = self.source.read(pos, 12)
                if len(head) < 12:
                    if pos and not head.strip(b"\0"):
                        raise _NotCut()   # stream padding at the end
                    self._cut(pos, out, f"inside the stream header at byte {pos}")
                    return frames
                if head[:6] != XZ_MAGIC or zlib.crc32(head[6:8]) != int.from_bytes(head[8:12], "little"):
                    if pos and not self.source.read(pos, 1 << 16).strip(b"\0"):
                        pos += 4   # stream padding (spec 2.2)
                        continue
                    raise _NotCut()
                check = CHECK_SIZES[head[7] & 0x0F]
                pos += 12
                while True:   # blocks, then the index
                    if pos >= total:
                        self._cut(pos, out, "where the next block or the index starts")
                        return frames
                    size_byte = self.source.read(pos, 1)[0]
                    if size_byte == 0:   # the index: the stream is whole up to here
                        pos = self._skip_index(pos, total)
                        if pos < 0:
                            self._cut(total, out, "inside the stream's index or footer (every block is whole)")
                            return frames
                        break
                    header = self.source.read(pos, (size_byte + 1) * 4)
                    if len(header) < (size_byte + 1) * 4:
                        self._cut(pos, out, f"inside the block header at byte {pos}")
                        return frames
                    flags = header[1]
                    at = 2
                    csize = usize = None
                    if flags & 0x40:
                        csize, at = _varint(header, at)
                    if flags & 0x80:
                        usize, at = _varint(header, at)
                    if csize is None:   # not stated (`xz` without -T): the rest, decoded to the cut
                        self._heads[pos] = head
                        have = self._measure(pos, total - pos)
                        if self._whole:
                            raise _NotCut()
                        self._cut(pos, out, f"in the blocks from byte {pos} on (their sizes are not stated)")
                        if have:
                            frames.append((pos, total - pos, out, have))
                        return frames
                    end = pos + len(header) + csize + (-csize % 4) + check
                    self._heads[pos] = head
                    if end > total:
                        have = self._measure(pos, total - pos)
                        self._cut(pos, out, f"inside the block starting at byte {pos} "
                                            f"({end - total} bytes of it missing)")
                        if have:
                            frames.append((pos, total - pos, out, have))
                        return frames
                    if usize is None:
                        usize = self._measure(pos, end - pos)
                    frames.append((pos, end - pos, out, usize))
                    out += usize
                    pos = end
                    if progress:
                        progress(pos, total)
        except (ValueError, IndexError):
            raise _NotCut() from None
        raise _NotCut()   # every stream whole: python-xz's complaint was damage

    def _skip_index(self, pos: int, total: int) -> int:
        """spec 4: index indicator, record count, records, padding, CRC32, then the
        12-byte stream footer; the position after it, or -1 when the file ends inside."""
        buf = self.source.read(pos, min(total - pos, 64 << 20))
        try:
            count, at = _varint(buf, 1)
            for _ in range(2 * count):
                _, at = _varint(buf, at)
        except ValueError:
            if pos + len(buf) >= total:   # the records run to the end of the file: cut inside the index
                return -1
            raise
        at += (-at % 4) + 4
        end = pos + at + 12
        if end > total:
            return -1
        if self.source.read(end - 2, 2) != XZ_FOOTER_MAGIC:
            raise ValueError("no stream footer after the index")
        return end

    def _measure(self, start: int, length: int) -> int:
        """Decode from `start` to the end of the window; `_whole`: the stream ended there."""
        reader = self._reader(Window(self.source, start, length))
        size = 0
        try:
            while True:
                got = len(reader.read(8 << 20))
                if not got:
                    break
                size += got
        except Exception as exc:   # LZMAError: damage before the cut
            if not is_bad_bytes(exc) and not isinstance(exc, EOFError):
                raise
            raise self._error(f"xz data is corrupt in the block at byte {start}: {describe(exc)}",
                              hint="re-download the snapshot and compare its checksum") from None
        self._whole = reader.ended
        return size

    def _cut(self, at: int, out: int, where: str) -> None:
        problem = (f"xz stream is truncated: the file ends at byte {self.source.size}, {where}"
                   + (f"; {out} bytes decompress from the whole blocks before it" if out else ""))
        if not self.partial:
            raise self._error(problem, hint=TRUNCATED_HINT)
        self.truncated = problem
        self.notes.append(f"{problem}; --partial: reading what was decompressed before the cut")
