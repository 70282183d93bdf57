"""A tar of a server's files read as a filesystem: OpenVZ/Virtuozzo backups,
Proxmox `vzdump-lxc-*.tar.zst`, LXC/Incus exports, `tar czf backup.tar.gz /`.

References: POSIX.1-2017 `pax` (ustar header, pax extended header keywords mtime,
atime, ctime with sub-second decimals), GNU tar manual "Extended attributes" and
"POSIX ACLs" (SCHILY.xattr.NAME, SCHILY.acl.access / SCHILY.acl.default in the
acl_to_text form "user::rw-,user:1000:r--,..."), Linux include/uapi/linux/
posix_acl_xattr.h (the binary system.posix_acl_* value). Headers are parsed by the
stdlib `tarfile` (every GNU/pax/sparse variant); file data is never copied: each
file's runs point at where its bytes lie in the (decompressed) tar stream, so reads
go through the archive's random-access index like any other volume's.

The source layer (source/archives/, TarTreeSource) decides a tar is a root tree and
where the root is ("" or "rootfs/"); `detect` also recognises one by content.
"""

from __future__ import annotations

import base64
import decimal
import struct
import tarfile
from typing import Iterator

from ..errors import FilesystemError, GuestPathError
from ..source.base import DATA, ZERO, ByteSource, Run
from ..source.cache import IndexCache
from ..source.fileobj import SourceFile
from .base import BLOCK, CHAR, DIR, FIFO, FILE, SYMLINK, Entry, FileReadError, FileSystem, FsInfo, normalize

# posix_acl_xattr.h: a 4-byte version header, then (u16 tag, u16 perm, u32 id) per entry
ACL_HEADER = struct.Struct("<I")
ACL_ENTRY = struct.Struct("<HHI")
ACL_VERSION = 2
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
ACL_UNDEFINED_ID = 0xFFFFFFFF
_ACL_TAGS = {"user": (ACL_USER_OBJ, ACL_USER), "u": (ACL_USER_OBJ, ACL_USER),
             "group": (ACL_GROUP_OBJ, ACL_GROUP), "g": (ACL_GROUP_OBJ, ACL_GROUP),
             "mask": (ACL_MASK, ACL_MASK), "m": (ACL_MASK, ACL_MASK),
             "other": (ACL_OTHER, ACL_OTHER), "o": (ACL_OTHER, ACL_OTHER)}
PROBE_MEMBERS = 5000   # headers walked by detect() when no source layer said "root tree"
TREE_CACHE = "tree-v1.json"   # the walked table, cached beside the archive's seek index


def acl_text_to_xattr(text: str) -> bytes | None:
    """GNU tar's ACL text ("user::rw-,user:1000:r--:1000,group::r--,mask::r--,other::r--")
    as the Linux system.posix_acl_* xattr value; None when it cannot be read."""
    entries = []
    for part in text.replace("\n", ",").split(","):
        part = part.split("#", 1)[0].strip()
        if not part:
            continue
        fields = part.split(":")
        if len(fields) < 3 or fields[0] not in _ACL_TAGS:
            return None
        obj_tag, named_tag = _ACL_TAGS[fields[0]]
        qualifier, perms = fields[1], fields[2]
        perm = (4 if "r" in perms else 0) | (2 if "w" in perms else 0) | (1 if "x" in perms else 0)
        if not qualifier:
            entries.append((obj_tag, perm, ACL_UNDEFINED_ID))
            continue
        if qualifier.isdigit():
            ident = int(qualifier)
        elif len(fields) > 3 and fields[3].isdigit():   # star's "user:alice:r--:1000"
            ident = int(fields[3])
        else:
            return None
        entries.append((named_tag, perm, ident))
    if not entries:
        return None
    entries.sort(key=lambda e: (e[0], e[2]))   # the kernel wants them ordered by tag, then id
    return ACL_HEADER.pack(ACL_VERSION) + b"".join(ACL_ENTRY.pack(*e) for e in entries)


def _ns(pax: dict, key: str, fallback: float | None) -> int | None:
    raw = pax.get(key)
    if raw is not None:
        try:
            return int(decimal.Decimal(raw) * 1_000_000_000)
        except (decimal.InvalidOperation, ValueError):
            pass
    return None if fallback is None else int(fallback) * 1_000_000_000


def _clean(name: str) -> str:
    name = name.lstrip("/")
    while name.startswith("./"):
        name = name[2:].lstrip("/")
    return name.rstrip("/") if name not in (".", "") else ""


def _tree_source(source: ByteSource):
    """The source layer's TarTreeSource under `source` (through windows and disks), or None."""
    seen = 0
    while source is not None and seen < 12:
        if getattr(source, "tar_tree_prefix", None) is not None:
            return source
        source = next((getattr(source, a) for a in ("parent", "source", "inner")
                       if getattr(source, a, None) is not None and getattr(source, a) is not source), None)
        seen += 1
    return None


def _tree_prefix(source: ByteSource) -> str | None:
    """The root prefix the source layer found."""
    tree = _tree_source(source)
    return None if tree is None else tree.tar_tree_prefix


def _is_tar(source: ByteSource) -> bool:
    head = source.read(0, 512)
    return len(head) == 512 and head[257:262] == b"ustar"


class TarTreeFileSystem(FileSystem):
    """The files of a tar archive, as the filesystem they were taken from."""

    backend = "tar"

    @classmethod
    def detect(cls, source: ByteSource) -> bool:
        if not _is_tar(source):
            return False
        if _tree_prefix(source) is not None:
            return True
        from ..source.archives.tar import root_tree_prefix
        names = []
        try:
            tf = tarfile.open(fileobj=SourceFile(source), mode="r:")
            for _ in range(PROBE_MEMBERS):
                info = tf.next()
                if info is None:
                    break
                tf.members.clear()
                names.append(info.name)
        except (tarfile.TarError, OSError, EOFError, ValueError):
            pass
        return root_tree_prefix(names) is not None

    def __init__(self, source: ByteSource, name: str | None = None) -> None:
        self.source = source
        self.name = name or source.name
        self._entries: dict[str, Entry] = {}
        self._children: dict[str, dict[str, None]] = {}   # insertion-ordered names
        self._runs: dict[int, list[Run]] = {}
        self._xattrs: dict[int, dict[str, bytes]] = {}
        self._damage: dict[str, str] = {}     # directory -> a member in it that could not be read
        # An archive cut short (or damaged) after some members: what happened, and the directories
        # it may have cut (None: any). tar writes a directory and then its whole subtree, so only
        # the directories the archive was still inside at the cut can miss entries.
        self._cut: str | None = None
        self._cut_dirs: set[str] | None = None
        self._stack: list[str] = ["/"]        # the directories the walk is inside, root first
        self._closed: set[str] = set()        # directories whose subtree the walk has left
        self._in_order = True                 # members came in that order so far
        self._next_inode = 2
        self.prefix = _tree_prefix(source)
        if self.prefix is None:
            from ..source.archives.tar import root_tree_prefix
            self.prefix = root_tree_prefix(self._names()) or ""
        tree = _tree_source(source)
        # A big container backup takes a minute to walk: the table is cached like the seek index.
        self._cache = IndexCache(tree) if tree is not None and tree.size == source.size else None
        members = self._load()
        if members is None:
            self._dir("/", synthetic=True, inode=1)
            members = self._walk()
            self._count_links()
            self._store(members)
        used = sum(r.length for runs in self._runs.values() for r in runs if r.kind == DATA)
        self.info = FsInfo(type="tar", block_size=512, size=source.size, used=used, free=0,
                           details={"members": members, "root": self.prefix or "./"})

    # -- reading the headers ---------------------------------------------------------
    def _names(self) -> Iterator[str]:
        try:
            tf = tarfile.open(fileobj=SourceFile(self.source), mode="r:")
            while True:
                info = tf.next()
                if info is None:
                    return
                tf.members.clear()
                yield info.name
        except (tarfile.TarError, OSError, EOFError, ValueError):
            return

    def _walk(self) -> int:
        count = 0
        try:
            tf = tarfile.open(fileobj=SourceFile(self.source), mode="r:")
        except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
            raise FilesystemError(f"not a readable tar archive: {exc}", file=self.name) from None
        while True:
            try:
                info = tf.next()
            except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
                if getattr(_tree_source(self.source), "truncated", None):   # --partial: a known cut
                    self._set_cut(f"the archive is cut short after member {count}")
                else:
                    self._set_cut(f"the archive is damaged after member {count} ({exc})")
                break
            if info is None:
                break
            tf.members.clear()   # tarfile would keep every TarInfo; we keep Entries
            count += 1
            name = _clean(info.name)
            if self.prefix:
                if name + "/" == self.prefix:
                    name = ""
                elif name.startswith(self.prefix):
                    name = name[len(self.prefix):]
                else:
                    continue   # beside the root (an export's metadata.yaml)
            path = normalize("/" + name)
            self._follow(path, info.isdir())
            try:
                self._add(info, path)
            except (ValueError, KeyError, struct.error) as exc:
                self._damage[path.rsplit("/", 1)[0] or "/"] = f"member {info.name!r} could not be read ({exc})"
        if count == 0:
            raise FilesystemError("the tar archive holds no members", file=self.name)
        if self._cut is None and getattr(_tree_source(self.source), "truncated", None):   # --partial
            self._set_cut(f"the archive is cut short after member {count}")
        return count

    def _follow(self, path: str, is_dir: bool) -> None:
        """Track the directories the walk is inside (one comparison for nearly every member)."""
        parent = path.rpartition("/")[0] or "/"
        stack = self._stack
        if parent == stack[-1] and not is_dir:   # nearly every member: a file beside the previous one
            return
        while len(stack) > 1 and parent != stack[-1] and not parent.startswith(stack[-1] + "/"):
            self._closed.add(stack.pop())
        implied: list[str] = []
        if parent != stack[-1]:   # directories between the top and here (maybe with no member of their own)
            up = parent
            while up != stack[-1] and up != "/":
                implied.append(up)
                up = up.rsplit("/", 1)[0] or "/"
            stack.extend(reversed(implied))
        if self._in_order and ((is_dir and path in self._closed) or any(d in self._closed for d in implied)):
            self._in_order = False   # back in a directory already left: not tar's order
        if is_dir and path != "/":
            stack.append(path)

    def _set_cut(self, what: str) -> None:
        where = self._stack[-1]
        if self._in_order:
            self._cut_dirs = set(self._stack)
            self._cut = f"{what}, inside {where}: later files are missing"
        else:
            self._cut_dirs = None
            self._cut = (f"{what}, inside {where}: later files are missing (the archive does "
                         "not store each directory's subtree in one piece, so any directory may miss files)")

    def _new_inode(self) -> int:
        self._next_inode += 1
        return self._next_inode

    def _dir(self, path: str, *, synthetic: bool, inode: int | None = None) -> Entry:
        entry = self._entries.get(path)
        if entry is not None and entry.kind == DIR:
            return entry
        if path != "/":
            parent = self._dir(path.rsplit("/", 1)[0] or "/", synthetic=True)
            self._children[parent.path][path] = None
        entry = Entry(path=path, kind=DIR, mode=0o755, inode=inode or self._new_inode(), nlink=2)
        self._entries[path] = entry
        self._children.setdefault(path, {})
        return entry

    def _add(self, info: tarfile.TarInfo, path: str) -> None:
        pax = info.pax_headers or {}
        meta = dict(mode=info.mode & 0o7777, uid=info.uid, gid=info.gid,
                    mtime_ns=_ns(pax, "mtime", info.mtime) or 0, atime_ns=_ns(pax, "atime", None),
                    ctime_ns=_ns(pax, "ctime", None))
        xattrs: dict[str, bytes] = {}
        for key, value in pax.items():
            if key.startswith("SCHILY.xattr."):
                xattrs[key[len("SCHILY.xattr."):]] = value.encode("utf-8", "surrogateescape")
        for key, attr in (("SCHILY.acl.access", "system.posix_acl_access"),
                          ("SCHILY.acl.default", "system.posix_acl_default")):
            if pax.get(key):
                acl = acl_text_to_xattr(pax[key])
                if acl is not None:
                    xattrs[attr] = acl
        if info.isdir():
            entry = self._dir(path, synthetic=False)
            for k, v in meta.items():
                setattr(entry, k, v)
            entry.xattrs = xattrs
            self._xattrs[entry.inode] = xattrs
            return
        if path == "/":
            return   # a non-directory claiming to be the root: ignored
        parent = self._dir(path.rsplit("/", 1)[0] or "/", synthetic=True)
        if info.islnk():
            target = normalize("/" + self._strip(_clean(info.linkname)))
            first = self._entries.get(target)
            if first is None or first.kind == DIR:
                self._damage[parent.path] = (f"hard link {path} points at {info.linkname!r}, "
                                             "which is not in the archive before it")
                return
            entry = Entry(path=path, kind=first.kind, mode=first.mode, uid=first.uid, gid=first.gid,
                          size=first.size, mtime_ns=first.mtime_ns, atime_ns=first.atime_ns,
                          ctime_ns=first.ctime_ns, inode=first.inode, link_target=first.link_target,
                          rdev=first.rdev, xattrs=first.xattrs)
        else:
            kind = (FILE if info.isreg() else SYMLINK if info.issym() else CHAR if info.ischr() else
                    BLOCK if info.isblk() else FIFO if info.isfifo() else None)
            if kind is None:
                return   # GNU volume labels and the like: not files
            entry = Entry(path=path, kind=kind, size=info.size if kind == FILE else 0,
                          inode=self._new_inode(), xattrs=xattrs, **meta)
            if kind == SYMLINK:
                entry.link_target = info.linkname
            elif kind in (CHAR, BLOCK):
                entry.rdev = (info.devmajor, info.devminor)
            elif kind == FILE:
                self._runs[entry.inode] = self._file_runs(info)
            self._xattrs[entry.inode] = xattrs
        old = self._entries.get(path)
        if old is not None and old.kind == DIR:   # a file replacing a directory: drop what was below
            for p in [p for p in self._entries if p.startswith(path + "/")]:
                self._entries.pop(p, None)
                self._children.pop(p, None)
            self._children.pop(path, None)
        self._entries[path] = entry
        self._children[parent.path][path] = None

    def _strip(self, name: str) -> str:
        if self.prefix and name.startswith(self.prefix):
            return name[len(self.prefix):]
        return name

    @staticmethod
    def _file_runs(info: tarfile.TarInfo) -> list[Run]:
        if info.size == 0:
            return []
        if not info.sparse:
            return [Run(0, info.size, DATA, info.offset_data)]
        runs: list[Run] = []
        pos, stored = 0, info.offset_data
        for offset, length in info.sparse:   # data runs, stored back to back
            if length <= 0:
                continue
            if offset < pos or offset + length > info.size:
                raise ValueError("inconsistent sparse map")
            if offset > pos:
                runs.append(Run(pos, offset - pos, ZERO))
            runs.append(Run(offset, length, DATA, stored))
            stored += length
            pos = offset + length
        if pos < info.size:
            runs.append(Run(pos, info.size - pos, ZERO))
        return runs

    def _count_links(self) -> None:
        counts: dict[int, int] = {}
        for e in self._entries.values():
            if e.kind != DIR:
                counts[e.inode] = counts.get(e.inode, 0) + 1
        for e in self._entries.values():
            if e.kind == DIR:
                e.nlink = 2 + sum(1 for c in self._children.get(e.path, {}) if self._entries[c].kind == DIR)
            else:
                e.nlink = counts[e.inode]

    # -- the cached table --------------------------------------------------------------
    def _store(self, members: int) -> None:
        if self._cache is None or not self._cache.enabled:
            return
        if getattr(_tree_source(self.source), "truncated", None):   # a cut stream: its table is not kept
            return
        rows = []
        for e in self._entries.values():
            xattrs = self._xattrs.get(e.inode)
            rows.append([e.path, e.kind, e.mode, e.uid, e.gid, e.size, e.mtime_ns, e.atime_ns, e.ctime_ns,
                         e.nlink, e.inode, e.link_target, list(e.rdev) if e.rdev else None,
                         {k: base64.b64encode(v).decode() for k, v in (xattrs or {}).items()}])
        runs = {str(i): [[r.offset, r.length, r.kind, r.where] for r in rs] for i, rs in self._runs.items()}
        self._cache.store_json(TREE_CACHE, {"prefix": self.prefix, "members": members, "damage": self._damage,
                                            "cut": self._cut,
                                            "cut_dirs": sorted(self._cut_dirs) if self._cut_dirs is not None else None,
                                            "next_inode": self._next_inode, "entries": rows, "runs": runs})

    def _load(self) -> int | None:
        if self._cache is None:
            return None
        data = self._cache.load_json(TREE_CACHE)
        if not data or data.get("prefix") != self.prefix:
            return None
        try:
            for (path, kind, mode, uid, gid, size, mtime, atime, ctime, nlink, inode, target, rdev,
                 xattrs) in data["entries"]:
                self._xattrs[inode] = {k: base64.b64decode(v) for k, v in xattrs.items()}
                entry = Entry(path=path, kind=kind, mode=mode, uid=uid, gid=gid, size=size, mtime_ns=mtime,
                              atime_ns=atime, ctime_ns=ctime, nlink=nlink, inode=inode, link_target=target,
                              rdev=tuple(rdev) if rdev else None, xattrs=self._xattrs[inode])
                self._entries[path] = entry
                if kind == DIR:
                    self._children.setdefault(path, {})
                if path != "/":
                    self._children.setdefault(path.rsplit("/", 1)[0] or "/", {})[path] = None
            self._runs = {int(i): [Run(o, n, k, w) for o, n, k, w in rs] for i, rs in data["runs"].items()}
            damage, cut_dirs = data.get("damage") or {}, data.get("cut_dirs")
            if isinstance(damage, str):   # an older cache: one text for every directory
                damage, self._cut, cut_dirs = {}, damage, None
            else:
                self._cut = data.get("cut")
            self._damage = dict(damage)
            self._cut_dirs = set(cut_dirs) if cut_dirs is not None else None
            self._next_inode = data.get("next_inode", self._next_inode)
            return int(data["members"])
        except (KeyError, TypeError, ValueError):
            self._entries.clear()      # a damaged cache entry is rebuilt, never trusted
            self._children.clear()
            self._runs.clear()
            self._xattrs.clear()
            return None

    # -- FileSystem ------------------------------------------------------------------
    def stat(self, path: str) -> Entry:
        entry = self._entries.get(normalize(path))
        if entry is None:
            raise GuestPathError(f"no such file or directory: {path}", file=self.name)
        return entry

    def listdir(self, path: str) -> list[Entry]:
        entry = self.stat(path)
        if entry.kind != DIR:
            raise GuestPathError(f"not a directory: {path}", file=self.name)
        return [self._entries[c] for c in self._children.get(entry.path, {})]

    def file_runs(self, entry: Entry) -> list[Run]:
        if entry.kind != FILE:
            raise FileReadError(f"{entry.path} is not a regular file")
        return list(self._runs.get(entry.inode, []))

    def xattrs(self, entry: Entry) -> dict[str, bytes]:
        return dict(self._xattrs.get(entry.inode, {}))

    def listing_damage(self, path: str) -> str | None:
        path = normalize(path)
        found = [self._damage[path]] if path in self._damage else []
        if self._cut is not None and (self._cut_dirs is None or path in self._cut_dirs):
            found.append(self._cut)
        return "; ".join(found) or None
