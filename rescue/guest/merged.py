"""The guest as one tree: the root filesystem with the others mounted where
its /etc/fstab says, the way the server saw its files.

Paths go to the filesystem with the longest mountpoint prefix; a directory
that is a mountpoint shows the mounted filesystem's root, not the (usually
empty) directory underneath. Entries keep their backend's inode (backends read
by it) and carry `dev`, the index of their filesystem, so (dev, inode) stays
unique for hard-link detection across filesystems.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

from ..errors import GuestPathError, RescueError
from ..fs.base import Entry, FileSystem, FsInfo, normalize
from ..volume.base import Volume
from .fstab import FstabEntry, match_volume, parse_fstab


class MergedFileSystem(FileSystem):
    backend = "merged"

    def __init__(self, root: FileSystem, mounts: dict[str, FileSystem]) -> None:
        self.root = root
        self.mounts = {normalize(m): fs for m, fs in mounts.items() if normalize(m) != "/"}
        # dev 0 is the root, so a tree without mounts looks like the root itself.
        self._fs = [root] + list(self.mounts.values())
        self._dev = {mp: i + 1 for i, mp in enumerate(self.mounts)}
        self._by_len = sorted(self.mounts, key=len, reverse=True)
        base = root.info
        self.info = FsInfo(type=base.type, label=base.label, uuid=base.uuid, block_size=base.block_size,
                           size=base.size, used=base.used, free=base.free,
                           details=dict(base.details, mounts={mp: fs.info.type for mp, fs in self.mounts.items()}))

    # -- routing -------------------------------------------------------------

    def _route(self, path: str) -> tuple[FileSystem, str, int]:
        """(filesystem, path inside it, dev) for a guest path."""
        for mp in self._by_len:
            if path == mp or path.startswith(mp + "/"):
                return self.mounts[mp], path[len(mp):] or "/", self._dev[mp]
        return self.root, path, 0

    def _outer(self, entry: Entry, path: str, dev: int) -> Entry:
        return replace(entry, path=path, dev=dev)

    def _inner(self, entry: Entry) -> tuple[FileSystem, Entry]:
        fs, inner, dev = self._route(normalize(entry.path))
        if entry.dev != dev:
            raise GuestPathError(f"{entry.path} does not belong to this tree (dev {entry.dev}, expected {dev})")
        return fs, replace(entry, path=inner, dev=0)

    # -- FileSystem ----------------------------------------------------------

    def stat(self, path: str) -> Entry:
        path = normalize(path)
        fs, inner, dev = self._route(path)
        return self._outer(fs.stat(inner), path, dev)

    def listdir(self, path: str) -> list[Entry]:
        path = normalize(path)
        fs, inner, dev = self._route(path)
        out = {}
        for e in fs.listdir(inner):
            full = posixpath.join(path, e.name)
            out[e.name] = self._outer(e, full, dev)
        # Mountpoints directly below this directory show the mounted root.
        for mp in self.mounts:
            if mp != path and posixpath.dirname(mp) == path:
                try:
                    out[posixpath.basename(mp)] = self.stat(mp)
                except RescueError:
                    continue
        return list(out.values())

    def read_chunks(self, entry: Entry, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        fs, inner = self._inner(entry)
        return fs.read_chunks(inner, chunk_size)

    def read_range(self, entry: Entry, offset: int, length: int) -> bytes:
        fs, inner = self._inner(entry)
        return fs.read_range(inner, offset, length)

    def data_ranges(self, entry: Entry) -> list[tuple[int, int]] | None:
        fs, inner = self._inner(entry)
        return fs.data_ranges(inner)

    def xattrs(self, entry: Entry) -> dict[str, bytes]:
        fs, inner = self._inner(entry)
        return fs.xattrs(inner)

    def close(self) -> None:
        for fs in self._fs:
            fs.close()


@dataclass
class MountRow:
    """One line of the reconstructed mount table `inspect` shows."""

    mountpoint: str
    spec: str
    volume: str | None        # volume id ("2", "vg0/var") or None
    fstype: str
    status: str               # "mounted", "skipped: swap", "not found: UUID=...", "failed: ..."

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def build_mount_table(root_fs: FileSystem, volumes: list[Volume],
                      open_fs: Callable[[Volume], FileSystem]) -> tuple[list[MountRow], MergedFileSystem]:
    """Read the guest's /etc/fstab from `root_fs` and mount what it names.

    A guest without /etc/fstab is just its root. Entries that cannot be
    mounted are listed with the reason; the rest of the tree still works.
    """
    try:
        text = root_fs.read_file("/etc/fstab", limit=1 << 20).decode("utf-8", "surrogateescape")
    except (RescueError, OSError):
        return [], MergedFileSystem(root_fs, {})
    entries = parse_fstab(text)
    rows: list[MountRow] = []
    mounts: dict[str, FileSystem] = {}
    root_volume: Volume | None = None
    for e in entries:
        if e.mountpoint == "/" and not e.skipped:
            root_volume = match_volume(e, volumes)
    for e in entries:
        row = MountRow(e.mountpoint, e.spec, None, e.fstype, "")
        rows.append(row)
        if e.skipped:
            row.status = f"skipped: {e.skipped}"
            continue
        vol = match_volume(e, volumes)
        row.volume = vol.id if vol else None
        if e.mountpoint == "/":
            row.status = "mounted"
            continue
        if vol is None:
            row.status = f"not found: {e.spec}"
            continue
        if root_volume is not None and vol is root_volume:
            row.status = "skipped: same volume as /"
            continue
        if vol.details.get("unsupported"):
            row.status = f"failed: {vol.details['unsupported']}"
            continue
        try:
            fs = open_fs(vol)
        except RescueError as exc:
            row.status = f"failed: {exc.problem}"
            continue
        except Exception as exc:   # one unreadable volume must not cost the rest of the tree
            row.status = f"failed: {type(exc).__name__}: {exc}"
            continue
        mounts[normalize(e.mountpoint)] = fs
        row.status = "mounted"
    return rows, MergedFileSystem(root_fs, mounts)


def mount_rows_json(rows: list[MountRow]) -> list[dict[str, Any]]:
    return [r.to_json() for r in rows]


__all__ = ["MergedFileSystem", "MountRow", "build_mount_table", "FstabEntry"]
