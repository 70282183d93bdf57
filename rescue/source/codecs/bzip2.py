"""bzip2 (Seward) through the stdlib: each bzip2 stream is a frame."""

from __future__ import annotations

from ..base import ByteSource
from ..fileobj import SourceFile
from .base import CompressedSource, Progress
from .framed import ForwardReader, FramedStreamSource

NAME = "bzip2"


def detect(source: ByteSource) -> bool:
    head = source.read(0, 4)   # "BZh" and the block size '1'..'9'
    return head[:3] == b"BZh" and len(head) > 3 and 0x31 <= head[3] <= 0x39


def open(source: ByteSource, *, cache=None, progress: Progress | None = None, name: str | None = None,   # noqa: A001
         cache_name: str = "stream", partial: bool = False, **_ignored) -> CompressedSource:
    return Bzip2Source(source, cache=cache, progress=progress, name=name, cache_name=cache_name,
                       partial=partial)


TRUNCATED_HINT = ("download it again (`rescue download` resumes), or add --partial to rescue what "
                  "was decompressed before the cut")


class Bzip2Source(FramedStreamSource):
    """bzip2 through the stdlib. Each bzip2 stream is a frame: pbzip2/lbzip2
    output has many and seeks well; `bzip2` output is one stream."""

    codec = "bzip2"

    def _reader(self, frame_source: ByteSource, cut: bool = False):
        import bz2
        if cut:   # the stream the end of the file cuts short: its whole blocks, then a quiet end
            return ForwardReader(frame_source, bz2.BZ2Decompressor())
        return bz2.BZ2File(SourceFile(frame_source))

    def _walk(self, progress: Progress | None) -> list[tuple[int, int, int, int]]:
        import bz2
        total = self.source.size
        frames = []
        pos, out = 0, 0
        while pos < total:
            head = self.source.read(pos, 4)
            if len(head) < 4 and b"BZh".startswith(head[:3]):   # the next stream's header is cut
                self._cut(f"inside the header of the stream starting at byte {pos}", out, out)
                break
            if head[:3] != b"BZh":
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
                            break
                        feed_at += len(chunk)
                    else:
                        chunk = b""
                    produced += len(dec.decompress(chunk, max_length=8 << 20))
                    if progress:
                        progress(min(feed_at, total), total)
            except (OSError, ValueError) as exc:
                raise self._error(f"bzip2 data is corrupt near byte {feed_at}: {exc}",
                                  hint="re-download the snapshot and compare its checksum") from None
            if not dec.eof:   # the file ends inside this stream (an interrupted download)
                self._cut(f"inside the stream starting at byte {start}", out, out + produced)
                if produced:   # its whole bzip2 blocks (up to 900 kB of data each) before the cut
                    frames.append((start, total - start, out, produced))
                break
            pos = feed_at - len(dec.unused_data)
            frames.append((start, pos - start, out, produced))
            out += produced
        return frames

    def _cut(self, where: str, whole: int, kept: int) -> None:
        """Refused in one line, or with --partial noted: what decoded before the cut is read."""
        before = f"; {whole} bytes decompress from the whole streams before it" if whole else ""
        problem = f"bzip2 stream is truncated: the file ends at byte {self.source.size}, {where}{before}"
        if not self.partial:
            raise self._error(problem, hint=TRUNCATED_HINT)
        self.truncated = problem
        self.notes.append(f"{problem}; --partial: reading the {kept} bytes decompressed before the cut")
