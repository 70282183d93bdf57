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
import copy
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from ..errors import GuestPathError, RescueError
from ..fs.base import DIR, Entry, FileSystem, FsInfo, normalize
from ..volume.base import Volume
from .fstab import FstabEntry, match_volume, parse_fstab
from .guest_paths import guest_names, mapped_chunks, swap


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
        return _with(entry, path=path, dev=dev)

    def _inner(self, entry: Entry) -> tuple[FileSystem, Entry]:
        # The same inner Entry object for one file asked about in a row (sparse
        # map, read, kernel copy), so the reader's file_runs memo holds.
        last = self.__dict__.get("_last_inner")
        if last is not None and last[0] is entry and last[1] == (entry.path, entry.dev, entry.size):
            return last[2]
        fs, inner, dev = self._route(normalize(entry.path))
        if entry.dev != dev:
            raise GuestPathError(f"{entry.path} does not belong to this tree (dev {entry.dev}, expected {dev})")
        found = fs, _with(entry, path=inner, dev=0)
        self._last_inner = (entry, (entry.path, entry.dev, entry.size), found)
        return found

    # -- FileSystem ----------------------------------------------------------

    def stat(self, path: str) -> Entry:
        path = normalize(path)
        fs, inner, dev = self._route(path)
        with guest_names(inner, path):   # a mounted fs's messages say /var/lib/x, not /lib/x
            return self._outer(fs.stat(inner), path, dev)

    def listdir(self, path: str) -> list[Entry]:
        path = normalize(path)
        fs, inner, dev = self._route(path)
        # Mountpoints directly below this directory show the mounted root in
        # place of the (usually empty) directory underneath.
        covered = {}
        unreadable: dict[str, int] = {}   # name -> dev of a mount whose root cannot be read
        for mp in self.mounts:
            if mp != path and posixpath.dirname(mp) == path:
                try:
                    covered[posixpath.basename(mp)] = self.stat(mp)
                except RescueError:
                    # the directory underneath stands for it, routed to the mount
                    # (whose listing then says why it cannot be read)
                    unreadable[posixpath.basename(mp)] = self._dev[mp]
        # Entries of the underlying fs are kept as they are, twins included:
        # the extract layer reports names that occur twice.
        inner_prefix = inner.rstrip("/") + "/"
        out = []
        with guest_names(inner, path):
            listing = fs.listdir(inner)
        for e in listing:
            # keep the raw name (even "a/b" from a crafted image): extract judges it
            name = e.path[len(inner_prefix):] if e.path.startswith(inner_prefix) else e.name
            if name not in covered:
                out.append(self._outer(e, path.rstrip("/") + "/" + name, unreadable.get(name, dev)))
        return out + list(covered.values())

    def read_chunks(self, entry: Entry, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        fs, inner = self._inner(entry)
        return mapped_chunks(fs.read_chunks(inner, chunk_size), inner.path, entry.path)

    def read_range(self, entry: Entry, offset: int, length: int) -> bytes:
        fs, inner = self._inner(entry)
        with guest_names(inner.path, entry.path):
            return fs.read_range(inner, offset, length)

    def data_ranges(self, entry: Entry) -> list[tuple[int, int]] | None:
        fs, inner = self._inner(entry)
        with guest_names(inner.path, entry.path):
            return fs.data_ranges(inner)

    def xattrs(self, entry: Entry) -> dict[str, bytes]:
        fs, inner = self._inner(entry)
        with guest_names(inner.path, entry.path):
            return fs.xattrs(inner)

    def listing_damage(self, path: str) -> str | None:
        path = normalize(path)
        fs, inner, _dev = self._route(path)
        with guest_names(inner, path):
            why = fs.listing_damage(inner)
        return why if why is None else swap(why, inner, path)

    def close(self) -> None:
        # The filesystems belong to whoever opened them (the Snapshot caches
        # and closes its own); close each one once when the caller asks.
        seen: set[int] = set()
        for fs in self._fs:
            if id(fs) not in seen:
                seen.add(id(fs))
                fs.close()


class SubtreeFileSystem(FileSystem):
    """A directory of another filesystem seen as a filesystem's root (a btrfs
    subvolume of a filesystem opened at its top level)."""

    def __init__(self, fs: FileSystem, prefix: str) -> None:
        self.fs = fs
        self.prefix = normalize(prefix)
        self.backend = fs.backend
        self.info = fs.info

    def _in(self, path: str) -> str:
        path = normalize(path)
        return self.prefix if path == "/" else self.prefix + path

    def _out(self, entry: Entry) -> Entry:
        inner = entry.path[len(self.prefix):] or "/"
        return _with(entry, path=inner)

    def _back(self, entry: Entry) -> Entry:
        return _with(entry, path=self._in(entry.path))

    # Messages of the filesystem underneath name /@/var/lib/x; ours say /var/lib/x.
    def stat(self, path: str) -> Entry:
        with guest_names(self.prefix, "/"):
            return self._out(self.fs.stat(self._in(path)))

    def listdir(self, path: str) -> list[Entry]:
        with guest_names(self.prefix, "/"):
            return [self._out(e) for e in self.fs.listdir(self._in(path))]

    def read_chunks(self, entry: Entry, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        return mapped_chunks(self.fs.read_chunks(self._back(entry), chunk_size), self.prefix, "/")

    def read_range(self, entry: Entry, offset: int, length: int) -> bytes:
        with guest_names(self.prefix, "/"):
            return self.fs.read_range(self._back(entry), offset, length)

    def data_ranges(self, entry: Entry) -> list[tuple[int, int]] | None:
        with guest_names(self.prefix, "/"):
            return self.fs.data_ranges(self._back(entry))

    def xattrs(self, entry: Entry) -> dict[str, bytes]:
        with guest_names(self.prefix, "/"):
            return self.fs.xattrs(self._back(entry))

    def listing_damage(self, path: str) -> str | None:
        with guest_names(self.prefix, "/"):
            why = self.fs.listing_damage(self._in(path))
        return why if why is None else swap(why, self.prefix, "/")

    def close(self) -> None:
        pass   # the filesystem underneath is closed by its owner


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


def _subvol(entry: FstabEntry) -> str | None:
    """The btrfs subvolume an fstab entry names (subvol=@home), as a path."""
    for opt in entry.options:
        if opt.startswith("subvol="):
            return normalize(opt[len("subvol="):])
    return None


def _subvolid(entry: FstabEntry) -> int | None:
    """The btrfs subvolume an fstab entry names by id (subvolid=256)."""
    for opt in entry.options:
        if opt.startswith("subvolid=") and opt[len("subvolid="):].isdigit():
            return int(opt[len("subvolid="):])
    return None


def _open_subvolume(fs: FileSystem, entry: FstabEntry) -> FileSystem | None:
    """The subvolume `entry` mounts, through a reader that opens subvolumes by
    path or id from the top level (the native btrfs reader: subvol=, subvolid=,
    whichever subvolume the reader was opened at); None when `fs` cannot.
    Raises RescueError naming the subvolume when it does not exist."""
    opener = getattr(fs, "subvolume", None)
    subvol, subvolid = _subvol(entry), _subvolid(entry)
    if opener is None or (subvol is None and subvolid is None):
        return None
    return opener(subvol if subvol is not None else subvolid)


def _is_dir(fs: FileSystem, path: str) -> bool:
    try:
        return fs.stat(path).kind == DIR
    except (RescueError, OSError):
        return False


def _read_fstab(fs: FileSystem, path: str) -> str | None:
    try:
        return fs.read_file(path, limit=1 << 20).decode("utf-8", "surrogateescape")
    except (RescueError, OSError):
        return None


def _find_fstab(root_fs: FileSystem) -> tuple[str | None, FileSystem]:
    """(fstab text, the root's view). A btrfs opened at its top level keeps the
    root in a subvolume (Ubuntu '@', Fedora 'root'): look one level down, and
    believe it only when that fstab mounts that subvolume on '/'."""
    text = _read_fstab(root_fs, "/etc/fstab")
    if text is not None:
        return text, root_fs
    try:
        tops = [e for e in root_fs.listdir("/") if e.kind == DIR][:64]
    except (RescueError, OSError):
        return None, root_fs
    for top in sorted(tops, key=lambda e: e.path):
        text = _read_fstab(root_fs, posixpath.join(top.path, "etc/fstab"))
        if text is None:
            continue
        for e in parse_fstab(text):
            if e.mountpoint != "/":
                continue
            try:
                view = _open_subvolume(root_fs, e)
            except RescueError:
                view = None
            if view is not None and _read_fstab(view, "/etc/fstab") == text:
                return text, view
            if _subvol(e) == normalize(top.path):
                return text, SubtreeFileSystem(root_fs, top.path)
    return None, root_fs


def build_mount_table(root_fs: FileSystem, volumes: list[Volume],
                      open_fs: Callable[[Volume], FileSystem]) -> tuple[list[MountRow], MergedFileSystem]:
    """Read the guest's /etc/fstab from `root_fs` and mount what it names.

    A guest without /etc/fstab is just its root. Entries that cannot be
    mounted are listed with the reason; the rest of the tree still works.
    btrfs subvolumes (subvol=) of a filesystem opened at its top level are
    mounted as the subtree of that name.
    """
    text, root_view = _find_fstab(root_fs)
    if text is None:
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
        subvol = _subvol(e)
        same_as_root = root_volume is not None and vol is root_volume
        if same_as_root and subvol is None and _subvolid(e) is None:
            row.status = "skipped: same volume as /"
            continue
        if vol.details.get("unsupported"):
            row.status = f"failed: {vol.details['unsupported']}"
            continue
        try:
            fs = root_fs if same_as_root else open_fs(vol)
        except RescueError as exc:
            row.status = f"failed: {exc.problem}"
            continue
        except Exception as exc:   # one unreadable volume must not cost the rest of the tree
            row.status = f"failed: {type(exc).__name__}: {exc}"
            continue
        try:
            view = _open_subvolume(fs, e)
        except RescueError as exc:
            row.status = f"not found: btrfs subvolume {subvol or _subvolid(e)} ({exc.problem})"
            continue
        if view is not None:
            fs = view
        elif subvol is not None and subvol != "/":
            if not _is_dir(fs, subvol):
                row.status = f"not found: btrfs subvolume {subvol} (not visible from the subvolume opened)"
                continue
            fs = SubtreeFileSystem(fs, subvol)
        mounts[normalize(e.mountpoint)] = fs
        row.status = "mounted"
    return rows, MergedFileSystem(root_view, mounts)


def mount_rows_json(rows: list[MountRow]) -> list[dict[str, Any]]:
    return [r.to_json() for r in rows]


__all__ = ["MergedFileSystem", "MountRow", "SubtreeFileSystem", "build_mount_table", "FstabEntry"]


def _with(entry: Entry, **changes) -> Entry:
    """A copy of `entry` with some fields changed (dataclasses.replace re-runs
    __init__ and cost seconds per 100 000 entries)."""
    out = copy.copy(entry)
    for key, value in changes.items():
        setattr(out, key, value)
    return out
