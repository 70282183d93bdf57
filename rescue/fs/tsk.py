"""The Sleuth Kit backend: FAT, exFAT, NTFS, HFS+, ISO9660 through pytsk3, and
the registry's fallback for anything else its library reads.

TSK reads from our byte source through an `Img_Info` subclass, so it sees
whatever the layers below produce (a partition of a qcow2 inside a tar.gz).
ext2/3/4 has its own reader (fs/ext.py), which hands damaged directories to
this class (TSK's scan recovers names after the damage); for ext, what TSK
leaves out (xattrs, device numbers, nanosecond times) comes from
`ext_inode.ExtInodeReader`, so both views of an inode agree.
"""

from __future__ import annotations

import logging
import re
from types import MappingProxyType
from typing import Iterator

import pytsk3

from ..errors import FilesystemError, GuestPathError
from ..source.base import COMPRESSED, DATA, HOLE_KINDS, ZERO, ByteSource, Run
from ..volume.probe import probe
from ..volume.tsk_image import TskImage
from .base import (BLOCK, CHAR, DIR, FIFO, FILE, READ_CHUNK, SOCKET, SYMLINK, Entry, FileReadError, FileSystem,
                   FsInfo, cover, normalize)
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
_VIRTUAL_META = (int(pytsk3.TSK_FS_META_TYPE_VIRT), int(pytsk3.TSK_FS_META_TYPE_VIRT_DIR))
# Entries TSK shows in a FAT/exFAT root that are directory records, not files.
_FAT_LABEL_SUFFIX = " (Volume Label Entry)"
_EXFAT_RECORDS = {"$ALLOC_BITMAP", "$UPCASE_TABLE", "$VOLUME_GUID", "$TEX_FAT", "$ACT"}
_ATTR_TRANSFORMED = int(pytsk3.TSK_FS_ATTR_COMP) | int(pytsk3.TSK_FS_ATTR_ENC)
# Filesystems whose data runs are plain byte ranges of the volume (block
# address x block size), so file data can be read without TSK in the way.
DIRECT_READ_TYPES = {"ext2", "ext3", "ext4", "vfat", "exfat", "ntfs"}
_NO_XATTRS: dict[str, bytes] = MappingProxyType({})  # type: ignore[assignment]  # shared, read-only
MAX_DIR_CACHE = 1_000_000   # directory paths remembered (metadata-sized)
_RUN_HOLE = int(pytsk3.TSK_FS_ATTR_RUN_FLAG_SPARSE) | int(pytsk3.TSK_FS_ATTR_RUN_FLAG_FILLER)
_DATA_ATTRS = (pytsk3.TSK_FS_ATTR_TYPE_DEFAULT, pytsk3.TSK_FS_ATTR_TYPE_NTFS_DATA,
               pytsk3.TSK_FS_ATTR_TYPE_HFS_DATA)


_TSK_FS_NAMES = {int(getattr(pytsk3, n)): n[len("TSK_FS_TYPE_"):].lower()
                 for n in dir(pytsk3) if n.startswith("TSK_FS_TYPE_") and not n.endswith(("DETECT", "ENUM"))}


def _utf8_encodable(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:   # a surrogate-escaped byte of a non-UTF-8 name
        return False
    return True


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

    def __init__(self, source: ByteSource, name: str | None = None) -> None:
        self.source = source
        self.name = name or source.name
        self._img = TskImage(source)
        self._last_handle = None   # (inode, TSK file): mapping and reading ask for one file in a row
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
                           free=found.free, details={"backend": self.backend})
        self._ext = None   # ext inode extras TSK does not give (xattrs, rdev, ns times)
        if self.info.type.startswith("ext"):
            try:
                self._ext = ExtInodeReader(source)
            except Exception:   # a damaged superblock copy: TSK's view still works
                self._ext = None
        if self.info.type == "ntfs" and not self.info.label:
            self.info.label = self._ntfs_label()
        if self.info.type in ("vfat", "exfat"):
            self.info.label = self._fat_label() or self.info.label

    # -- lookups -------------------------------------------------------------

    def _open(self, path: str):
        if "\0" in path:   # a crafted name holding a NUL: libtsk's path API cannot name it (pytsk3 ValueError)
            raise FileReadError(f"{path!r}: a name holding a NUL byte cannot be looked up by path")
        try:
            return self._fs.open(path)
        except UnicodeEncodeError:   # a name that is not UTF-8: pytsk3 takes only str paths
            return self._open_by_bytes(path)
        except OSError:
            raise GuestPathError(f"no such file or directory: {path}", file=self.name) from None

    def _open_by_bytes(self, path: str):
        """`path` resolved one directory at a time, comparing raw name bytes."""
        inode = int(self._fs.info.root_inum)
        for part in path.strip("/").split("/"):
            wanted = part.encode("utf-8", "surrogateescape")
            try:
                found = next((int(h.info.meta.addr) for h in self._fs.open_dir(inode=inode)
                              if h.info.name.name == wanted and h.info.meta is not None), None)
            except OSError:
                found = None
            if found is None:
                raise GuestPathError(f"no such file or directory: {path}", file=self.name)
            inode = found
        try:
            return self._fs.open_meta(inode=inode)
        except OSError:
            raise GuestPathError(f"no such file or directory: {path}", file=self.name) from None

    def stat(self, path: str) -> Entry:
        path = normalize(path)
        handle = self._open(path)
        name_info = handle.info.name
        entry = self._entry(path, handle.info.meta, _NAME_KIND.get(name_info.type) if name_info else None)
        if entry is None:
            raise GuestPathError(f"no such file or directory: {path}", file=self.name)
        return entry

    def inode_entry(self, path: str, ino: int, name_kind: str | None) -> Entry | None:
        """The Entry of inode `ino` seen as `path` (the ext reader asks for an
        inode it cannot parse); None when TSK cannot load it either."""
        try:
            meta = self._fs.open_meta(inode=ino).info.meta
        except OSError:
            return None   # what TSK's own listing shows for an unloadable inode: nothing
        return self._entry(path, meta, name_kind)

    def listdir(self, path: str) -> list[Entry]:
        path = normalize(path)
        return self._tsk_listdir(path, self._dir_inodes.get(path))

    def listdir_inode(self, path: str, ino: int) -> list[Entry]:
        """Directory inode `ino` listed as `path` (the ext reader's fallback for a
        damaged directory: TSK's scan recovers names after the damage)."""
        return self._tsk_listdir(normalize(path), ino)

    def _tsk_listdir(self, path: str, inode: int | None) -> list[Entry]:
        try:
            # By inode when we have seen the directory: TSK resolves a path from
            # the root every time (4 ms a directory on NTFS).
            if inode is None and not _utf8_encodable(path):
                inode = int(self._open_by_bytes(path).info.meta.addr)   # pytsk3 takes only UTF-8 str
            directory = self._fs.open_dir(inode=inode) if inode is not None else self._fs.open_dir(path)
        except OSError as exc:
            entry = self.stat(path) if inode is None else self.inode_entry(path, inode, None)
            if entry is not None and entry.kind != DIR:
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
        # mapping and reading ask for the same file in a row: keep the last handle
        if self._last_handle is not None and self._last_handle[0] == entry.inode:
            return self._last_handle[1]
        try:
            handle = self._fs.open_meta(inode=entry.inode)
        except OSError as exc:
            raise FileReadError(f"cannot open {entry.path}: {_tsk_reason(exc)}") from None
        self._last_handle = (entry.inode, handle)
        return handle

    def file_runs(self, entry: Entry) -> list[Run]:
        """The file's runs from TSK's attribute runs. `where` is set where the
        volume holds the bytes as they are (DIRECT_READ_TYPES); resident data,
        HFS+/ISO runs and NTFS compressed or encrypted data are read through TSK.

        Raises FileReadError when a run points past the end of the filesystem:
        such a file cannot be read honestly, and finding out now keeps a
        half-written member out of the tar."""
        if entry.kind != FILE or entry.size == 0:
            return []
        handle = self._handle(entry)
        bs = self.block_size
        direct = self.info.type in DIRECT_READ_TYPES
        runs: list[Run] = []
        try:
            for attr in handle:
                info = attr.info
                if info.type not in _DATA_ATTRS or (info.name and info.name not in (b"$Data", b"")):
                    continue
                if not int(info.flags) & int(pytsk3.TSK_FS_ATTR_NONRES):
                    return [Run(0, entry.size, DATA)]   # resident (inline) data: TSK reads it
                if int(info.flags) & _ATTR_TRANSFORMED:
                    # Compressed or encrypted: only TSK can decode it, and the
                    # "sparse" runs inside NTFS compression units are not holes.
                    return [Run(0, entry.size, COMPRESSED)]
                for run in attr:
                    start = int(run.offset) * bs
                    if start >= entry.size:
                        break
                    length = int(run.len) * bs
                    if int(run.flags) & _RUN_HOLE:
                        runs.append(Run(start, length, ZERO))
                        continue
                    if int(run.addr) + int(run.len) > self.block_count:
                        raise FileReadError(
                            f"{entry.path}: data at block {int(run.addr)} lies past the end of the "
                            f"filesystem ({self.block_count} blocks): the image is damaged or truncated")
                    runs.append(Run(start, length, DATA, int(run.addr) * bs if direct else None))
                break
            else:
                return [Run(0, entry.size, DATA)]   # no data attribute TSK maps: let it read
        except OSError as exc:
            raise FileReadError(f"{entry.path}: cannot map its blocks: {_tsk_reason(exc)}") from None
        return cover(runs, entry.size)

    def read_chunks(self, entry: Entry, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """Runs the volume holds as they are are read straight from it, in large
        reads, without TSK's block-by-block copy; the rest TSK reads."""
        chunk = max(chunk_size, READ_CHUNK)
        handle = None
        for run in self.file_runs(entry):
            done = 0
            while done < run.length:
                n = min(chunk if run.where is not None else chunk_size, run.length - done)
                if run.kind in HOLE_KINDS:
                    yield bytes(n)
                elif run.where is not None:
                    yield self._read_run(entry, run, done, n)
                else:
                    handle = handle or self._handle(entry)
                    yield self._tsk_read(entry, handle, run.offset + done, n)
                done += n

    def read_range(self, entry: Entry, offset: int, length: int) -> bytes:
        length = max(0, min(length, entry.size - offset))
        if not length:
            return b""
        out = bytearray(length)   # holes stay zero
        end = offset + length
        for run in self.file_runs(entry):
            lo, hi = max(offset, run.offset), min(end, run.offset + run.length)
            if lo >= hi or run.kind in HOLE_KINDS:
                continue
            if run.where is not None:
                out[lo - offset:hi - offset] = self._read_run(entry, run, lo - run.offset, hi - lo)
            else:
                out[lo - offset:hi - offset] = self._tsk_read(entry, self._handle(entry), lo, hi - lo)
        return bytes(out)

    def _tsk_read(self, entry: Entry, handle, offset: int, length: int) -> bytes:
        try:
            data = handle.read_random(offset, length)
        except OSError as exc:
            raise FileReadError(f"{entry.path}: unreadable at offset {offset}: {_tsk_reason(exc)}") from None
        if len(data) != length:
            raise FileReadError(f"{entry.path}: short read at offset {offset} ({len(data)} of {length} bytes)")
        return data

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
    if "encryption detected" in text.lower():
        # TSK's entropy guess reads as "your disk is encrypted" to a person; all
        # it knows is that no filesystem it reads starts here.
        return "unrecognised or unsupported filesystem content"
    return text.strip() or "unknown error"
