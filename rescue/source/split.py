"""Split raw images (`disk.000`, `disk.001`, ... / `disk.001`, `disk.002` /
`disk.aa`, `disk.ab`) read as one disk, and `ConcatSource`, the byte source
that joins byte ranges of several sources (also used for Parallels split
storages).

A split set has no header to detect by content: it is recognised by name,
here in the source layer, only when the file given is the first segment and
the next segment exists next to it (the naming dd/split, FTK Imager and
dfvfs's test data use).
"""

from __future__ import annotations

import os
import re
import threading
from bisect import bisect_right
from typing import Iterator, Sequence

from ..errors import RescueError, SourceError
from ..lru import LRU
from .base import ByteSource, FileSource, Run, runs as source_runs

MAX_SEGMENTS = 10000

_NUMERIC = re.compile(r"^(?P<stem>.+\.)(?P<num>\d{3,})$")
_ALPHA = re.compile(r"^(?P<stem>.+\.)(?P<tag>[a-z]{2,3}|[A-Z]{2,3})$")


class ConcatSource:
    """Byte ranges of several sources, one after another: parts are
    (size, source); a part whose source is shorter reads as zeros past its end."""

    def __init__(self, parts: Sequence[tuple[int, ByteSource]], name: str | None = None) -> None:
        if not parts:
            raise ValueError("ConcatSource needs at least one part")
        self.parts = list(parts)
        self.starts: list[int] = []
        pos = 0
        for size, _ in self.parts:
            self.starts.append(pos)
            pos += size
        self.size = pos
        self.name = name or self.parts[0][1].name
        ids = tuple(getattr(s, "identity", None) or s.name for _, s in self.parts)
        self.identity = ("concat",) + ids

    def _spans(self, offset: int, length: int) -> Iterator[tuple[int, int, int, ByteSource]]:
        """(virtual offset, length, offset in part, part source) covering the range."""
        end = min(offset + length, self.size)
        i = max(0, bisect_right(self.starts, offset) - 1)
        pos = offset
        while pos < end and i < len(self.parts):
            size, src = self.parts[i]
            inside = pos - self.starts[i]
            n = min(size - inside, end - pos)
            if n > 0:
                yield pos, n, inside, src
                pos += n
            i += 1

    def read(self, offset: int, length: int) -> bytes:
        if offset >= self.size or length <= 0:
            return b""
        out = []
        for _, n, inside, src in self._spans(offset, length):
            data = src.read(inside, n)
            out.append(data if len(data) == n else data + bytes(n - len(data)))
        return out[0] if len(out) == 1 else b"".join(out)

    def runs(self, offset: int, length: int) -> Iterator[Run]:
        pend: list | None = None
        for r in self._part_runs(offset, length):
            if pend is not None and pend[2] == r[2] and pend[0] + pend[1] == r[0]:
                pend[1] += r[1]   # one run across a segment boundary
                continue
            if pend is not None:
                yield Run(*pend)
            pend = list(r)
        if pend is not None:
            yield Run(*pend)

    def _part_runs(self, offset: int, length: int) -> Iterator[tuple[int, int, str]]:
        for pos, n, inside, src in self._spans(offset, length):
            have = max(0, min(n, src.size - inside))
            if have:
                for r in source_runs(src, inside, have):
                    yield r.offset - inside + pos, r.length, r.kind
            if have < n:
                yield pos + have, n - have, "zero"

    def open_relative(self, name: str) -> ByteSource:
        from .base import open_relative
        return open_relative(self.parts[0][1], name)

    def close(self) -> None:
        for _, src in self.parts:
            src.close()


class _Segment:
    """One segment file of a split set, opened only while it is being read:
    a set may have more segments than the process may hold open files."""

    MAX_OPEN = 32
    _open: "LRU[_Segment, FileSource]" = LRU(MAX_OPEN, on_evict=lambda segment, f: f.close())
    _lock = threading.Lock()

    def __init__(self, path: str) -> None:
        self.path = self.name = path
        try:
            st = os.stat(path)
        except OSError as exc:
            raise SourceError(f"split segment cannot be read ({exc.strerror})", file=path) from None
        self.size = st.st_size
        self.identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def _file(self) -> FileSource:
        return _Segment._open.get(self, lambda: FileSource(self.path))

    def read(self, offset: int, length: int) -> bytes:
        with _Segment._lock:   # no thread may close a file another is reading
            return self._file().read(offset, length)

    def close(self) -> None:
        with _Segment._lock:
            f = _Segment._open.pop(self, None)
            if f is not None:
                f.close()


def _next_name(path: str) -> str | None:
    base = os.path.basename(path)
    m = _NUMERIC.match(base)
    if m:
        num = m.group("num")
        return m.group("stem") + str(int(num) + 1).zfill(len(num))
    m = _ALPHA.match(base)
    if m:
        tag = m.group("tag")
        first = "A" if tag.isupper() else "a"
        digits = [ord(c) - ord(first) for c in tag]
        i = len(digits) - 1
        while i >= 0 and digits[i] == 25:
            digits[i] = 0
            i -= 1
        if i < 0:
            return None
        digits[i] += 1
        return m.group("stem") + "".join(chr(ord(first) + d) for d in digits)
    return None


def _is_first_segment(path: str) -> bool:
    base = os.path.basename(path)
    m = _NUMERIC.match(base)
    if m:
        value = int(m.group("num"))
        if value == 0:
            return True
        # `.001` starts a set only when there is no `.000` before it.
        zero = m.group("stem") + "0".zfill(len(m.group("num")))
        return value == 1 and not os.path.exists(os.path.join(os.path.dirname(path), zero))
    m = _ALPHA.match(base)
    return bool(m) and set(m.group("tag").lower()) == {"a"}


def split_segments(path: str) -> list[str]:
    """The segment files of the split set starting at `path` (just [path]
    when it is not the first of a set of two or more)."""
    if not _is_first_segment(path):
        return [path]
    folder = os.path.dirname(path)
    names = [path]
    while len(names) < MAX_SEGMENTS:
        nxt = _next_name(names[-1])
        if nxt is None:
            break
        cand = os.path.join(folder, nxt)
        if not os.path.isfile(cand):
            break
        names.append(cand)
    return names


def open_split(source: ByteSource, *, member: str | None = None, progress=None,
               partial: bool = False) -> ByteSource | None:
    """One source over a whole split raw set when `source` is its first
    segment (a local file); None otherwise. An unwrapper for open_source."""
    path = getattr(source, "path", None)
    if not isinstance(source, FileSource) or not path or member is not None:
        return None
    names = split_segments(path)
    if len(names) < 2:
        return None
    parts: list[tuple[int, ByteSource]] = [(source.size, source)]
    try:
        for name in names[1:]:
            seg = _Segment(name)
            parts.append((seg.size, seg))
    except RescueError:
        return None   # a segment vanished or is unreadable: read the first one alone
    return ConcatSource(parts, name=path)
