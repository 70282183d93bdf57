"""zstd (RFC 8878 frames) through python-zstandard. The frame table is found
by hopping over block headers (no decoding unless a frame does not state its
size) and cached."""

from __future__ import annotations

from construct import BitsInteger, BitStruct, Flag

from ..base import ByteSource, Window
from ..fileobj import SourceFile
from .base import CompressedSource, Progress
from .framed import FramedStreamSource

NAME = "zstd"


def detect(source: ByteSource) -> bool:
    """A zstd frame at 0, or a skippable frame followed by one (what pzstd writes)."""
    head = source.read(0, 8)
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return True
    if len(head) == 8 and int.from_bytes(head[:4], "little") & ZSTD_SKIPPABLE_MASK == ZSTD_SKIPPABLE:
        return source.read(8 + int.from_bytes(head[4:], "little"), 4) == b"\x28\xb5\x2f\xfd"
    return False


def open(source: ByteSource, *, cache=None, progress: Progress | None = None, name: str | None = None,   # noqa: A001
         cache_name: str = "stream", partial: bool = False, **_ignored) -> CompressedSource:
    return ZstdSource(source, cache=cache, progress=progress, name=name, cache_name=cache_name,
                      partial=partial)


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
PZSTD_HEADER = b"\x50\x2a\x4d\x18\x04\x00\x00\x00"   # pzstd: skippable frame holding the next frame's size
TRUNCATED_HINT = ("download it again (`rescue download` resumes), or add --partial to rescue what "
                  "was decompressed before the cut")


class _Cut(Exception):
    """The file ends inside a frame (an interrupted download): what is missing."""


class ZstdSource(FramedStreamSource):
    """zstd through python-zstandard. Frames are found by hopping over block
    headers (RFC 8878 3.1.1.2), not by decoding; a frame without a content
    size in its header is decoded once to measure it."""

    codec = "zstd"

    def _reader(self, frame_source: ByteSource, cut: bool = False):
        import zstandard
        if cut:
            return _CutFrameReader(frame_source)
        return zstandard.ZstdDecompressor(max_window_size=1 << 31).stream_reader(
            SourceFile(frame_source), read_size=1 << 20, read_across_frames=False)

    def _walk(self, progress: Progress | None) -> list[tuple[int, int, int, int]]:
        total = self.source.size
        frames = []
        pos, out = 0, 0
        while pos < total:
            head = self.source.read(pos, 18)
            magic = int.from_bytes(head[:4], "little")
            if magic & ZSTD_SKIPPABLE_MASK == ZSTD_SKIPPABLE:   # pzstd puts one before each frame
                end = pos + 8 + int.from_bytes(head[4:8], "little")
                if len(head) < 8 or end > total:   # frames may follow it: the cut is inside the stream
                    self._cut_between(pos, out, "inside a skippable frame (the next frame's header)")
                    break
                if end == total and head[:8] == PZSTD_HEADER:   # it announces a frame that is not there
                    self._cut_between(pos, out, "after the pzstd header announcing a frame of "
                                                f"{int.from_bytes(head[8:12], 'little')} bytes")
                    break
                pos = end
                continue
            if len(head) < 4 and head.strip(b"\0"):
                self._cut_between(pos, out, "inside the next frame's magic number")
                break
            if magic != ZSTD_MAGIC:
                if not self.source.read(pos, 1 << 16).strip(b"\0"):
                    break  # zero padding after the last frame
                raise self._error(f"zstd frame expected at byte {pos}, found {head[:4].hex()}",
                                  hint="the file is damaged or not zstd")
            start, content_size = pos, None
            try:
                content_size, pos = self._frame_header(head, pos)
                pos = self._skip_blocks(start, pos, total, progress)
            except _Cut as cut:
                frames += self._cut_frame(start, out, content_size, str(cut))
                break
            if content_size is None:
                content_size = self._measure(start, pos - start)
            frames.append((start, pos - start, out, content_size))
            out += content_size
        return frames

    def _cut_frame(self, start: int, out: int, content_size: int | None,
                   missing: str) -> list[tuple[int, int, int, int]]:
        """The file ends inside the frame at `start`: refused in one line, or
        with --partial that frame's blocks before the cut are decoded and kept."""
        total = self.source.size
        stated = f", which should decompress to {content_size} bytes" if content_size is not None else ""
        before = f"; {out} bytes decompress from the whole frames before it" if out else ""
        problem = (f"zstd stream is truncated: the file ends at byte {total}, inside the frame "
                   f"starting at byte {start}{stated} ({missing}){before}")
        if not self.partial:
            raise self._error(problem, hint=TRUNCATED_HINT)
        have = self._measure(start, total - start, cut=True)
        self.truncated = problem
        self.notes.append(f"{problem}; --partial: reading the {out + have} bytes decompressed before the cut")
        return [(start, total - start, out, have)] if have else []

    def _cut_between(self, pos: int, out: int, where: str) -> None:
        """The file ends between frames: refused, or with --partial the whole frames are kept."""
        problem = (f"zstd stream is truncated: the file ends at byte {self.source.size}, {where} "
                   f"starting at byte {pos}; {out} bytes decompress from the whole frames before it")
        if not self.partial:
            raise self._error(problem, hint=TRUNCATED_HINT)
        self.truncated = problem
        self.notes.append(f"{problem}; --partial: reading those")

    def _frame_header(self, head: bytes, pos: int) -> tuple[int | None, int]:
        if len(head) < 6:
            raise _Cut("its header is incomplete")
        fhd = ZstdFrameHeaderDescriptor.parse(head[4:5])
        at = 5 + (0 if fhd.single_segment else 1) + (0, 1, 2, 4)[fhd.dict_id_flag]
        fcs_len = (1 if fhd.single_segment else 0, 2, 4, 8)[fhd.fcs_flag]
        if len(head) < at + fcs_len:
            raise _Cut("its header is incomplete")
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
                if pos > total:
                    raise _Cut(f"a block needs bytes up to {pos}: at least {pos - total} bytes missing")
                raise _Cut(f"the block header at byte {pos} is missing")
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
            raise _Cut(f"its last block needs bytes up to {pos}: {pos - total} bytes missing")
        if progress:
            progress(pos, total)
        return pos

    def _measure(self, start: int, length: int, cut: bool = False) -> int:
        """Decode a frame that does not state its size (`zstd` fed from a pipe),
        or (`cut`) the blocks of a frame the end of the file cuts short:
        the decoder stops quietly after the last whole block."""
        import zstandard
        reader = self._reader(Window(self.source, start, length), cut=cut)
        size = 0
        try:
            while True:
                got = len(reader.read(8 << 20))
                if not got:
                    return size
                size += got
        except zstandard.ZstdError as exc:
            if cut and size:   # damage right at the cut: what came before stands
                return size
            raise self._error(f"zstd data is corrupt in the frame at byte {start}: {exc}",
                              hint="re-download the snapshot and compare its checksum") from None


class _CutFrameReader:
    """Forward reads of a frame the end of the file cuts short. python-zstandard's
    stream_reader returns nothing once its input has ended, even with decoded
    bytes still held back; read_to_iter flushes them, in pieces of at most
    WRITE bytes (memory stays bounded however well the data compressed)."""

    WRITE = 1 << 20

    def __init__(self, source: ByteSource) -> None:
        import zstandard
        self._chunks = zstandard.ZstdDecompressor(max_window_size=1 << 31).read_to_iter(
            SourceFile(source), read_size=1 << 20, write_size=self.WRITE)
        self._out = bytearray()       # decoded, not yet returned
        self._done = False

    def read(self, n: int) -> bytes:
        import zstandard
        while len(self._out) < n and not self._done:
            try:
                self._out += next(self._chunks)
            except StopIteration:
                self._done = True
            except zstandard.ZstdError:   # damage right at the cut: what came before stands
                self._done = True
        out = bytes(self._out[:n])
        del self._out[:n]
        return out
