"""The filesystem interface every backend (TSK, libguestfs, native) implements.

Paths are guest paths: absolute, '/'-separated `str` (undecodable bytes kept
with surrogateescape, as `os.fsdecode` does). Backends return `Entry` records and
stream file content; the extract layer never knows which backend it talks to.
"""

from __future__ import annotations

import functools
import posixpath
import stat as stat_mod
from dataclasses import dataclass, field
from typing import ClassVar, Iterator, Sequence, TypeVar

from ..source.base import DATA, HOLE_KINDS, ZERO, ByteSource, Run

R = TypeVar("R", bound=tuple)   # Run, or a reader's record that starts like one (see cover)

# Entry kinds, named like tar's member types.
FILE, DIR, SYMLINK, FIFO, CHAR, BLOCK, SOCKET = "file", "dir", "symlink", "fifo", "char", "block", "socket"

_KIND_BITS = {
    FILE: stat_mod.S_IFREG, DIR: stat_mod.S_IFDIR, SYMLINK: stat_mod.S_IFLNK,
    FIFO: stat_mod.S_IFIFO, CHAR: stat_mod.S_IFCHR, BLOCK: stat_mod.S_IFBLK,
    SOCKET: stat_mod.S_IFSOCK,
}


@dataclass
class Entry:
    """One inode as seen through one name."""

    path: str                     # "/var/lib/docker/volumes/db/_data/x"
    kind: str                     # FILE, DIR, SYMLINK, ...
    mode: int                     # permission bits incl. setuid/setgid/sticky (07777)
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    atime_ns: int | None = None
    ctime_ns: int | None = None
    nlink: int = 1
    inode: int = 0                # unique within one filesystem; hard links share it
    link_target: str | None = None  # symlinks: target verbatim
    rdev: tuple[int, int] | None = None  # (major, minor) for device nodes
    xattrs: dict[str, bytes] | None = None  # None = not loaded yet; see FileSystem.xattrs
    dev: int = 0                  # which filesystem of a stitched guest tree: (dev, inode) is unique
    # The reader's own note on the inode, kept from the walk so reading the
    # file does not parse it again (ext: where a one-piece file lies); opaque
    # to everyone else, None when the reader kept nothing.
    native: object = field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path) or "/"

    @property
    def st_mode(self) -> int:
        return _KIND_BITS[self.kind] | (self.mode & 0o7777)


@dataclass
class FsInfo:
    """What `inspect` shows about a filesystem."""

    type: str                     # "ext4", "vfat", "ntfs", "xfs", ...
    label: str | None = None
    uuid: str | None = None
    block_size: int | None = None
    size: int | None = None
    used: int | None = None
    free: int | None = None
    details: dict = field(default_factory=dict)


class FileReadError(OSError):
    """One file's content could not be read (damaged blocks); skip and report it."""


READ_CHUNK = 4 << 20   # file data is read from the volume in pieces this large


class FileSystem:
    """What every filesystem reader implements, and what every sink consumes.

    A reader says where a file's bytes are (`file_runs`); the base class reads
    them from `source` (chunks, ranges, the sparse map). Readers whose data is
    not stored as is (compressed, inline) override `read_chunks`/`read_range`.
    Registered readers (fs/__init__.py) also offer `detect(source)`.
    """

    info: FsInfo
    backend: ClassVar[str] = "?"
    source: ByteSource
    name: str   # for messages; set by each reader ("snap.qcow2 volume 2")

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "file_runs" in cls.__dict__:
            cls.file_runs = _last_runs_kept(cls.__dict__["file_runs"])  # type: ignore[method-assign]

    @classmethod
    def detect(cls, source: ByteSource) -> bool:
        """True when `source` holds this filesystem (by content, cheaply)."""
        return False

    def stat(self, path: str) -> Entry:
        """lstat: a symlink is described, not followed. Raises GuestPathError."""
        raise NotImplementedError

    def listdir(self, path: str) -> list[Entry]:
        """The entries of directory `path`, without '.' and '..'."""
        raise NotImplementedError

    def file_runs(self, entry: Entry) -> list[Run]:
        """The runs of a regular file in file offsets, covering [0, size) in
        order: DATA runs with `where` (byte offset on `source`) when the bytes
        lie there as they are, ZERO/UNWRITTEN for holes. Raises FileReadError.
        Readers that cannot say (libguestfs) leave it: all data, no `where`."""
        return [Run(0, entry.size, DATA)] if entry.size else []

    def _has_runs(self) -> bool:
        return type(self).file_runs is not FileSystem.file_runs

    def read_chunks(self, entry: Entry, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """The file's bytes, in order, `entry.size` in total. Raises FileReadError."""
        if not self._has_runs():
            raise NotImplementedError
        chunk = max(chunk_size, READ_CHUNK)
        for run in self.file_runs(entry):
            done = 0
            while done < run.length:
                n = min(chunk, run.length - done)
                if run.kind in HOLE_KINDS:
                    yield bytes(n)
                else:
                    yield self._read_run(entry, run, done, n)
                done += n

    def _read_run(self, entry: Entry, run: Run, inside: int, length: int) -> bytes:
        """`length` bytes at `inside` of a DATA run, read from the volume."""
        if run.where is None:
            raise FileReadError(f"{entry.path}: {run.kind} data at offset {run.offset} cannot be read as is")
        file_pos = run.offset + inside
        try:
            data = self.source.read(run.where + inside, length)
        except OSError as exc:   # DamagedRange from a container, an I/O error
            raise FileReadError(f"{entry.path}: unreadable at offset {file_pos}: {exc}") from None
        if len(data) != length:
            raise FileReadError(f"{entry.path}: data at offset {file_pos} lies past the end of the image "
                                "(truncated?)")
        return data

    def data_ranges(self, entry: Entry) -> list[tuple[int, int]] | None:
        """(offset, length) ranges holding data, for sparse files; None = all data."""
        if not self._has_runs():
            return None
        out: list[tuple[int, int]] = []
        for run in self.file_runs(entry):
            if run.kind in HOLE_KINDS:
                continue
            if out and out[-1][0] + out[-1][1] == run.offset:
                out[-1] = (out[-1][0], out[-1][1] + run.length)
            else:
                out.append((run.offset, run.length))
        return out

    def read_range(self, entry: Entry, offset: int, length: int) -> bytes:
        """Random access into a file; backends override when they can do better."""
        if self._has_runs():
            length = max(0, min(length, entry.size - offset))
            out = bytearray(length)   # holes stay zero
            end = offset + length
            for run in self.file_runs(entry):
                lo, hi = max(offset, run.offset), min(end, run.offset + run.length)
                if lo < hi and run.kind not in HOLE_KINDS:
                    out[lo - offset:hi - offset] = self._read_run(entry, run, lo - run.offset, hi - lo)
            return bytes(out)
        out = bytearray()
        pos = 0
        for chunk in self.read_chunks(entry):
            end = pos + len(chunk)
            if end > offset and pos < offset + length:
                out += chunk[max(0, offset - pos):offset + length - pos]
            pos = end
            if pos >= offset + length:
                break
        return bytes(out)

    def xattrs(self, entry: Entry) -> dict[str, bytes]:
        """Extended attributes ('user.x', 'security.selinux', ...)."""
        return {}

    def listing_damage(self, path: str) -> str | None:
        """Why directory `path`, once listed, may be missing entries (it is
        damaged); None when its listing was whole. The extract report counts
        such a directory as partly lost, so the exit code says "partial"."""
        return None

    def read_file(self, path: str, limit: int = 16 << 20) -> bytes:
        """A small file's whole content (e.g. /etc/passwd), following symlinks."""
        entry = self.resolve(path)
        if entry.size > limit:
            raise FileReadError(f"{path} is larger than {limit} bytes")
        return b"".join(self.read_chunks(entry))

    def resolve(self, path: str, max_links: int = 40) -> Entry:
        """stat() that follows symlinks inside the guest (for reading /etc files),
        with targets resolved against the guest root, never the host's."""
        from ..errors import GuestPathError

        seen = 0
        path = normalize(path)
        while True:
            parts = [p for p in path.split("/") if p]
            cur = "/"
            for i, part in enumerate(parts):
                cur = posixpath.join(cur, part)
                entry = self.stat(cur)
                if entry.kind == SYMLINK:
                    seen += 1
                    if seen > max_links:
                        raise GuestPathError(f"too many levels of symbolic links in {path}")
                    target = entry.link_target or ""
                    base = "/" if target.startswith("/") else posixpath.dirname(cur)
                    rest = "/".join(parts[i + 1:])
                    path = normalize(posixpath.join(base, target, rest))
                    break
            else:
                return self.stat(path)

    def walk(self, path: str) -> Iterator[Entry]:
        """The entry at `path` then everything below it, depth first, sorted by
        name. A directory whose listing fails raises FileReadError (the extract
        engine has its own walk that reports and skips such directories)."""
        top = self.stat(path)
        yield top
        if top.kind == DIR:
            yield from self._walk_below(top)

    def _walk_below(self, directory: Entry) -> Iterator[Entry]:
        for child in sorted(self.listdir(directory.path), key=lambda e: e.path):
            yield child
            if child.kind == DIR:
                yield from self._walk_below(child)

    def close(self) -> None:
        pass


def _last_runs_kept(file_runs):
    """file_runs remembering its last answer: extract asks for one file's runs
    three times in a row (the damage check, the sparse map, the read), and
    mapping a file costs an inode parse and an extent walk. Keyed by the Entry
    object itself (held, so its identity cannot be reused) and its size."""
    @functools.wraps(file_runs)
    def kept(self, entry: Entry) -> list[Run]:
        last = self.__dict__.get("_last_runs")
        if last is not None and last[0] is entry and last[1] == entry.size:
            return list(last[2])
        runs = file_runs(self, entry)
        self._last_runs = (entry, entry.size, runs)
        return list(runs)
    return kept


def cover(runs: Sequence[R], size: int) -> list[R]:
    """A file's runs as `file_runs` returns them: sorted `runs` clipped to
    `size`, gaps (and the tail) as ZERO, neighbours that continue each other
    on the volume merged. Readers hand in only what their maps store.

    `runs` may be any NamedTuple that starts with Run's four fields and gives
    defaults to the rest: a reader's own record with a payload (btrfs: the
    compressed extent a piece inflates from). Such fields stay as they are on
    every piece, so they must not depend on where a piece starts (store where
    the extent's first byte would sit, not an offset into it); neighbours
    merge only when those fields are equal too."""
    out: list = []
    pos = 0
    kind_of = type(runs[0]) if runs else Run
    for run in sorted(runs, key=lambda r: r.offset):
        start, end = max(run.offset, pos), min(run.offset + run.length, size)
        if start >= end:
            continue
        if start > pos:
            out.append(kind_of(pos, start - pos, ZERO))
        where = None if run.where is None else run.where + (start - run.offset)
        last = out[-1] if out else None
        if last is not None and last.kind == run.kind and last.offset + last.length == start and (
                (last.where is None and where is None and run.kind != DATA)
                or (last.where is not None and where is not None and last.where + last.length == where)) \
                and last[4:] == run[4:]:
            out[-1] = type(last)(last.offset, last.length + end - start, last.kind, last.where, *last[4:])
        else:
            out.append(type(run)(start, end - start, run.kind, where, *run[4:]))
        pos = end
    if pos < size:
        out.append(kind_of(pos, size - pos, ZERO))
    return out


def normalize(path: str) -> str:
    """An absolute, clean guest path; '..' cannot climb above '/'."""
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
    return "/" + "/".join(parts)
