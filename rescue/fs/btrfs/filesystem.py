"""Native read-only btrfs reader: subvolumes, snapshots, compression.

References:
- btrfs docs, On-disk Format (inode item, dir item, file extent item, root
  item/ref) and "Subvolumes" (https://btrfs.readthedocs.io/en/latest/Subvolumes.html).
- Linux include/uapi/linux/btrfs_tree.h; fs/btrfs/inode.c (btrfs_read_locked_inode,
  btrfs_lookup_dentry + fixup_tree_root_location: a subvolume's directory entry
  points at its ROOT_ITEM; new_simple_dir for a subvolume not referenced from
  here), fs/btrfs/dir-item.c (DIR_ITEM by name hash, DIR_INDEX in readdir order),
  fs/btrfs/file-item.c + inode.c btrfs_get_extent (inline, regular, prealloc,
  holes, NO_HOLES gaps), fs/btrfs/{zlib,lzo,zstd}.c (compressed extents),
  fs/btrfs/xattr.c + acl.c (xattrs stored as the VFS passes them: POSIX ACLs
  in the Linux xattr format), fs/btrfs/ioctl.c (default subvolume: the
  "default" DIR_ITEM of the root tree directory).
- btrfs-progs cmds/subvolume-list.c (subvolume paths from ROOT_BACKREF + INODE_REF).

One `BtrfsFileSystem` is a view of one subvolume (the default one unless told
otherwise); `subvolume("@home")` gives another view sharing the same caches.
Entry.inode is the inode number in the top-level tree (5) and
(tree id << 64 | inode) in other subvolumes, so inodes stay unique.
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
import stat as stat_mod
import struct
import threading
import uuid as uuid_mod
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import construct

from ...errors import FilesystemError, GuestPathError, RescueError
from ...source.base import COMPRESSED, DATA, UNWRITTEN, ZERO, ByteSource, Run
from ..base import (BLOCK, CHAR, DIR, FIFO, FILE, SOCKET, SYMLINK, Entry, FileReadError, FileSystem, FsInfo, cover,
                    normalize)
from . import structs as S
from .checksum import name_hash
from .lzo import LzoError, btrfs_lzo_decompress
from .volume import MAX_KEY, PROFILE_NAMES, BtrfsVolume, MappingError, TreeBlockError

log = logging.getLogger(__name__)

try:
    import zstandard
except ImportError:   # pragma: no cover - a dependency
    zstandard = None

# What a parser may throw on a damaged image; turned into FileReadError or
# FilesystemError at this module's boundary.
PARSE_ERRORS = (construct.ConstructError, struct.error, IndexError, ValueError, KeyError, OverflowError,
                TreeBlockError, MappingError, LzoError, zlib.error, RecursionError)
if zstandard is not None:
    PARSE_ERRORS = PARSE_ERRORS + (zstandard.ZstdError,)

MAX_EXTENT = 1 << 20            # compressed extents hold at most 128 KiB (BTRFS_MAX_COMPRESSED); more is damage
READ_CHUNK = 4 << 20
PATH_CACHE = 200_000            # directory paths remembered (tree, inode)
DECOMPRESSED_CACHE = 8
LISTING_CACHE = 250_000        # the last directory listed is kept when no larger (a scan lists it, then the walk)
EXTENT_CACHE = 64               # files whose extent lists are kept (file_runs then read_chunks)          # inflated extents kept (a read_range walk reads one several times)
MASK64 = (1 << 64) - 1

_KINDS = {stat_mod.S_IFREG: FILE, stat_mod.S_IFDIR: DIR, stat_mod.S_IFLNK: SYMLINK, stat_mod.S_IFIFO: FIFO,
          stat_mod.S_IFCHR: CHAR, stat_mod.S_IFBLK: BLOCK, stat_mod.S_IFSOCK: SOCKET}
_FT_KINDS = {S.FT_REG_FILE: FILE, S.FT_DIR: DIR, S.FT_CHRDEV: CHAR, S.FT_BLKDEV: BLOCK, S.FT_FIFO: FIFO,
             S.FT_SOCK: SOCKET, S.FT_SYMLINK: SYMLINK}


class Loc(NamedTuple):
    tree: int
    ino: int


@dataclass
class RootInfo:
    tree: int
    bytenr: int
    level: int
    generation: int
    root_dirid: int
    flags: int
    uuid: bytes
    parent_uuid: bytes
    otime: int | None


@dataclass
class Subvolume:
    id: int
    path: str                  # from the top level, no leading '/' ("@home", "@/.snapshots/1/snapshot")
    parent: int
    readonly: bool
    snapshot_of: str | None    # the path of the subvolume it was snapshotted from ("?" when deleted)
    uuid: str | None

    def to_json(self) -> dict:
        return {"id": self.id, "path": self.path, "parent_id": self.parent, "readonly": self.readonly,
                "snapshot": self.snapshot_of is not None, "snapshot_of": self.snapshot_of, "uuid": self.uuid}


class _Ext(NamedTuple):
    """One piece of a file, in the shape fs.base.cover() clips and merges
    (Run's four fields first): DATA readable as is at logical address `where`;
    ZERO, UNWRITTEN; or COMPRESSED / inline DATA (`where` None) inflated from
    `extent`, whose first inflated byte would sit at file offset `base`."""

    offset: int
    length: int
    kind: str
    where: int | None = None      # logical address (DATA stored as is)
    extent: tuple | None = None   # (disk_bytenr, disk_num_bytes, ram, compression) or ("inline", bytes, ram, comp)
    base: int = 0


def _clone(entry: Entry) -> Entry:
    """A copy of an Entry (copy.copy costs ~20 us: too much per name of a big directory)."""
    out = object.__new__(Entry)
    out.__dict__.update(entry.__dict__)
    return out


def _inode_number(tree: int, ino: int) -> int:
    return ino if tree == S.FS_TREE_OBJECTID else (tree << 64) | ino


def _loc(entry: Entry) -> Loc:
    tree = (entry.inode >> 64) & MASK64
    return Loc(tree or S.FS_TREE_OBJECTID, entry.inode & MASK64)


class BtrfsFileSystem(FileSystem):
    backend = "btrfs"

    @classmethod
    def detect(cls, source: ByteSource) -> bool:
        try:
            for offset in S.SUPER_MIRRORS[:2]:
                if offset + S.SUPER_INFO_SIZE <= source.size and \
                        source.read(offset + 0x40, 8) == S.MAGIC:
                    return True
        except OSError:
            return False
        return False

    def __init__(self, source: ByteSource, name: str | None = None, subvolume: str | int | None = None,
                 devices: list[ByteSource] | None = None) -> None:
        self.source = source
        self.name = name or source.name
        try:
            self.vol = BtrfsVolume(source, self.name, devices)
            self._load_roots()
            self._open_subvolume(self._pick(subvolume) if subvolume is not None else self.default_id)
        except RescueError:
            raise
        except (OSError, *PARSE_ERRORS) as exc:
            raise FilesystemError(f"btrfs: {type(exc).__name__}: {exc}", file=self.name) from None
        # The layers' log warnings reach the user as 'warning: ...' lines.
        for why in self.damage:
            log.warning("%s: btrfs: %s", self.name, why)
        if self.vol.sb.log_root:
            log.warning("%s: btrfs has a tree log (not cleanly unmounted): read as a nologreplay mount would, "
                        "so writes fsync'ed in the last seconds before the crash may be missing", self.name)

    # -- roots and subvolumes -------------------------------------------------

    def _load_roots(self) -> None:
        vol = self.vol
        sb = vol.sb
        self.damage: list[str] = list(vol.notes)
        self.root_tree = (sb.root, sb.root_level, sb.generation)
        self.roots: dict[int, RootInfo] = {}
        self.backrefs: dict[int, tuple[int, int, bytes]] = {}   # child -> (parent, dirid, name)
        self.refs: set[tuple[int, int]] = set()                   # (parent, child) with a ROOT_REF
        self.default_id = S.FS_TREE_OBJECTID
        damage: list[str] = []
        try:
            for key, data in vol.items(self.root_tree, (0, 0, 0), MAX_KEY, damage):
                try:
                    self._root_tree_item(key, data)
                except PARSE_ERRORS as exc:   # one bad item costs that subvolume, not the filesystem
                    damage.append(f"item {key}: {exc}")
        except TreeBlockError as exc:
            raise FilesystemError(f"the root tree is unreadable: {exc}", file=self.name) from None
        self.damage += [f"root tree damaged: {d}" for d in damage]
        if S.FS_TREE_OBJECTID not in self.roots:
            raise FilesystemError("the root tree has no top-level subvolume (tree 5)", file=self.name)
        if self.default_id not in self.roots:
            self.damage.append(f"the default subvolume {self.default_id} is missing; using the top level")
            self.default_id = S.FS_TREE_OBJECTID
        self._inflated: OrderedDict = OrderedDict()
        self._extent_cache: OrderedDict = OrderedDict()
        self.subvolumes = self._list_subvolumes()

    def _root_tree_item(self, key: tuple, data: bytes) -> None:
        objectid, ktype, offset = key
        if ktype == S.ROOT_ITEM_KEY and len(data) >= S.ROOT_ITEM_V1.size:
            f = S.ROOT_ITEM_V1.unpack_from(data)
            uuid = parent_uuid = b""
            otime = None
            if len(data) >= 239 + S.ROOT_ITEM_V2.size:
                gen_v2, uuid, parent_uuid = S.ROOT_ITEM_V2.unpack_from(data, 239)
                if gen_v2 != f[0]:
                    uuid = parent_uuid = b""
                elif len(data) >= 339 + 12:
                    sec, nsec = struct.unpack_from("<qI", data, 339)   # otime
                    otime = sec * 1_000_000_000 + nsec
            self.roots[objectid] = RootInfo(objectid, f[2], f[12], f[0], f[1], f[6], uuid, parent_uuid, otime)
        elif ktype == S.ROOT_BACKREF_KEY and len(data) >= S.ROOT_REF.size:
            dirid, _seq, nlen = S.ROOT_REF.unpack_from(data)
            self.backrefs[objectid] = (offset, dirid, data[S.ROOT_REF.size:S.ROOT_REF.size + nlen])
        elif ktype == S.ROOT_REF_KEY:
            self.refs.add((objectid, offset))
        elif ktype == S.DIR_ITEM_KEY and objectid == S.ROOT_TREE_DIR_OBJECTID:
            for name, location, _ft, _data in _dir_items(data):
                if name == b"default" and location[1] == S.ROOT_ITEM_KEY:
                    self.default_id = location[0]

    def _tree_root(self, tree: int) -> tuple:
        info = self.roots.get(tree)
        if info is None:
            raise TreeBlockError(f"subvolume {tree} has no root item")
        return (info.bytenr, info.level, None)

    def _dir_path(self, tree: int, ino: int) -> str:
        """The path of directory `ino` inside `tree` (INODE_REF chain up to its root)."""
        parts: list[bytes] = []
        root_dir = self.roots[tree].root_dirid
        seen = set()
        damage: list[str] = []
        while ino != root_dir:
            if ino in seen or len(seen) > 4096:
                raise ValueError(f"inode refs loop in subvolume {tree}")
            seen.add(ino)
            for key, data in self.vol.items(self._tree_root(tree), (ino, S.INODE_REF_KEY, 0),
                                            (ino, S.INODE_REF_KEY, MASK64), damage):
                _index, nlen = S.INODE_REF.unpack_from(data)
                parts.append(data[S.INODE_REF.size:S.INODE_REF.size + nlen])
                ino = key[2]
                break
            else:
                raise ValueError(f"directory {ino} of subvolume {tree} has no name")
        return "/".join(os.fsdecode(p) for p in reversed(parts))

    def _list_subvolumes(self) -> list[Subvolume]:
        paths: dict[int, str] = {S.FS_TREE_OBJECTID: ""}

        def path_of(tree: int, depth: int = 0) -> str:
            if tree in paths:
                return paths[tree]
            if depth > 256 or tree not in self.backrefs:
                raise ValueError(f"subvolume {tree} is not linked to the top level")
            parent, dirid, name = self.backrefs[tree]
            base = path_of(parent, depth + 1)
            inner = self._dir_path(parent, dirid) if parent in self.roots else "?"
            paths[tree] = "/".join(p for p in (base, inner, os.fsdecode(name)) if p)
            return paths[tree]

        by_uuid = {info.uuid: tree for tree, info in self.roots.items() if info.uuid and any(info.uuid)}
        out = []
        for tree in sorted(self.roots):
            if tree < S.FIRST_FREE_OBJECTID or tree > S.LAST_FREE_OBJECTID or tree not in self.backrefs:
                continue
            info = self.roots[tree]
            try:
                path = path_of(tree)
            except (*PARSE_ERRORS, OSError) as exc:
                self.damage.append(f"subvolume {tree}: path unknown ({exc})")
                continue
            snapshot_of = None
            if info.parent_uuid and any(info.parent_uuid):
                origin = by_uuid.get(info.parent_uuid)
                snapshot_of = "?" if origin is None else (paths.get(origin) if origin in paths else str(origin))
            out.append(Subvolume(tree, path, self.backrefs[tree][0], bool(info.flags & 1), snapshot_of,
                                 str(uuid_mod.UUID(bytes=info.uuid)) if info.uuid and any(info.uuid) else None))
        for sv in out:   # origins listed after their snapshots
            if sv.snapshot_of is not None and sv.snapshot_of.isdigit():
                sv.snapshot_of = paths.get(int(sv.snapshot_of), sv.snapshot_of)
        return out

    def _pick(self, spec: str | int) -> int:
        """A subvolume id from an id, 'subvolid=N', or a path from the top level."""
        if isinstance(spec, int) or str(spec).isdigit():
            tree = int(spec)
            if tree in (S.FS_TREE_OBJECTID, 0) or any(sv.id == tree for sv in self.subvolumes):
                return tree or S.FS_TREE_OBJECTID
            raise FilesystemError(f"there is no subvolume with id {tree} ({self._choices()})", file=self.name)
        want = normalize(str(spec)).strip("/")
        if want == "":
            return S.FS_TREE_OBJECTID
        for sv in self.subvolumes:
            if sv.path == want:
                return sv.id
        raise FilesystemError(f"there is no subvolume {spec!r} ({self._choices()})", file=self.name)

    def _choices(self) -> str:
        names = [f"{sv.path} (id {sv.id})" for sv in self.subvolumes[:20]]
        return "subvolumes: " + (", ".join(names) if names else "none besides the top level")

    def _open_subvolume(self, tree: int) -> None:
        self.tree = tree
        self.top = Loc(tree, self.roots[tree].root_dirid)
        self._paths: dict[str, Loc] = {"/": self.top}
        self._last_listing: tuple[str, list[Entry]] | None = None
        self._damaged_dirs: dict[str, str] = {}
        sb = self.vol.sb
        current = next((sv for sv in self.subvolumes if sv.id == tree), None)
        profiles = sorted({PROFILE_NAMES.get(c.profile, hex(c.profile)) + "/" + _group_name(c.type)
                           for c in self.vol.chunks})
        details = {
            "generation": sb.generation,
            "checksum": S.CSUM_NAMES.get(sb.csum_type, str(sb.csum_type)),
            "nodesize": sb.nodesize,
            "devices": sb.num_devices,
            "total_bytes": sb.total_bytes,
            "profiles": profiles,
            "features": [S.INCOMPAT_NAMES.get(1 << b, f"bit {b}") for b in range(64) if sb.incompat_flags >> b & 1],
            "default_subvolume": self.default_id,
            "subvolume": {"id": tree, "path": "/" + (current.path if current else "")},
            "subvolumes": [sv.to_json() for sv in self.subvolumes],
        }
        if sb.log_root:
            details["log_tree"] = "present (not replayed: writes fsync'ed since the last commit are not shown)"
        if self.damage:
            details["damage"] = list(self.damage)
        self.info = FsInfo(type="btrfs", label=sb.label.split(b"\0", 1)[0].decode("utf-8", "replace") or None,
                           uuid=str(uuid_mod.UUID(bytes=sb.fsid)), block_size=sb.sectorsize,
                           # this device's size (what the volume must hold); all devices' total in details
                           size=sb.dev_item.total_bytes, used=sb.bytes_used,
                           free=max(0, sb.total_bytes - sb.bytes_used),
                           details=details)

    def subvolume(self, spec: str | int) -> "BtrfsFileSystem":
        """A view of another subvolume (path from the top level like '@home' or
        '/@/.snapshots/1/snapshot', or its id), sharing this one's caches."""
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view._open_subvolume(self._pick(spec))
        return view

    # -- names -----------------------------------------------------------------

    def _lookup(self, parent: Loc, name: bytes) -> tuple[Loc, int] | None:
        """(child location, dir entry type) of `name` in directory `parent`."""
        damage: list[str] = []
        key = (parent.ino, S.DIR_ITEM_KEY, name_hash(name))
        data = self.vol.get(self._tree_root(parent.tree), key, damage)
        if damage:
            raise TreeBlockError("; ".join(damage))
        if data is None:
            return None
        for item_name, location, ftype, _data in _dir_items(data):
            if item_name == name:
                return self._follow(parent, location, ftype), ftype
        return None

    def _follow(self, parent: Loc, location: tuple, ftype: int) -> Loc:
        objectid, ktype, _offset = location
        if ktype == S.ROOT_ITEM_KEY:
            if objectid in self.roots and (parent.tree, objectid) in self.refs:
                return Loc(objectid, self.roots[objectid].root_dirid)
            return Loc(parent.tree, -objectid)   # not linked from here: an empty directory (new_simple_dir)
        return Loc(parent.tree, objectid)

    def _locate(self, path: str) -> Loc:
        path = normalize(path)
        hit = self._paths.get(path)
        if hit is not None:
            return hit
        parent_path, name = posixpath.split(path)
        parent = self._locate(parent_path)
        if parent.ino < 0:
            raise GuestPathError(f"{path}: no such file or directory", file=self.name)
        found = self._lookup(parent, os.fsencode(name))
        if found is None:
            raise GuestPathError(f"{path}: no such file or directory", file=self.name)
        loc, ftype = found
        if ftype == S.FT_DIR:
            self._remember(path, loc)
        return loc

    def _remember(self, path: str, loc: Loc) -> None:
        if len(self._paths) >= PATH_CACHE:
            self._paths = {"/": self.top}
        self._paths[path] = loc

    # -- inodes ----------------------------------------------------------------

    def _inode(self, loc: Loc) -> tuple[bytes, dict[str, bytes] | None]:
        """The inode item and the xattrs (None when their items are damaged):
        one descent, as they sit side by side in the tree (keys 1, 12, 24)."""
        damage: list[str] = []
        data = None
        xattrs: dict[str, bytes] | None = {}
        for key, item in self.vol.items(self._tree_root(loc.tree), (loc.ino, S.INODE_ITEM_KEY, 0),
                                        (loc.ino, S.XATTR_ITEM_KEY, MASK64), damage):
            if key[1] == S.INODE_ITEM_KEY:
                data = item
            elif key[1] == S.XATTR_ITEM_KEY and xattrs is not None:
                try:
                    for name, _location, _ft, value in _dir_items(item):
                        xattrs[os.fsdecode(name)] = value
                except ValueError:
                    xattrs = None   # xattrs() reads them again and reports the damage
        if data is None or len(data) < S.INODE_ITEM_SIZE:
            why = "; ".join(damage) or "its inode item is missing"
            raise FileReadError(f"inode {loc.ino} of subvolume {loc.tree}: {why}")
        return data, (None if damage else xattrs)

    def _entry(self, path: str, loc: Loc) -> Entry:
        if loc.ino < 0:   # a subvolume not reachable from this tree: the kernel shows an empty directory
            born = self.roots[loc.tree].otime or 0   # the kernel says "now"; the snapshot's birth is stabler
            return Entry(path=path, kind=DIR, mode=0o755, nlink=1, mtime_ns=born, atime_ns=born, ctime_ns=born,
                         inode=(1 << 128) | (loc.tree << 64) | -loc.ino)
        raw, xattrs = self._inode(loc)
        (_gen, _transid, size, _nbytes, _bg, nlink, uid, gid, mode, rdev, _flags, _seq,
         a_s, a_n, c_s, c_n, m_s, m_n, _o_s, _o_n) = S.INODE_ITEM.unpack_from(raw)
        kind = _KINDS.get(stat_mod.S_IFMT(mode))
        if kind is None:
            raise FileReadError(f"{path}: inode {loc.ino} has an unknown file type (mode {mode:#o})")
        entry = Entry(path=path, kind=kind, mode=mode & 0o7777, uid=uid, gid=gid,
                      size=size if kind in (FILE, SYMLINK) else 0,
                      mtime_ns=m_s * 1_000_000_000 + m_n, atime_ns=a_s * 1_000_000_000 + a_n,
                      ctime_ns=c_s * 1_000_000_000 + c_n, nlink=nlink, inode=_inode_number(loc.tree, loc.ino),
                      xattrs=xattrs)
        if kind in (CHAR, BLOCK):
            entry.rdev = ((rdev >> 20) & 0xFFF, rdev & 0xFFFFF)   # the kernel's dev_t (MAJOR/MINOR)
        elif kind == SYMLINK:
            target = b"".join(self._read(entry, loc, 0, min(size, 1 << 16)))
            entry.link_target = os.fsdecode(target.rstrip(b"\0") if len(target) > size else target)
        return entry

    def stat(self, path: str) -> Entry:
        path = normalize(path)
        try:
            return self._entry(path, self._locate(path))
        except RescueError:
            raise
        except FileReadError as exc:
            raise GuestPathError(f"{path}: {exc}", file=self.name) from None
        except (*PARSE_ERRORS, OSError) as exc:
            raise GuestPathError(f"{path}: damaged metadata: {exc}", file=self.name) from None

    def listdir(self, path: str) -> list[Entry]:
        path = normalize(path)
        last = self._last_listing
        if last is not None and last[0] == path:   # asked again right away (a scan, then the walk)
            return [_clone(e) for e in last[1]]
        try:
            loc = self._locate(path)
        except RescueError:
            raise
        except (*PARSE_ERRORS, OSError) as exc:
            raise FileReadError(f"{path}: damaged metadata: {exc}") from None
        if loc.ino < 0:
            return []
        damage: list[str] = []
        out: list[Entry] = []
        prefix = path.rstrip("/") + "/"
        try:
            root = self._tree_root(loc.tree)
            for _key, data in self.vol.items(root, (loc.ino, S.DIR_INDEX_KEY, 0),
                                             (loc.ino, S.DIR_INDEX_KEY, MASK64), damage):
                for name, location, ftype, _data in _dir_items(data)[:1]:
                    child_path = prefix + os.fsdecode(name)
                    try:
                        child = self._follow(loc, location, ftype)
                        entry = self._entry(child_path, child)
                    except (FileReadError, *PARSE_ERRORS, OSError) as exc:
                        damage.append(f"{child_path}: {exc}")
                        continue
                    if entry.kind == DIR:
                        self._remember(child_path, child)
                    out.append(entry)
        except (*PARSE_ERRORS, OSError) as exc:
            raise FileReadError(f"{path}: directory unreadable: {exc}") from None
        self._last_listing = (path, [_clone(e) for e in out]) if len(out) <= LISTING_CACHE and not damage else None
        if damage:
            why = "; ".join(damage[:3]) + (f" (+{len(damage) - 3} more)" if len(damage) > 3 else "")
            self._damaged_dirs[path] = why
            log.warning("%s: directory %s listed in part: %s", self.name, path, why)
            if not out:
                raise FileReadError(f"{path}: directory unreadable: {why}")
        return out

    def listing_damage(self, path: str) -> str | None:
        return self._damaged_dirs.get(normalize(path))

    def xattrs(self, entry: Entry) -> dict[str, bytes]:
        if entry.xattrs is not None:   # read with the inode item
            return dict(entry.xattrs)
        loc = _loc(entry)
        if entry.inode >> 128:
            return {}
        damage: list[str] = []
        out: dict[str, bytes] = {}
        try:
            for _key, data in self.vol.items(self._tree_root(loc.tree), (loc.ino, S.XATTR_ITEM_KEY, 0),
                                             (loc.ino, S.XATTR_ITEM_KEY, MASK64), damage):
                for name, _location, _ft, value in _dir_items(data):
                    out[os.fsdecode(name)] = value
        except (*PARSE_ERRORS, OSError) as exc:
            raise FileReadError(f"{entry.path}: extended attributes unreadable: {exc}") from None
        if damage:
            raise FileReadError(f"{entry.path}: extended attributes unreadable: {'; '.join(damage)}")
        return out

    # -- file data -------------------------------------------------------------

    def _extents(self, loc: Loc, size: int, path: str) -> list[_Ext]:
        """The file's pieces in order, covering [0, size) (gaps are holes)."""
        damage: list[str] = []
        raw: list[_Ext] = []
        for key, data in self.vol.items(self._tree_root(loc.tree), (loc.ino, S.EXTENT_DATA_KEY, 0),
                                        (loc.ino, S.EXTENT_DATA_KEY, MASK64), damage):
            start = key[2]
            if start >= size:
                break
            _gen, ram, comp, enc, other, etype = S.FILE_EXTENT_HEAD.unpack_from(data)
            if enc or other:
                raise FileReadError(f"{path}: extent at offset {start} is encrypted or encoded "
                                    f"({enc}/{other}), which this reader does not decode")
            if comp > S.COMPRESS_ZSTD:
                raise FileReadError(f"{path}: extent at offset {start} uses unknown compression {comp}")
            if etype == S.FILE_EXTENT_INLINE:
                inline = data[S.FILE_EXTENT_INLINE_START:]
                length = ram if comp else len(inline)
                if length > MAX_EXTENT:
                    raise FileReadError(f"{path}: inline extent claims {length} bytes")
                raw.append(_Ext(start, length, COMPRESSED if comp else DATA, None, ("inline", inline, ram, comp),
                                start))
                continue
            if etype not in (S.FILE_EXTENT_REG, S.FILE_EXTENT_PREALLOC):
                raise FileReadError(f"{path}: extent at offset {start} has unknown type {etype}")
            disk_bytenr, disk_len, offset, num = S.FILE_EXTENT_DISK.unpack_from(data, S.FILE_EXTENT_HEAD.size)
            if etype == S.FILE_EXTENT_PREALLOC:
                raw.append(_Ext(start, num, UNWRITTEN))
            elif disk_bytenr == 0:
                raw.append(_Ext(start, num, ZERO))
            elif comp:
                if disk_len > MAX_EXTENT or ram > MAX_EXTENT:
                    raise FileReadError(f"{path}: compressed extent at offset {start} claims {disk_len} -> {ram} bytes")
                raw.append(_Ext(start, num, COMPRESSED, None, (disk_bytenr, disk_len, ram, comp), start - offset))
            else:
                raw.append(_Ext(start, num, DATA, disk_bytenr + offset))
        if damage:
            raise FileReadError(f"{path}: extent tree damaged: {'; '.join(damage)}")
        return cover(raw, size)

    def _file_extents(self, entry: Entry) -> list[_Ext]:
        if entry.kind not in (FILE, SYMLINK) or entry.inode >> 128 or entry.size == 0:
            return []
        key = (entry.inode, entry.size)
        cached = self._extent_cache.get(key)
        if cached is not None:   # file_runs, then read_chunks: one lookup
            return cached
        try:
            exts = self._extents(_loc(entry), entry.size, entry.path)
            self._extent_cache[key] = exts
            if len(self._extent_cache) > EXTENT_CACHE:
                self._extent_cache.popitem(last=False)
            return exts
        except FileReadError:
            raise
        except (*PARSE_ERRORS, OSError) as exc:
            raise FileReadError(f"{entry.path}: extents unreadable: {exc}") from None

    def file_runs(self, entry: Entry) -> list[Run]:
        out: list[Run] = []
        try:
            for ext in self._file_extents(entry):
                if ext.kind == DATA and ext.extent is None:
                    pos = ext.offset
                    for n, where in self.vol.physical_runs(ext.where, ext.length):
                        last = out[-1] if out else None
                        if last and last.kind == DATA and where is not None and last.where is not None \
                                and last.where + last.length == where:
                            out[-1] = Run(last.offset, last.length + n, DATA, last.where)
                        else:
                            out.append(Run(pos, n, DATA, where))
                        pos += n
                elif ext.kind in (ZERO, UNWRITTEN) and out and out[-1].kind == ext.kind:
                    out[-1] = Run(out[-1].offset, out[-1].length + ext.length, ext.kind)
                else:
                    out.append(Run(ext.offset, ext.length, ext.kind if ext.kind != DATA else DATA, None))
        except (MappingError, *PARSE_ERRORS) as exc:
            raise FileReadError(f"{entry.path}: {exc}") from None
        return out

    def _inflate(self, extent: tuple, path: str) -> bytes:
        cached = self._inflated.get(extent[:2]) if extent[0] != "inline" else None
        if cached is not None:
            return cached
        if extent[0] == "inline":
            _tag, stored, ram, comp = extent
        else:
            disk_bytenr, disk_len, ram, comp = extent
            stored = self._read_data(disk_bytenr, disk_len, path)
        if comp == S.COMPRESS_NONE:
            return stored
        if comp == S.COMPRESS_ZLIB:
            out = zlib.decompressobj().decompress(stored, ram)
        elif comp == S.COMPRESS_LZO:
            out = btrfs_lzo_decompress(stored, self.vol.sectorsize, ram)
        else:
            if zstandard is None:
                raise FileReadError(f"{path}: zstd extent and no zstandard module")
            out = _zstd_inflate(stored, ram)
        if len(out) < ram:   # the kernel zero-fills what a short stream leaves
            out = out + bytes(ram - len(out))
        if extent[0] != "inline":
            self._inflated[extent[:2]] = out
            if len(self._inflated) > DECOMPRESSED_CACHE:
                self._inflated.popitem(last=False)
        return out

    def _read_data(self, logical: int, length: int, path: str) -> bytes:
        """File data at a logical address. Where there is another copy (DUP,
        RAID1*, RAID10), each sector is checked against the checksum tree and
        a copy that fails is replaced by the next (as the kernel's read repair
        reads); single copies are returned as they are (a rescue keeps them)."""
        vol = self.vol
        copies = vol.mirrors(logical)
        if copies < 2 or S.CSUM_TREE_OBJECTID not in self.roots:
            return vol.read_logical(logical, length)
        ss = vol.sectorsize
        start = logical - logical % ss
        end = -(-(logical + length) // ss) * ss
        csums = self._data_csums(start, end)
        if not csums:   # nodatasum (chattr +C) or no checksums here
            return vol.read_logical(logical, length)
        summer, size = vol._csum, vol._csum_size
        problem = ""
        for mirror in range(copies):
            try:
                raw = vol.read_logical(start, end - start, mirror)
            except MappingError as exc:
                problem = str(exc)
                continue
            bad = next((at for at in range(start, end, ss)
                        if at in csums and summer(raw[at - start:at - start + ss])[:size] != csums[at]), None)
            if bad is None:
                return raw[logical - start:logical - start + length]
            problem = f"data checksum mismatch at logical {bad}"
        raise FileReadError(f"{path}: {problem} in every copy")

    def _data_csums(self, start: int, end: int) -> dict[int, bytes]:
        """{sector logical address: stored checksum} for [start, end)."""
        vol = self.vol
        ss, size = vol.sectorsize, vol._csum_size
        info = self.roots[S.CSUM_TREE_OBJECTID]
        span = (vol.nodesize // size) * ss    # the most one item can cover
        lo = (S.EXTENT_CSUM_OBJECTID, S.EXTENT_CSUM_KEY, max(0, start - span))
        hi = (S.EXTENT_CSUM_OBJECTID, S.EXTENT_CSUM_KEY, end - 1)
        out: dict[int, bytes] = {}
        damage: list[str] = []
        for key, data in vol.items((info.bytenr, info.level, None), lo, hi, damage):
            first = key[2]
            for i in range(max(0, (start - first) // ss), min(len(data) // size, (end - first + ss - 1) // ss)):
                out[first + i * ss] = data[i * size:(i + 1) * size]
        return out

    def _piece(self, ext: _Ext, inside: int, length: int, path: str) -> bytes:
        if ext.kind in (ZERO, UNWRITTEN):
            return bytes(length)
        if ext.kind == DATA and ext.extent is None:
            return self._read_data(ext.where + inside, length, path)
        data = self._inflate(ext.extent, path)
        start = ext.offset - ext.base + inside
        piece = data[start:start + length]
        return piece + bytes(length - len(piece)) if len(piece) < length else piece

    def _read(self, entry: Entry, loc: Loc | None, offset: int, length: int) -> Iterator[bytes]:
        end = min(entry.size, offset + length)
        try:
            exts = self._extents(loc, entry.size, entry.path) if loc is not None else self._file_extents(entry)
            for ext in exts:
                lo, hi = max(offset, ext.offset), min(end, ext.offset + ext.length)
                while lo < hi:
                    n = min(hi - lo, READ_CHUNK)
                    yield self._piece(ext, lo - ext.offset, n, entry.path)
                    lo += n
        except FileReadError:
            raise
        except (*PARSE_ERRORS, OSError) as exc:
            raise FileReadError(f"{entry.path}: unreadable: {exc}") from None

    def read_chunks(self, entry: Entry, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        if entry.kind != FILE:
            return iter(())
        return self._read(entry, None, 0, entry.size)

    def read_range(self, entry: Entry, offset: int, length: int) -> bytes:
        if entry.kind != FILE or offset >= entry.size or length <= 0:
            return b""
        return b"".join(self._read(entry, None, offset, length))

    def close(self) -> None:
        self._inflated.clear()


_ZSTD = threading.local()   # one context per thread, reused: making one costs more than a 128 KiB extent


def _zstd_inflate(stored: bytes, ram: int) -> bytes:
    """A btrfs zstd extent: one frame (no content size), then zero padding."""
    dctx = getattr(_ZSTD, "dctx", None)
    if dctx is None:
        dctx = _ZSTD.dctx = zstandard.ZstdDecompressor()
    try:
        return dctx.decompress(stored, max_output_size=ram)
    except zstandard.ZstdError:   # trailing bytes a strict one-shot decode refuses: stream it
        with dctx.stream_reader(io.BytesIO(stored), read_across_frames=False) as reader:
            return reader.read(ram)


def _dir_items(data: bytes) -> list[tuple[bytes, tuple, int, bytes]]:
    """(name, location key, type, data) of each btrfs_dir_item packed in an item."""
    out = []
    pos = 0
    while pos + S.DIR_ITEM.size <= len(data):
        objectid, ktype, offset, _transid, data_len, name_len, ftype = S.DIR_ITEM.unpack_from(data, pos)
        start = pos + S.DIR_ITEM.size
        end = start + name_len + data_len
        if end > len(data) or name_len == 0:
            raise ValueError(f"directory item of {name_len}+{data_len} bytes in a {len(data)}-byte item")
        out.append((data[start:start + name_len], (objectid, ktype, offset), ftype,
                    data[start + name_len:end]))
        pos = end
    return out


def _group_name(ctype: int) -> str:
    names = [n for bit, n in ((S.BG_DATA, "data"), (S.BG_METADATA, "metadata"), (S.BG_SYSTEM, "system"))
             if ctype & bit]
    return "+".join(names) or "?"
