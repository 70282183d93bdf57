"""The filesystem interface every backend (TSK, libguestfs, native) implements.

Paths are guest paths: absolute, '/'-separated `str` (undecodable bytes kept
with surrogateescape, as `os.fsdecode` does). Backends return `Entry` records and
stream file content; the extract layer never knows which backend it talks to.
"""

from __future__ import annotations

import posixpath
import stat as stat_mod
from dataclasses import dataclass, field
from typing import Iterator

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


class FileSystem:
    """Base class: backends implement stat, listdir, read_chunks; the rest is shared."""

    info: FsInfo
    backend: str = "?"

    def stat(self, path: str) -> Entry:
        """lstat: a symlink is described, not followed. Raises GuestPathError."""
        raise NotImplementedError

    def listdir(self, path: str) -> list[Entry]:
        """The entries of directory `path`, without '.' and '..'."""
        raise NotImplementedError

    def read_chunks(self, entry: Entry, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """The file's bytes, in order, `entry.size` in total. Raises FileReadError."""
        raise NotImplementedError

    def data_ranges(self, entry: Entry) -> list[tuple[int, int]] | None:
        """(offset, length) ranges holding data, for sparse files; None = all data."""
        return None

    def read_range(self, entry: Entry, offset: int, length: int) -> bytes:
        """Random access into a file; backends override when they can do better."""
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
