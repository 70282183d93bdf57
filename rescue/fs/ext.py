"""ext2/3/4, read natively: names, inodes, symlinks, device numbers, xattrs,
nanosecond times and the runs of every file's data.

The parsing lives in two readers: `ext_inode.ExtInodeReader` (superblock,
group descriptors, inodes, extent trees and block maps, EAs and ACLs, inline
data) and `ext_dir.ExtDirReader` (linear and htree directory blocks, inline
directories). This class puts them behind the FileSystem interface.

Where a directory block is damaged the kernel would call it corrupt; the
names in that block are then recovered by our own scan for plausible entries
(ext_dir.scan_block, as The Sleuth Kit's ext2 scan finds them), for listings
and for lookups through it; blocks a damaged map points outside the
filesystem are skipped, as the kernel's readdir skips them. Only an encrypted
directory, one of more than 256 MiB of blocks, or an inode our parser cannot
read at all (its inode table out of reach) is handed to a TskFileSystem opened
on first need: TSK loads every entry's inode in a listing, which can cost a
minute for one absurd inode. Everything else never touches TSK.

References:
- Linux fs/ext4/ext4.h, fs/ext4/inode.c (ext4_inode_is_fast_symlink,
  ext4_map_blocks), fs/ext4/extents.c (ext4_ext_is_unwritten), fs/ext4/inline.c
- https://www.kernel.org/doc/html/latest/filesystems/ext4/
"""

from __future__ import annotations

import logging
import struct
from collections import OrderedDict
from types import MappingProxyType
from typing import TYPE_CHECKING, Iterator

from ..errors import FilesystemError, GuestPathError
from ..source.base import DATA, UNWRITTEN, ByteSource, Run
from ..volume.probe import probe
from .base import BLOCK, CHAR, DIR, FIFO, FILE, SOCKET, SYMLINK, Entry, FileReadError, FileSystem, FsInfo, cover, \
    normalize
from .ext_dir import FT_KIND, DirectoryDamaged, DirEntry, ExtDirReader
from .ext_inode import EXT_MAGIC, INLINE_DATA_FL, SUPERBLOCK_OFFSET, ExtInodeReader

if TYPE_CHECKING:
    from .tsk import TskFileSystem

log = logging.getLogger(__name__)

_EXT_KIND = {0o100000: FILE, 0o040000: DIR, 0o120000: SYMLINK, 0o010000: FIFO, 0o020000: CHAR,
             0o060000: BLOCK, 0o140000: SOCKET}   # i_mode & S_IFMT
_SB_MAGIC = struct.Struct("<H")      # s_magic at 0x38 of the superblock
_SB_INCOMPAT = struct.Struct("<I")   # s_feature_incompat at 0x60
INCOMPAT_JOURNAL_DEV = 0x8           # an external journal: no files in it
_NO_XATTRS: dict[str, bytes] = MappingProxyType({})  # type: ignore[assignment]  # shared, read-only
EXT_ROOT_INO = 2
MAX_DIR_CACHE = 1_000_000   # directory paths remembered (metadata-sized)
DIR_LISTINGS_CACHED = 4     # parsed directories kept for name lookups
LISTED_ENTRIES_KEPT = 20_000   # entries of whole listings kept for a second listdir (see _listed)
MAX_WARNED = 10_000         # damage warnings remembered (each printed once)
_PARSE_ERRORS = (FileReadError, ValueError, struct.error)


class ExtFileSystem(FileSystem):
    backend = "ext"

    @classmethod
    def detect(cls, source: ByteSource) -> bool:
        raw = source.read(SUPERBLOCK_OFFSET, 0x64)
        if len(raw) < 0x64 or _SB_MAGIC.unpack_from(raw, 0x38)[0] != EXT_MAGIC:
            return False
        return not _SB_INCOMPAT.unpack_from(raw, 0x60)[0] & INCOMPAT_JOURNAL_DEV

    def __init__(self, source: ByteSource, name: str | None = None) -> None:
        self.source = source
        self.name = name or source.name
        self._ext = ExtInodeReader(source)   # FilesystemError for a superblock it cannot use
        self._dirs = ExtDirReader(self._ext)
        found = probe(source)
        self.block_size = self._ext.block_size
        self.block_count = self._ext.blocks_count
        kind = found.type if found.type in ("ext2", "ext3", "ext4") else "ext4"
        self.info = FsInfo(type=kind, label=found.label, uuid=found.uuid, block_size=self.block_size,
                           size=found.size or self.block_size * self.block_count, used=found.used,
                           free=found.free, details={"backend": self.backend})
        self._tsk: TskFileSystem | None = None
        self._tsk_problem: str | None = None      # why TSK cannot help (once known)
        self._dir_inodes: dict[str, int] = {}     # directory path -> inode, filled by listdir
        # directory inode -> (entries, name -> (inode, file type) once a lookup asked)
        self._listings: OrderedDict[int, tuple[list[DirEntry], dict[bytes, tuple[int, int]] | None]] = OrderedDict()
        self._warned: set[str] = set()
        # Listings kept for one more listdir of the same path (what the guest layer's
        # database and fstab searches list, the walk lists next), while there is room.
        self._listed: dict[str, list[Entry]] = {}
        self._listed_count = 0
        self._damaged_dirs: dict[str, str] = {}   # path -> what was wrong (see listing_damage)
        self._dir_problems: dict[int, list[str]] = {}   # directory inode -> its damaged blocks (names recovered)

    # -- The Sleuth Kit, for damaged spots only ----------------------------------

    def _fallback(self) -> TskFileSystem | None:
        """A TskFileSystem on the same volume, opened on first need; None when
        TSK cannot open it either (the native reader's view is then all there is)."""
        if self._tsk is None and self._tsk_problem is None:
            from .tsk import TskFileSystem
            try:
                self._tsk = TskFileSystem(self.source, name=self.name)
            except FilesystemError as exc:
                self._tsk_problem = exc.problem
                log.debug("%s: The Sleuth Kit cannot open it either: %s", self.name, exc.problem)
        return self._tsk

    # -- lookups -------------------------------------------------------------------

    def stat(self, path: str) -> Entry:
        path = normalize(path)
        found = self._lookup(path)
        if found is None:   # a directory on the way is unsupported or unreadable: TSK resolves the path
            tsk = self._fallback()
            if tsk is None:
                raise FileReadError(f"cannot look up {path}: a directory on the way is damaged")
            return tsk.stat(path)
        entry = self._entry(path, found[0], found[1])
        if entry is None:
            raise GuestPathError(f"no such file or directory: {path}", file=self.name)
        if path == "/" and entry.kind != DIR:   # a damaged root: listdir says what is wrong
            entry.kind, entry.size, entry.link_target, entry.rdev = DIR, 0, None, None
        return entry

    def _parsed_dir(self, ino: int) -> list[DirEntry]:
        """A directory's entries, parsed once for both lookups and listdir (a
        few kept: the guest layer looks for /X/etc/fstab in every top-level
        directory, then `ls /X` lists it; a huge one is not parsed twice)."""
        kept = self._listings.get(ino)
        if kept is not None:
            self._listings.move_to_end(ino)
            return kept[0]
        try:
            entries = self._dirs.entries(ino)
        except DirectoryDamaged:   # the damaged blocks' names recovered by scanning them
            problems: list[str] = []
            entries = self._dirs.entries(ino, problems, recover=True)
            if len(self._dir_problems) < MAX_WARNED:
                self._dir_problems[ino] = problems
        self._listings[ino] = (entries, None)
        if len(self._listings) > DIR_LISTINGS_CACHED:
            self._listings.popitem(last=False)
        return entries

    def _names(self, ino: int) -> dict[bytes, tuple[int, int]]:
        """name -> (inode, file type) of a directory, for lookups."""
        entries = self._parsed_dir(ino)
        names = self._listings[ino][1]
        if names is None:
            names = {}
            for e in entries:
                names.setdefault(e.name, (e.inode, e.file_type))   # twin names: the first, as a lookup finds it
            self._listings[ino] = (entries, names)
        return names

    def _lookup(self, path: str) -> tuple[int, str | None] | None:
        """(inode, kind from the directory entry) of `path`, walked from the
        nearest directory already seen (a damaged one by the names its scan
        recovered); None when a directory on the way is unsupported or
        unreadable. Raises GuestPathError when the path does not exist."""
        if path == "/":
            return EXT_ROOT_INO, DIR
        parts = path[1:].split("/")
        depth = len(parts) - 1
        while depth > 0 and "/" + "/".join(parts[:depth]) not in self._dir_inodes:
            depth -= 1
        ino = self._dir_inodes["/" + "/".join(parts[:depth])] if depth else EXT_ROOT_INO
        found: tuple[int, int] | None = None
        try:
            for i in range(depth, len(parts)):
                if i > depth and not self._dirs.may_be_dir(ino):
                    raise GuestPathError(f"no such file or directory: {path}", file=self.name)
                found = self._names(ino).get(parts[i].encode("utf-8", "surrogateescape"))
                if found is None:
                    raise GuestPathError(f"no such file or directory: {path}", file=self.name)
                ino = found[0]
        except _PARSE_ERRORS as exc:
            log.debug("%s: %s: native lookup failed (%s); asking The Sleuth Kit", self.name, path, exc)
            return None
        assert found is not None
        return found[0], FT_KIND.get(found[1])

    def _entry(self, path: str, ino: int, name_kind: str | None) -> Entry | None:
        """An Entry from our own parse of the inode (one struct unpack: the
        per-file cost of a walk). An inode the parser rejects is left to TSK,
        which shows what it can (or nothing, as its listing does). A file
        lying in one piece keeps where in `native`: reading it needs no
        second parse."""
        ext = self._ext
        try:
            fields = ext.walk_fields(ino)
            if fields is None:   # an unusual inode: the full parse (which may reject it)
                parsed = ext.parsed(ino)
                times = ext.times_of(parsed)
                inode = parsed[1]
                fields = (inode.i_mode, inode.i_uid | (inode.l_i_uid_high << 16),
                          inode.i_gid | (inode.l_i_gid_high << 16), inode.i_size_lo | (inode.i_size_high << 32),
                          times.atime_ns, times.mtime_ns, times.ctime_ns, inode.i_links_count, inode.i_flags,
                          True, parsed[0])
        except _PARSE_ERRORS as exc:
            log.debug("%s: %s: inode %d: %s; asking The Sleuth Kit", self.name, path, ino, exc)
            tsk = self._fallback()
            return tsk.inode_entry(path, ino, name_kind) if tsk is not None else None
        mode, uid, gid, size, atime_ns, mtime_ns, ctime_ns, links, flags, has_xattrs, raw = fields
        kind = _EXT_KIND.get(mode & 0o170000) or name_kind
        if kind is None:
            return None
        if kind != FILE and kind != SYMLINK:
            size = 0
        entry = Entry(path, kind, mode & 0o7777, uid, gid, size, mtime_ns, atime_ns, ctime_ns, links, ino)
        if kind == FILE:
            if size:
                entry.native = ext.single_run(raw, flags, size)
        elif kind == SYMLINK:
            try:
                target = ext.symlink_target(ino)
            except _PARSE_ERRORS as exc:
                log.debug("%s: %s: symlink target unreadable: %s", self.name, path, exc)
                target = b""
            entry.link_target = target.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif kind in (CHAR, BLOCK):
            try:
                entry.rdev = ext.rdev(ino)
            except _PARSE_ERRORS as exc:
                log.debug("%s: %s: device number unreadable: %s", self.name, path, exc)
        if not has_xattrs:
            entry.xattrs = _NO_XATTRS
            return entry
        try:   # the inode is read now anyway: its xattrs cost little more
            found = ext.xattrs(ino)
            entry.xattrs = found if found else _NO_XATTRS
        except Exception:
            pass   # left unloaded: xattrs() asks again and reports the damage
        return entry

    # -- directories ---------------------------------------------------------------

    def _listdir_native(self, path: str, ino: int) -> list[Entry]:
        entries = self._parsed_dir(ino)
        for text in self._dirs.crafted.pop(ino, ()):   # extra "."/".." entries: reported, not dropped silently
            self._warn_once(f"{text} (directory {path})")
            self._damaged_dirs[path] = text
        built: list[Entry | None] = [None] * len(entries)
        prefix = path.rstrip("/") + "/"
        # Inodes visited in inode order, listed in directory order: an htree
        # directory holds names in hash order, which would read the inode
        # table at random (a 64 KiB read per inode of a huge directory).
        entry = self._entry
        for i in sorted(range(len(entries)), key=[e.inode for e in entries].__getitem__):
            name, ino, file_type = entries[i]
            built[i] = entry(prefix + name.decode("utf-8", "surrogateescape"), ino, FT_KIND.get(file_type))
        out = [entry for entry in built if entry is not None]
        for entry in out:
            if entry.kind == DIR and len(self._dir_inodes) < MAX_DIR_CACHE:
                self._dir_inodes.setdefault(entry.path, entry.inode)
        return out

    def listdir(self, path: str) -> list[Entry]:
        path = normalize(path)
        kept = self._listed.pop(path, None)
        if kept is not None:   # the guest layer's searches listed it; the walk now does (once)
            self._listed_count -= len(kept)
            return kept
        inode = self._dir_inodes.get(path)
        found = (inode, DIR) if inode is not None else self._lookup(path)
        if found is None:   # a directory on the way is unsupported or unreadable: TSK resolves the path
            tsk = self._fallback()
            if tsk is None:
                raise FileReadError(f"cannot list {path}: a directory on the way is damaged")
            return tsk.listdir(path)
        ino = found[0]
        self._check_dir(path, ino)
        try:
            out = self._listdir_native(path, ino)
        except _PARSE_ERRORS as exc:   # unsupported (encrypted, huge) or an unreadable inode
            log.info("%s: %s: %s; listing it with The Sleuth Kit", self.name, path, exc)
            tsk = self._fallback()
            if tsk is None:
                raise FileReadError(f"cannot list {path}: {exc}") from None
            return self._remember(tsk.listdir_inode(path, ino))
        problems = self._dir_problems.get(ino)
        if problems:   # damaged blocks: their names came from our scan (spurious ones possible, as with TSK's)
            for text in problems:
                self._warn_once(f"{text} (directory {path})")
            self._damaged_dirs[path] = "; ".join(problems)
        elif path not in self._damaged_dirs and self._listed_count + len(out) <= LISTED_ENTRIES_KEPT:
            self._listed[path] = list(out)
            self._listed_count += len(out)
        return out

    def _remember(self, entries: list[Entry]) -> list[Entry]:
        """Directories TSK listed for us: their own listings are ours again."""
        for entry in entries:
            if entry.kind == DIR and len(self._dir_inodes) < MAX_DIR_CACHE:
                self._dir_inodes.setdefault(entry.path, entry.inode)
        return entries

    def _check_dir(self, path: str, ino: int) -> None:
        """GuestPathError when the inode's mode names another type than a directory."""
        try:
            if self._dirs.may_be_dir(ino):
                return
            mode = self._ext.inode(ino).i_mode
        except _PARSE_ERRORS:
            return   # an unreadable inode: listing it says what is wrong
        if path == "/":   # e2fsprogs f_badroot: say so rather than show an empty filesystem
            raise FileReadError(f"cannot list /: root inode {ino} has i_mode={mode:#o}, not a directory")
        raise GuestPathError(f"not a directory: {path}", file=self.name)

    def listing_damage(self, path: str) -> str | None:
        return self._damaged_dirs.get(normalize(path))

    def _warn_once(self, text: str) -> None:
        """Each damage once, though the guest layer and the walk list a directory twice."""
        if text not in self._warned:
            if len(self._warned) < MAX_WARNED:
                self._warned.add(text)
            log.warning("%s", text)

    # -- content -------------------------------------------------------------------

    def file_runs(self, entry: Entry) -> list[Run]:
        """The file's extents or block map as runs: DATA where the blocks are,
        UNWRITTEN for preallocated extents, ZERO for holes. An inline-data file
        is one DATA run without `where` (read_chunks serves it from the inode)."""
        if entry.kind != FILE or entry.size == 0:
            return []
        where = entry.native
        if type(where) is int:   # one piece from block 0, seen by the walk (single_run)
            return [Run(0, entry.size, DATA, where)]
        ino = entry.inode
        try:
            inline = bool(self._ext.inode(ino).i_flags & INLINE_DATA_FL)
        except _PARSE_ERRORS as exc:
            tsk = self._fallback()   # the inode TSK listed for a damaged spot: TSK maps it
            if tsk is None:
                raise FileReadError(f"{entry.path}: inode {ino} unreadable: {exc}") from None
            return tsk.file_runs(entry)
        if inline:
            if entry.size > self._ext.inode_size:
                raise FileReadError(f"{entry.path}: i_size={entry.size} is more than an inode holds "
                                    "as inline data")
            return [Run(0, entry.size, DATA)]
        bs = self.block_size
        try:
            mapped = self._ext.mapped_runs(ino, entry.size, entry.path, metadata=False)
        except (ValueError, struct.error) as exc:
            raise FileReadError(f"{entry.path}: cannot map its blocks: {exc}") from None
        if len(mapped) == 1:   # the usual small file: one extent from block 0, nothing to sort or fill
            lblk, pblk, count, unwritten = mapped[0]
            if not lblk and not unwritten and count * bs >= entry.size:
                return [Run(0, entry.size, DATA, pblk * bs)]
        return cover([Run(lblk * bs, count * bs, UNWRITTEN) if unwritten else
                      Run(lblk * bs, count * bs, DATA, pblk * bs)
                      for lblk, pblk, count, unwritten in mapped], entry.size)

    def _inline(self, entry: Entry) -> bytes:
        """An inline-data file's bytes (i_block, then the system.data value)."""
        try:
            data = self._ext.inline_data(entry.inode)
        except _PARSE_ERRORS as exc:
            raise FileReadError(f"{entry.path}: inline data unreadable: {exc}") from None
        if len(data) < entry.size:
            raise FileReadError(f"{entry.path}: i_size={entry.size} but the inode holds only {len(data)} "
                                "bytes of inline data")
        return data[:entry.size]

    def _stored_how(self, entry: Entry) -> str | TskFileSystem:
        """"inline" for an inline-data file, the TskFileSystem for an inode only
        TSK could parse (it was listed through TSK), else "runs"."""
        if entry.kind != FILE or not entry.size or type(entry.native) is int:
            return "runs"
        try:
            flags = self._ext.inode(entry.inode).i_flags
        except _PARSE_ERRORS:
            return self._fallback() or "runs"   # no TSK: file_runs says what is wrong
        return "inline" if flags & INLINE_DATA_FL else "runs"

    def read_chunks(self, entry: Entry, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        how = self._stored_how(entry)
        if how == "inline":
            yield self._inline(entry)
        elif how == "runs":
            yield from super().read_chunks(entry, chunk_size)
        else:
            yield from how.read_chunks(entry, chunk_size)

    def read_range(self, entry: Entry, offset: int, length: int) -> bytes:
        how = self._stored_how(entry)
        if how == "inline":
            return self._inline(entry)[max(0, offset):max(0, offset + length)]
        if how == "runs":
            return super().read_range(entry, offset, length)
        return how.read_range(entry, offset, length)

    def xattrs(self, entry: Entry) -> dict[str, bytes]:
        if entry.xattrs is not None:
            return entry.xattrs
        try:
            return self._ext.xattrs(entry.inode)
        except FileReadError:
            raise
        except Exception as exc:
            raise FileReadError(f"{entry.path}: extended attributes unreadable: {exc}") from None

    def close(self) -> None:
        if self._tsk is not None:
            self._tsk.close()
            self._tsk = None
