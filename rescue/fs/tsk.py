"""The Sleuth Kit backend: ext2/3/4, FAT, exFAT, NTFS, HFS+, ISO9660 through pytsk3.

TSK reads from our byte source through an `Img_Info` subclass, so it sees
whatever the layers below produce (a partition of a qcow2 inside a tar.gz).
What TSK leaves out for ext filesystems (xattrs, device numbers, nanosecond
times) comes from `ext_inode.ExtInodeReader` when that reader is present.
"""

from __future__ import annotations

import logging
import re
import struct
from collections import OrderedDict
from types import MappingProxyType
from typing import Iterator

import pytsk3

from ..errors import FilesystemError, GuestPathError
from ..source.base import ByteSource
from ..volume.probe import probe
from ..volume.tsk_image import TskImage
from .base import (BLOCK, CHAR, DIR, FIFO, FILE, SOCKET, SYMLINK, Entry, FileReadError, FileSystem, FsInfo,
                   normalize)
from .ext_dir import FT_KIND, DirectoryDamaged, ExtDirReader
from .ext_inode import ExtInodeReader

log = logging.getLogger(__name__)

_META_KIND = {
    pytsk3.TSK_FS_META_TYPE_REG: FILE,
    pytsk3.TSK_FS_META_TYPE_DIR: DIR,
    pytsk3.TSK_FS_META_TYPE_LNK: SYMLINK,
    pytsk3.TSK_FS_META_TYPE_FIFO: FIFO,
    pytsk3.TSK_FS_META_TYPE_CHR: CHAR,
    pytsk3.TSK_FS_META_TYPE_BLK: BLOCK,
    pytsk3.TSK_FS_META_TYPE_SOCK: SOCKET,
}
_NAME_KIND = {
    pytsk3.TSK_FS_NAME_TYPE_REG: FILE,
    pytsk3.TSK_FS_NAME_TYPE_DIR: DIR,
    pytsk3.TSK_FS_NAME_TYPE_LNK: SYMLINK,
    pytsk3.TSK_FS_NAME_TYPE_FIFO: FIFO,
    pytsk3.TSK_FS_NAME_TYPE_CHR: CHAR,
    pytsk3.TSK_FS_NAME_TYPE_BLK: BLOCK,
    pytsk3.TSK_FS_NAME_TYPE_SOCK: SOCKET,
}
_EXT_KIND = {0o100000: FILE, 0o040000: DIR, 0o120000: SYMLINK, 0o010000: FIFO, 0o020000: CHAR,
             0o060000: BLOCK, 0o140000: SOCKET}   # i_mode & S_IFMT
_VIRTUAL_META = (int(pytsk3.TSK_FS_META_TYPE_VIRT), int(pytsk3.TSK_FS_META_TYPE_VIRT_DIR))
# Entries TSK shows in a FAT/exFAT root that are directory records, not files.
_FAT_LABEL_SUFFIX = " (Volume Label Entry)"
_EXFAT_RECORDS = {"$ALLOC_BITMAP", "$UPCASE_TABLE", "$VOLUME_GUID", "$TEX_FAT", "$ACT"}
_ATTR_TRANSFORMED = int(pytsk3.TSK_FS_ATTR_COMP) | int(pytsk3.TSK_FS_ATTR_ENC)
# Filesystems whose data runs are plain byte ranges of the volume (block
# address x block size), so file data can be read without TSK in the way.
DIRECT_READ_TYPES = {"ext2", "ext3", "ext4", "vfat", "exfat", "ntfs"}
DIRECT_CHUNK = 4 << 20
_NO_XATTRS: dict[str, bytes] = MappingProxyType({})  # type: ignore[assignment]  # shared, read-only
MAX_DIR_CACHE = 1_000_000   # directory paths remembered (metadata-sized)
DIR_LISTINGS_CACHED = 4     # parsed ext directories kept for name lookups
MAX_WARNED = 10_000         # damage warnings remembered (each printed once)
EXT_ROOT_INO = 2
_RUN_HOLE = int(pytsk3.TSK_FS_ATTR_RUN_FLAG_SPARSE) | int(pytsk3.TSK_FS_ATTR_RUN_FLAG_FILLER)
_DATA_ATTRS = (pytsk3.TSK_FS_ATTR_TYPE_DEFAULT, pytsk3.TSK_FS_ATTR_TYPE_NTFS_DATA,
               pytsk3.TSK_FS_ATTR_TYPE_HFS_DATA)


_TSK_FS_NAMES = {int(getattr(pytsk3, n)): n[len("TSK_FS_TYPE_"):].lower()
                 for n in dir(pytsk3) if n.startswith("TSK_FS_TYPE_") and not n.endswith(("DETECT", "ENUM"))}


def _fs_type_name(ftype: int, probed: str | None) -> str:
    name = _TSK_FS_NAMES.get(int(ftype), "unknown")
    if name.startswith("fat") or name == "exfat":
        return "exfat" if name == "exfat" else "vfat"
    if name.startswith("ext") and probed and probed.startswith("ext"):
        return probed
    return {"iso9660": "iso9660", "hfs": "hfsplus"}.get(name, name)


class TskFileSystem(FileSystem):
    backend = "tsk"

    @classmethod
    def detect(cls, source: ByteSource) -> bool:
        return True   # the fallback: TSK itself says whether it can read the volume

    def __init__(self, source: ByteSource, name: str | None = None, native_dirs: bool = True) -> None:
        """`native_dirs=False` lists ext directories with TSK too (the reference
        the native reader is tested against)."""
        self.source = source
        self.name = name or source.name
        self._img = TskImage(source)
        self._last_handle = None
        self._last_ranges = None
        self._dir_inodes: dict[str, int] = {}   # directory path -> inode, filled by listdir
        try:
            self._fs = pytsk3.FS_Info(self._img)
        except OSError as exc:
            raise FilesystemError(_tsk_reason(exc), file=self.name) from None
        found = probe(source)
        self.block_size = int(self._fs.info.block_size)
        self.block_count = int(self._fs.info.block_count)
        self.info = FsInfo(type=_fs_type_name(int(self._fs.info.ftype), found.type), label=found.label,
                           uuid=found.uuid, block_size=self.block_size,
                           size=found.size or self.block_size * self.block_count, used=found.used,
                           free=found.free)
        self._ext = None
        self._dirs = None   # native ext directory reader (TSK lists in O(n^2))
        self._warned: set[str] = set()
        self._damaged_dirs: dict[str, str] = {}   # path -> what was wrong (see listing_damage)
        self._listings: OrderedDict[int, dict[bytes, tuple[int, int]]] = OrderedDict()   # for lookups
        if self.info.type.startswith("ext"):
            try:
                self._ext = ExtInodeReader(source)
                self._dirs = ExtDirReader(self._ext) if native_dirs else None
            except Exception:   # a damaged superblock copy: TSK's view still works
                self._ext = self._dirs = None
        if self.info.type == "ntfs" and not self.info.label:
            self.info.label = self._ntfs_label()
        if self.info.type in ("vfat", "exfat"):
            self.info.label = self._fat_label() or self.info.label

    # -- lookups -------------------------------------------------------------

    def _open(self, path: str):
        try:
            return self._fs.open(path)
        except OSError:
            raise GuestPathError(f"no such file or directory: {path}", file=self.name) from None

    def stat(self, path: str) -> Entry:
        path = normalize(path)
        if self._dirs is not None:
            found = self._ext_lookup(path)
            if found is not None:
                entry = self._ext_entry(path, found[0], found[1])
                if entry is None:
                    raise GuestPathError(f"no such file or directory: {path}", file=self.name)
                if path == "/" and entry.kind != DIR:   # a damaged root: listdir says what is wrong
                    entry.kind, entry.size, entry.link_target, entry.rdev = DIR, 0, None, None
                return entry
        handle = self._open(path)
        name_info = handle.info.name
        entry = self._entry(path, handle.info.meta, _NAME_KIND.get(name_info.type) if name_info else None)
        if entry is None:
            raise GuestPathError(f"no such file or directory: {path}", file=self.name)
        return entry

    # -- native ext directories ------------------------------------------------

    def _ext_names(self, ino: int) -> dict[bytes, tuple[int, int]]:
        """name -> (inode, file type) of an ext directory, parsed natively (a few kept: stat
        after listdir, and lookups through a huge directory, ask again)."""
        names = self._listings.get(ino)
        if names is not None:
            self._listings.move_to_end(ino)
            return names
        names = {}
        for e in self._dirs.entries(ino):
            names.setdefault(e.name, (e.inode, e.file_type))   # twin names: the first, as a lookup finds it
        self._listings[ino] = names
        if len(self._listings) > DIR_LISTINGS_CACHED:
            self._listings.popitem(last=False)
        return names

    def _ext_lookup(self, path: str) -> tuple[int, str | None] | None:
        """(inode, kind from the directory entry) of `path`, found through native
        directory reads from the nearest directory already seen; None when a
        directory on the way is damaged or unsupported (TSK then resolves it).
        Raises GuestPathError when the path does not exist."""
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
                found = self._ext_names(ino).get(parts[i].encode("utf-8", "surrogateescape"))
                if found is None:
                    raise GuestPathError(f"no such file or directory: {path}", file=self.name)
                ino = found[0]
        except (FileReadError, ValueError, struct.error) as exc:
            log.debug("%s: %s: native lookup failed (%s); asking TSK", self.name, path, exc)
            return None
        assert found is not None
        return found[0], FT_KIND.get(found[1])

    def _ext_entry(self, path: str, ino: int, name_kind: str | None) -> Entry | None:
        """The Entry `_entry` makes from TSK's inode view, made from our own parse
        of the inode (TSK's open_meta and attribute access cost 20 us a name);
        a differential test holds the two equal. An inode our parser rejects
        is left to TSK, which shows what it can (or nothing, as its listing does)."""
        ext = self._ext
        try:
            inode = ext.inode(ino)
            times = ext.times(ino)
        except (FileReadError, ValueError, struct.error) as exc:
            log.debug("%s: %s: inode %d: %s; asking TSK", self.name, path, ino, exc)
            return self._meta_entry(path, ino, name_kind)
        kind = _EXT_KIND.get(inode.i_mode & 0o170000) or name_kind
        if kind is None:
            return None
        entry = Entry(
            path=path, kind=kind, mode=inode.i_mode & 0o7777, uid=inode.i_uid | (inode.l_i_uid_high << 16),
            gid=inode.i_gid | (inode.l_i_gid_high << 16),
            size=inode.i_size_lo | (inode.i_size_high << 32) if kind in (FILE, SYMLINK) else 0,
            mtime_ns=times.mtime_ns, atime_ns=times.atime_ns, ctime_ns=times.ctime_ns,
            nlink=inode.i_links_count, inode=ino,
        )
        if kind == SYMLINK:
            try:
                entry.link_target = self._link_target(self._fs.open_meta(inode=ino).info.meta, path)
            except OSError:
                entry.link_target = ""
        elif kind in (CHAR, BLOCK):
            entry.rdev = ext.rdev(ino)
        try:   # the inode is parsed now anyway: its xattrs cost nothing more
            found = ext.xattrs(ino)
            entry.xattrs = found if found else _NO_XATTRS
        except Exception:
            pass   # left unloaded: xattrs() asks again and reports the damage
        return entry

    def _meta_entry(self, path: str, ino: int, name_kind: str | None) -> Entry | None:
        try:
            meta = self._fs.open_meta(inode=ino).info.meta
        except OSError:
            return None   # what TSK's own listing shows for an unloadable inode: nothing
        return self._entry(path, meta, name_kind)

    def _ext_listdir(self, path: str, ino: int, problems: list[str] | None = None) -> list[Entry]:
        entries = self._dirs.entries(ino, problems)
        out = []
        prefix = path.rstrip("/") + "/"
        for e in entries:
            entry = self._ext_entry(prefix + e.name.decode("utf-8", "surrogateescape"), e.inode,
                                     FT_KIND.get(e.file_type))
            if entry is not None:
                out.append(entry)
                if entry.kind == DIR and len(self._dir_inodes) < MAX_DIR_CACHE:
                    self._dir_inodes.setdefault(entry.path, entry.inode)
        return out

    def listdir(self, path: str) -> list[Entry]:
        path = normalize(path)
        inode = self._dir_inodes.get(path)
        damaged: tuple[int, DirectoryDamaged] | None = None
        found = None
        if self._dirs is not None:
            found = (inode, DIR) if inode is not None else self._ext_lookup(path)
            if found is not None:
                self._check_ext_dir(path, found[0])
                try:
                    return self._ext_listdir(path, found[0])
                except DirectoryDamaged as exc:
                    damaged = found[0], exc
                except (FileReadError, ValueError, struct.error) as exc:
                    log.info("%s: %s: %s; listing it with The Sleuth Kit", self.name, path, exc)
        try:
            out = self._tsk_listdir(path, found[0] if found is not None else inode)
        except FileReadError:
            if damaged is None:
                raise
        else:
            if damaged is not None:   # TSK's scan recovers names after the damage (and may add spurious ones)
                self._damaged_dirs[path] = str(damaged[1])
                self._warn_once(f"{damaged[1]} (directory {path}); listed by The Sleuth Kit's scan instead")
            return out
        # TSK cannot list it either: the entries before each damaged spot, as the kernel shows
        assert damaged is not None
        problems: list[str] = []
        out = self._ext_listdir(path, damaged[0], problems)
        for text in problems:
            self._warn_once(f"{text} (directory {path}): the rest of that block skipped")
        if problems:
            self._damaged_dirs[path] = "; ".join(problems)
        return out

    def _check_ext_dir(self, path: str, ino: int) -> None:
        """GuestPathError when the inode's mode names another type than a directory."""
        try:
            if self._dirs.may_be_dir(ino):
                return
            mode = self._ext.inode(ino).i_mode
        except (FileReadError, ValueError, struct.error):
            return   # an unreadable inode: TSK has the last word
        if path == "/":   # e2fsprogs f_badroot: say so rather than show an empty filesystem
            raise FileReadError(f"cannot list /: root inode {ino} has i_mode={mode:#o}, not a directory")
        raise GuestPathError(f"not a directory: {path}", file=self.name)

    def listing_damage(self, path: str) -> str | None:
        return self._damaged_dirs.get(path)

    def _warn_once(self, text: str) -> None:
        """Each damage once, though the guest layer and the walk list a directory twice."""
        if text not in self._warned:
            if len(self._warned) < MAX_WARNED:
                self._warned.add(text)
            log.warning("%s", text)

    def _tsk_listdir(self, path: str, inode: int | None) -> list[Entry]:
        try:
            # By inode when we have seen the directory: TSK resolves a path from
            # the root every time (4 ms a directory on NTFS).
            directory = self._fs.open_dir(inode=inode) if inode is not None else self._fs.open_dir(path)
        except OSError as exc:
            if self.stat(path).kind != DIR:
                raise GuestPathError(f"not a directory: {path}", file=self.name) from None
            raise FileReadError(f"cannot list {path}: {_tsk_reason(exc)}") from None
        out = []
        prefix = path.rstrip("/") + "/"
        try:
            for handle in directory:
                name_info = handle.info.name
                raw = name_info.name
                if raw in (b".", b"..") or not raw:
                    continue
                if not int(name_info.flags) & int(pytsk3.TSK_FS_NAME_FLAG_ALLOC):
                    continue   # a deleted name still in the directory block
                if int(name_info.type) == int(pytsk3.TSK_FS_NAME_TYPE_VIRT) or \
                        int(name_info.type) == int(pytsk3.TSK_FS_NAME_TYPE_VIRT_DIR):
                    continue   # TSK's own $OrphanFiles and NTFS metafiles views
                name = raw.decode("utf-8", "surrogateescape")
                if path == "/" and self._is_metadata_name(name):
                    continue
                entry = self._entry(prefix + name, handle.info.meta, _NAME_KIND.get(name_info.type))
                if entry is not None:
                    out.append(entry)
                    if entry.kind == DIR and len(self._dir_inodes) < MAX_DIR_CACHE:
                        # twin names (a corrupt directory) must not point the path elsewhere
                        self._dir_inodes.setdefault(entry.path, entry.inode)
        except OSError as exc:
            raise FileReadError(f"cannot list {path}: {_tsk_reason(exc)}") from None
        return out

    def _is_metadata_name(self, name: str) -> bool:
        """Filesystem records TSK lists as files in the root directory."""
        kind = self.info.type
        if kind == "ntfs":
            return name.startswith("$")   # $MFT, $Bitmap, ... are not user data
        if kind in ("vfat", "exfat"):
            return name.endswith(_FAT_LABEL_SUFFIX) or (kind == "exfat" and name in _EXFAT_RECORDS)
        return False

    def _entry(self, path: str, meta, name_kind: str | None) -> Entry | None:
        """An Entry from TSK's inode view; `name_kind` (from the directory entry)
        serves when the inode's mode has no known type."""
        if meta is None or int(meta.type) in _VIRTUAL_META:
            return None
        kind = _META_KIND.get(meta.type) or name_kind
        if kind is None:
            return None
        inode = int(meta.addr)
        mode = int(meta.mode) & 0o7777
        entry = Entry(
            path=path, kind=kind, mode=mode, uid=int(meta.uid), gid=int(meta.gid),
            size=int(meta.size) if kind in (FILE, SYMLINK) else 0,
            mtime_ns=int(meta.mtime) * 1_000_000_000 + int(meta.mtime_nano),
            atime_ns=int(meta.atime) * 1_000_000_000 + int(meta.atime_nano),
            ctime_ns=int(meta.ctime) * 1_000_000_000 + int(meta.ctime_nano),
            nlink=int(meta.nlink), inode=inode,
        )
        if kind == SYMLINK:
            entry.link_target = self._link_target(meta, path)
        if self._ext is not None:
            try:
                times = self._ext.times(inode)
                entry.mtime_ns, entry.atime_ns, entry.ctime_ns = times.mtime_ns, times.atime_ns, times.ctime_ns
                if kind in (CHAR, BLOCK):
                    entry.rdev = self._ext.rdev(inode)
            except Exception:
                pass   # keep TSK's view of a damaged inode
            try:   # the inode is parsed now anyway: its xattrs cost nothing more
                found = self._ext.xattrs(inode)
                entry.xattrs = found if found else _NO_XATTRS
            except Exception:
                pass   # left unloaded: xattrs() asks again and reports the damage
        if self.info.type in ("vfat", "exfat"):
            entry.mode = 0o755 if kind == DIR else 0o644   # FAT has no Unix modes; TSK invents 0777
        return entry

    def _link_target(self, meta, path: str) -> str:
        link = meta.link
        if link:
            raw = link if isinstance(link, bytes) else link.encode("utf-8", "surrogateescape")
        else:
            try:
                handle = self._fs.open_meta(inode=int(meta.addr))
                raw = handle.read_random(0, min(int(meta.size), 65536))
            except OSError:
                raw = b""
        return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")

    # -- content -------------------------------------------------------------

    def _handle(self, entry: Entry):
        # check, map and read all ask for the same file in a row: keep the last handle
        if self._last_handle is not None and self._last_handle[0] == entry.inode:
            return self._last_handle[1]
        try:
            handle = self._fs.open_meta(inode=entry.inode)
        except OSError as exc:
            raise FileReadError(f"cannot open {entry.path}: {_tsk_reason(exc)}") from None
        self._last_handle = (entry.inode, handle)
        return handle

    def read_chunks(self, entry: Entry, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        ranges = self.data_ranges(entry)   # also checks blocks against the fs end
        extents = self._extents(entry)
        if extents is None:
            yield from self._read_chunks_tsk(entry, ranges, chunk_size)
            return
        # Fast path: the file's runs read straight from the volume, in large
        # reads, without TSK's block-by-block copy.
        chunk = max(chunk_size, DIRECT_CHUNK)
        pos = 0
        for file_offset, length, disk_offset in extents:
            while pos < file_offset:   # a hole
                n = min(chunk, file_offset - pos)
                yield bytes(n)
                pos += n
            done = 0
            while done < length:
                n = min(chunk, length - done)
                data = self._read_volume(entry, disk_offset + done, n, pos)
                yield data
                done += n
                pos += n
        while pos < entry.size:
            n = min(chunk, entry.size - pos)
            yield bytes(n)
            pos += n

    def _read_volume(self, entry: Entry, offset: int, length: int, file_pos: int) -> bytes:
        try:
            data = self.source.read(offset, length)
        except OSError as exc:   # DamagedRange from a container, an I/O error
            raise FileReadError(f"{entry.path}: unreadable at offset {file_pos}: {exc}") from None
        if len(data) != length:
            raise FileReadError(f"{entry.path}: data at offset {file_pos} lies past the end of the image "
                                "(truncated?)")
        return data

    def _read_chunks_tsk(self, entry: Entry, ranges, chunk_size: int) -> Iterator[bytes]:
        """TSK reads the file (resident data, compressed or encrypted NTFS, HFS+)."""
        handle = self._handle(entry)
        if ranges is None:
            ranges = [(0, entry.size)]
        pos = 0
        for start, length in ranges:
            while pos < start:   # a hole: zeros without asking TSK
                n = min(chunk_size, start - pos)
                yield bytes(n)
                pos += n
            end = start + length
            while pos < end:
                n = min(chunk_size, end - pos)
                try:
                    data = handle.read_random(pos, n)
                except OSError as exc:
                    raise FileReadError(f"{entry.path}: unreadable at offset {pos}: {_tsk_reason(exc)}") from None
                if len(data) != n:
                    raise FileReadError(f"{entry.path}: short read at offset {pos} ({len(data)} of {n} bytes)")
                yield data
                pos += n
        while pos < entry.size:
            n = min(chunk_size, entry.size - pos)
            yield bytes(n)
            pos += n

    def read_range(self, entry: Entry, offset: int, length: int) -> bytes:
        length = max(0, min(length, entry.size - offset))
        if not length:
            return b""
        self.data_ranges(entry)
        extents = self._extents(entry)
        if extents is not None:
            out = bytearray(length)   # holes stay zero
            end = offset + length
            for file_offset, run_length, disk_offset in extents:
                lo, hi = max(offset, file_offset), min(end, file_offset + run_length)
                if lo < hi:
                    out[lo - offset:hi - offset] = self._read_volume(entry, disk_offset + lo - file_offset,
                                                                     hi - lo, lo)
            return bytes(out)
        handle = self._handle(entry)
        try:
            return handle.read_random(offset, length)
        except OSError as exc:
            raise FileReadError(f"{entry.path}: unreadable at offset {offset}: {_tsk_reason(exc)}") from None

    def _extents(self, entry: Entry) -> list[tuple[int, int, int]] | None:
        """(file offset, length, byte offset in the volume) of each data run,
        when reading the volume directly gives the file's bytes; else None."""
        cached = self._last_ranges
        if cached is not None and cached[0] == (entry.inode, entry.size):
            return cached[2]
        return None

    def data_ranges(self, entry: Entry) -> list[tuple[int, int]] | None:
        """Byte ranges of the file that hold data (holes left out).

        Raises FileReadError when a run points past the end of the filesystem:
        such a file cannot be read honestly, and finding out now keeps a
        half-written member out of the tar."""
        if entry.kind != FILE or entry.size == 0:
            return [] if entry.kind == FILE else None
        cached = self._last_ranges
        if cached is not None and cached[0] == (entry.inode, entry.size):
            return cached[1]
        handle = self._handle(entry)
        bs = self.block_size
        transformed = False
        ranges: list[tuple[int, int]] = []
        extents: list[tuple[int, int, int]] | None = [] if self.info.type in DIRECT_READ_TYPES else None
        found = False
        try:
            for attr in handle:
                info = attr.info
                if info.type not in _DATA_ATTRS or (info.name and info.name not in (b"$Data", b"")):
                    continue
                if not int(info.flags) & int(pytsk3.TSK_FS_ATTR_NONRES):
                    return None   # resident (inline) data: no blocks to map
                transformed = bool(int(info.flags) & _ATTR_TRANSFORMED)
                if transformed:
                    # Compressed or encrypted: only TSK can decode it, and the
                    # "sparse" runs inside NTFS compression units are not holes.
                    extents = None
                found = True
                for run in attr:
                    start = int(run.offset) * bs
                    if start >= entry.size:
                        break
                    length = min(int(run.len) * bs, entry.size - start)
                    if int(run.flags) & _RUN_HOLE:
                        continue
                    if int(run.addr) + int(run.len) > self.block_count:
                        raise FileReadError(
                            f"{entry.path}: data at block {int(run.addr)} lies past the end of the "
                            f"filesystem ({self.block_count} blocks): the image is damaged or truncated")
                    if ranges and ranges[-1][0] + ranges[-1][1] == start:
                        ranges[-1] = (ranges[-1][0], ranges[-1][1] + length)
                    else:
                        ranges.append((start, length))
                    if extents is not None:
                        disk = int(run.addr) * bs
                        last = extents[-1] if extents else None
                        if last and last[0] + last[1] == start and last[2] + last[1] == disk:
                            extents[-1] = (last[0], last[1] + length, last[2])
                        else:
                            extents.append((start, length, disk))
                break
        except OSError as exc:
            raise FileReadError(f"{entry.path}: cannot map its blocks: {_tsk_reason(exc)}") from None
        result = ranges if found and not transformed else None
        self._last_ranges = ((entry.inode, entry.size), result, extents if found else None)
        return result

    def xattrs(self, entry: Entry) -> dict[str, bytes]:
        if entry.xattrs is not None:
            return entry.xattrs
        if self._ext is None:
            return {}
        try:
            return self._ext.xattrs(entry.inode)
        except FileReadError:
            raise
        except Exception as exc:
            raise FileReadError(f"{entry.path}: extended attributes unreadable: {exc}") from None

    def _fat_label(self) -> str | None:
        """The label in the root directory's volume-label record (what blkid shows)."""
        try:
            for handle in self._fs.open_dir("/"):
                raw = handle.info.name.name.decode("utf-8", "replace")
                if raw.endswith(_FAT_LABEL_SUFFIX):
                    return raw[:-len(_FAT_LABEL_SUFFIX)].rstrip() or None
        except Exception:
            return None
        return None

    def _ntfs_label(self) -> str | None:
        try:
            handle = self._fs.open("/$Volume")
            for attr in handle:
                if int(attr.info.type) == 0x60:   # $VOLUME_NAME, UTF-16LE
                    raw = handle.read_random(0, int(attr.info.size), attr.info.type, int(attr.info.id))
                    return raw.decode("utf-16-le", "replace") or None
        except Exception:
            return None
        return None

    def close(self) -> None:
        self._fs = None
        self._img = None


def _tsk_reason(exc: Exception) -> str:
    """TSK's message without its C++ file:line noise."""
    text = re.sub(r"\(tsk3\.cpp:\d+\)\s*", "", str(exc))
    text = re.sub(r"^\w+_Con: ", "", text)
    text = text.replace("Error opening FS_Info: ", "")
    text = re.sub(r"Unable to open the image as a filesystem at offset: 0x[0-9a-f]+ with error: ", "", text)
    return text.strip() or "unknown error"
