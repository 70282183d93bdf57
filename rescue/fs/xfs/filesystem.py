"""XfsFileSystem: a native, read-only XFS reader (v4 and v5) for the fs registry.

References: "XFS Algorithms & Data Structures" 3rd ed. (kernel.org
xfs-documentation), Linux fs/xfs/libxfs/xfs_format.h, xfs_da_format.h,
xfs_log_format.h (see structs.py for what each module takes from them).

No AG header (AGF, AGI, free-space or inode btrees) is needed to read files:
inode numbers encode where inodes lie, and forks map file blocks. So damage to
those headers does not stop a rescue.
"""

from __future__ import annotations

import logging
import posixpath
import struct
from collections import OrderedDict
from typing import Callable, TypeVar

from construct import ConstructError

from ...errors import FilesystemError, GuestPathError
from ...source.base import DATA, UNWRITTEN, ByteSource, Run
from ..base import DIR, FILE, SYMLINK, BLOCK, CHAR, Entry, FileReadError, FileSystem, FsInfo, cover, normalize
from .attr import read_xattrs
from .crc import crc_ok
from .dir import read_directory
from .inode import (
    FMT_BTREE, FMT_EXTENTS, FMT_LOCAL, Extent, Inode, InodeReader, XfsDamage, decode_extents, extent_records, rdev,
    sorted_map,
)
from .structs import DIFLAG_REALTIME, EXT_FLAG_SHIFT, MASK54, REMOTE_CRC_OFF, REMOTE_HDR, SB_MAGIC, SYMLINK_MAGIC
from .superblock import log_state, parse_superblock

log = logging.getLogger(__name__)

PARSER_ERRORS = (ConstructError, struct.error, IndexError, ValueError, KeyError, OverflowError,
                 RecursionError, ZeroDivisionError, TypeError)
MAX_SYMLINK = 1024               # XFS_SYMLINK_MAXLEN
DIRS_CACHED = 8                  # name maps kept for path lookups
RUNS_CACHED = 64                 # file maps kept (a big fragmented file's map can be large)
T = TypeVar("T")
_REC = struct.Struct(">QQ")      # one packed extent record (xfs_bmbt_rec)


class XfsFileSystem(FileSystem):
    """Reads an XFS volume directly: no kernel, no libguestfs."""

    backend = "xfs"

    @classmethod
    def detect(cls, source: ByteSource) -> bool:
        try:
            return source.read(0, 4) == SB_MAGIC
        except OSError:
            return False

    def __init__(self, source: ByteSource, name: str | None = None) -> None:
        self.source = source
        self.name = name or getattr(source, "name", "volume")
        try:
            raw = source.read(0, 4096)
        except OSError as exc:
            raise FilesystemError(f"XFS superblock unreadable: {exc}", file=self.name) from None
        try:
            self.sb = parse_superblock(raw, self.name)
        except PARSER_ERRORS as exc:
            raise FilesystemError(f"XFS superblock malformed: {exc}", file=self.name) from None
        sb = self.sb
        if sb.dblocks << sb.block_log > source.size:
            log.warning("%s: XFS volume is %d bytes but the image holds only %d (truncated?): "
                        "files past the end will be skipped", self.name, sb.dblocks << sb.block_log, source.size)
        try:
            state = log_state(source, sb)
        except (OSError, *PARSER_ERRORS) as exc:
            state = f"unknown: {exc}"
        if state == "dirty":
            log.warning("%s: XFS log is dirty (not cleanly unmounted): read as a norecovery mount would, "
                        "the most recent writes may be missing", self.name)
        elif state.startswith("unknown"):
            log.warning("%s: XFS log state %s; recent writes may be missing", self.name, state)
        if sb.needsrepair:
            log.warning("%s: XFS is marked as needing xfs_repair; reading what is there", self.name)
        self.log_state = state
        self.reader = InodeReader(source, sb, self.name)
        self._dirs: OrderedDict[int, dict[bytes, int]] = OrderedDict()
        self._runs: OrderedDict[int, list[Run]] = OrderedDict()
        self._damage: dict[str, str] = {}
        free = sb.fdblocks << sb.block_log
        size = sb.dblocks << sb.block_log
        self.info = FsInfo(
            type="xfs", label=sb.label or None, uuid=sb.uuid, block_size=sb.block_size, size=size,
            used=max(0, size - free), free=free,
            details={"version": sb.version, "features": sb.features, "log": state,
                     "dir_block_size": sb.dir_block_size, "inode_size": sb.inode_size,
                     "ag_count": sb.agcount})
        try:
            root = self.reader.inode(sb.rootino)
        except (XfsDamage, *PARSER_ERRORS) as exc:
            raise FilesystemError(f"XFS root directory unreadable: {exc}", file=self.name) from None
        if root.kind != DIR:
            raise FilesystemError(f"XFS root inode {sb.rootino} is not a directory", file=self.name)

    # -- the boundary: parser exceptions never escape ----------------------------------------
    def _guard(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (FileReadError, GuestPathError):
            raise
        except PARSER_ERRORS as exc:
            raise FileReadError(f"{self.name}: {what}: malformed XFS metadata ({type(exc).__name__}: {exc})") from None
        except MemoryError:
            raise FileReadError(f"{self.name}: {what}: metadata claims absurd sizes") from None

    # -- lookups ----------------------------------------------------------------------------
    def _names(self, inode: Inode, path: str) -> dict[bytes, int]:
        names = self._dirs.get(inode.ino)
        if names is None:
            pairs, damage = read_directory(self.reader, inode)
            self._note_damage(path, damage)
            names = dict(pairs)
            self._dirs[inode.ino] = names
            if len(self._dirs) > DIRS_CACHED:
                self._dirs.popitem(last=False)
        else:
            self._dirs.move_to_end(inode.ino)
        return names

    def _note_damage(self, path: str, damage: list[str]) -> None:
        if damage:
            text = damage[0] if len(damage) == 1 else f"{damage[0]} (and {len(damage) - 1} more damaged blocks)"
            if path not in self._damage:
                log.warning("%s: directory %s listed in part: %s", self.name, path, text)
            self._damage[path] = text

    def _lookup(self, path: str, chain: list[int] | None = None) -> Inode:
        """The inode at `path`; `chain` collects the directories passed through."""
        path = normalize(path)
        inode = self._inode(self.sb.rootino, "/")
        cur = "/"
        for part in [p for p in path.split("/") if p]:
            if chain is not None:
                chain.append(inode.ino)
            if inode.kind != DIR:
                raise GuestPathError(f"not a directory: {cur}", file=self.name)
            names = self._names(inode, cur)
            ino = names.get(part.encode("utf-8", "surrogateescape"))
            cur = posixpath.join(cur, part)
            if ino is None:
                raise GuestPathError(f"no such file or directory: {path}", file=self.name)
            inode = self._inode(ino, cur)
        return inode

    def _inode(self, ino: int, path: str) -> Inode:
        try:
            return self.reader.inode(ino)
        except XfsDamage as exc:
            raise FileReadError(f"{self.name}: {path}: {exc}") from None

    def _entry(self, path: str, inode: Inode) -> Entry:
        kind = inode.kind
        entry = Entry(path, kind, inode.mode, inode.uid, inode.gid,
                      inode.size if kind in (FILE, SYMLINK, DIR) else 0,
                      inode.mtime_ns, inode.atime_ns, inode.ctime_ns, inode.nlink, inode.ino)
        # What the inode says now, so reading the file later parses it no more:
        # its extent records (file_runs) and its attributes when they lie in the inode.
        if not inode.forkoff:
            entry.xattrs = {}
        elif inode.attr_format == FMT_LOCAL or (inode.attr_format == FMT_EXTENTS and not inode.anextents):
            try:   # in the inode (or an emptied fork, left after the last attribute went): no reads
                entry.xattrs = read_xattrs(self.reader, inode)
            except (XfsDamage, *PARSER_ERRORS):
                pass   # left unloaded: xattrs() reads them again and reports the damage
        if kind == FILE:   # a file in one piece from its start: where it lies (as ext); else its records
            records = extent_records(inode)
            if records is not None:
                where = self._one_piece(records, inode.size)
                entry.native = records if where is None else where
        elif kind == SYMLINK:
            entry.link_target = self._symlink(inode, path)
        elif inode.kind in (CHAR, BLOCK):
            entry.rdev = rdev(inode)
        return entry

    def _symlink(self, inode: Inode, path: str) -> str:
        size = inode.size
        if size == 0 or size > MAX_SYMLINK:
            raise FileReadError(f"{self.name}: {path}: symlink length {size} is impossible")
        if inode.data_format == FMT_LOCAL:
            data = inode.data_fork[:size]
            if len(data) != size:
                raise FileReadError(f"{self.name}: {path}: inline symlink runs past the inode")
        else:
            data = self._remote_symlink(inode, path, size)
        return data.decode("utf-8", "surrogateescape")

    def _remote_symlink(self, inode: Inode, path: str, size: int) -> bytes:
        """Target blocks; on v5 each extent (one buffer to the kernel, xfs_readlink_bmap)
        starts with an XSLM header and CRC over the whole extent."""
        sb = self.sb
        parts = []
        try:
            for ext in self.reader.extents(inode):
                data = self.reader.read_fsb(ext.block, ext.count, f"symlink inode {inode.ino}")
                if sb.crc:
                    if data[:4] != SYMLINK_MAGIC or not crc_ok(data, REMOTE_CRC_OFF):
                        raise XfsDamage(f"symlink block at file block {ext.offset} is damaged (magic/CRC)")
                    (nbytes,) = struct.unpack_from(">I", data, 8)
                    data = data[REMOTE_HDR:REMOTE_HDR + nbytes]
                parts.append(data)
        except XfsDamage as exc:
            raise FileReadError(f"{self.name}: {path}: {exc}") from None
        data = b"".join(parts)[:size]
        if len(data) != size:
            raise FileReadError(f"{self.name}: {path}: symlink blocks hold {len(data)} of {size} bytes")
        return data

    # -- the interface ----------------------------------------------------------------------
    def stat(self, path: str) -> Entry:
        path = normalize(path)
        return self._guard(path, lambda: self._entry(path, self._lookup(path)))

    def listdir(self, path: str) -> list[Entry]:
        path = normalize(path)
        return self._guard(path, lambda: self._listdir(path))

    def _listdir(self, path: str) -> list[Entry]:
        chain: list[int] = []
        inode = self._lookup(path, chain)
        if inode.kind != DIR:
            raise GuestPathError(f"not a directory: {path}", file=self.name)
        # Directories cannot be hard-linked: one seen again above us is a damaged entry (a loop).
        ancestors = set(chain) | {inode.ino}
        try:
            pairs, damage = read_directory(self.reader, inode)
        except XfsDamage as exc:
            raise FileReadError(f"{self.name}: {path}: {exc}") from None
        out = []
        problems = list(damage)
        prefix = path.rstrip("/") + "/"
        inode_of, entry_of = self.reader.inode, self._entry
        for name, ino in pairs:
            child = prefix + name.decode("utf-8", "surrogateescape")
            if b"/" in name or b"\0" in name:
                problems.append(f"name {name!r} holds '/' or NUL")
                continue
            try:   # as _guard, without a closure a child
                entry = entry_of(child, inode_of(ino))
            except (FileReadError, XfsDamage) as exc:
                problems.append(f"{child}: {exc}")
                continue
            except PARSER_ERRORS as exc:
                problems.append(f"{child}: malformed XFS metadata ({type(exc).__name__}: {exc})")
                continue
            except MemoryError:
                problems.append(f"{child}: metadata claims absurd sizes")
                continue
            if entry.kind == DIR and ino in ancestors:
                problems.append(f"{child}: names directory inode {ino}, which contains it (a loop)")
                continue
            out.append(entry)
        self._note_damage(path, problems)
        if not problems:
            self._damage.pop(path, None)
        return out

    def listing_damage(self, path: str) -> str | None:
        return self._damage.get(normalize(path))

    def file_runs(self, entry: Entry) -> list[Run]:
        native = entry.native   # what the walk kept (_entry): no inode to read again
        if native is not None and entry.kind == FILE:
            if entry.size == 0:
                return []
            if type(native) is int:
                return [Run(0, entry.size, DATA, native)]
            if type(native) is bytes:
                try:
                    return self._runs_of(entry, native)
                except XfsDamage as exc:
                    raise FileReadError(f"{self.name}: {entry.path}: {exc}") from None
        # The map of an inode on a read-only volume never changes: keep the last few
        # (extract asks for a file's runs for its sparse map, its data and its manifest).
        runs = self._runs.get(entry.inode)
        if runs is None:
            runs = self._guard(entry.path, lambda: self._file_runs(entry))
            self._runs[entry.inode] = runs
            if len(self._runs) > RUNS_CACHED:
                self._runs.popitem(last=False)
        return list(runs)

    def _file_runs(self, entry: Entry) -> list[Run]:
        inode = self._inode(entry.inode, entry.path)
        if inode.kind != FILE:
            raise FileReadError(f"{self.name}: {entry.path}: not a regular file")
        if inode.flags & DIFLAG_REALTIME:
            raise FileReadError(f"{self.name}: {entry.path}: data lies on the XFS realtime device, "
                                "which is a separate volume this reader does not open")
        size = inode.size
        if size == 0:
            return []
        if inode.data_format == FMT_LOCAL:
            raise FileReadError(f"{self.name}: {entry.path}: inline regular file data is not a format XFS writes")
        if inode.data_format not in (FMT_EXTENTS, FMT_BTREE):
            raise FileReadError(f"{self.name}: {entry.path}: data fork format {inode.data_format} is not a file's")
        try:
            extents = self.reader.extents(inode)
        except XfsDamage as exc:
            raise FileReadError(f"{self.name}: {entry.path}: {exc}") from None
        return self._runs_from(entry, extents)

    def _one_piece(self, records: bytes, size: int) -> int | None:
        """Where the file's data lies when one written extent from file block 0
        holds all of it (most files; the checks of _runs_from), else None."""
        if len(records) != 16:
            return None
        sb = self.sb
        l0, l1 = _REC.unpack(records)
        block, count = ((l0 & 0x1FF) << 43) | (l1 >> 21), l1 & 0x1FFFFF
        if l0 >> EXT_FLAG_SHIFT or (l0 >> 9) & MASK54 or count << sb.block_log < size or not count:
            return None
        where, last = sb.fsb_to_byte(block), sb.fsb_to_byte(block + count - 1)
        return where if where is not None and last is not None and last >= where else None

    def _runs_of(self, entry: Entry, records: bytes) -> list[Run]:
        """file_runs from the packed extent records the walk kept."""
        what = f"inode {entry.inode} data fork"
        return self._runs_from(entry, sorted_map(decode_extents(records, len(records) // 16), what))

    def _runs_from(self, entry: Entry, extents: list[Extent]) -> list[Run]:
        size = entry.size
        blog = self.sb.block_log
        runs = []
        for ext in extents:
            where = self.sb.fsb_to_byte(ext.block)
            last = self.sb.fsb_to_byte(ext.block + ext.count - 1) if ext.count else where
            if ext.offset << blog >= size:
                break
            if where is None or last is None or last < where:
                raise FileReadError(f"{self.name}: {entry.path}: extent at file block {ext.offset} points "
                                    f"outside the filesystem (block {ext.block:#x})")
            runs.append(Run(ext.offset << blog, ext.count << blog, UNWRITTEN if ext.unwritten else DATA,
                            None if ext.unwritten else where))
        return cover(runs, size)

    def xattrs(self, entry: Entry) -> dict[str, bytes]:
        if entry.xattrs is not None:   # read with the inode by the walk
            return entry.xattrs

        def load() -> dict[str, bytes]:
            inode = self._inode(entry.inode, entry.path) if entry.inode else self._lookup(entry.path)
            try:
                return read_xattrs(self.reader, inode)
            except XfsDamage as exc:
                raise FileReadError(f"{self.name}: {entry.path}: {exc}") from None
        return self._guard(entry.path, load)

    def close(self) -> None:
        self._dirs.clear()
