"""Snapshot archives read in place: tar (plain or gzip/zstd/xz/bzip2), zip,
and bare compressed disks.

References: POSIX pax/ustar (IEEE 1003.1 `pax`), GNU tar manual "Sparse
Formats" (old GNU 'S' headers, PAX 0.0/0.1/1.0), PKWARE APPNOTE 6.3.10 (zip,
zip64). Tar headers are parsed by the stdlib `tarfile` (it reads every sparse
format GNU tar writes) and zip directories by `zipfile`; we only keep the
member table (name, where the data starts, sparse map) and serve reads
ourselves: a tar member is a window onto the (decompressed) archive, a sparse
member maps its data runs and reads holes as zeros, a zip member is a window
(stored) or a deflate stream read like gzip. Nothing is unpacked to disk.

The member table and the decompression seek index are cached (see cache.py),
so a second open of the same archive starts at once.
"""

from __future__ import annotations

import bisect
import posixpath
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Iterator

from construct import Const, Int16ul, Int32ul, Struct

from ..errors import BAD_BYTES, SourceError, classify, describe, is_bad_bytes
from ..units import human_size
from .base import ByteSource, Run, Window
from .cache import IndexCache, source_key
from .compressed import (CompressedSource, Progress, deflate_as_gzip, detect_codec,
                         open_compressed)
from .fileobj import SourceFile
from .summary import ArchiveSummary

if TYPE_CHECKING:   # tarfile and zipfile are imported when an archive is met: `rescue ls disk.raw` needs neither
    import tarfile

# APPNOTE 4.3.7: the local header precedes each member's data; its name and
# extra lengths may differ from the central directory's, so we read it.
ZipLocalHeader = Struct(
    "signature" / Const(b"PK\x03\x04"),
    "version" / Int16ul,
    "flags" / Int16ul,
    "method" / Int16ul,
    "mtime" / Int16ul,
    "mdate" / Int16ul,
    "crc32" / Int32ul,
    "compressed_size" / Int32ul,
    "uncompressed_size" / Int32ul,
    "name_length" / Int16ul,
    "extra_length" / Int16ul,
)
ZIP_LOCAL_HEADER_SIZE = 30
ZIP_STORED, ZIP_DEFLATED, ZIP_BZIP2 = 0, 8, 12

DISK_SUFFIXES = (".disk", ".raw", ".img", ".qcow2", ".vmdk", ".vhd", ".vhdx", ".vdi")
MAX_MEMBERS = 200_000  # a disk snapshot archive has a handful; a rootfs tarball is not a disk
# A tar of a server's files (vzdump-lxc, OpenVZ, `tar czf backup.tar.gz /`, an Incus
# export's rootfs/) is read as a filesystem of its own (fs/tartree.py), not searched for a disk.
ROOT_MARKERS = ("etc/passwd", "etc/os-release", "usr/lib/os-release")
ROOT_DIRS = frozenset({"etc", "usr", "var", "bin", "sbin", "lib", "lib64", "home", "root", "opt",
                       "srv", "boot", "dev", "run", "tmp", "mnt", "media", "proc", "sys"})
TABLE_VERSION = 2


@dataclass
class Member:
    name: str
    size: int                      # size of the file as extracted
    type: str                      # file, sparse, dir, symlink, hardlink, other
    offset: int = 0                # where the stored data starts in the (decompressed) archive
    stored: int = 0                # bytes stored (less than size for sparse members)
    sparse: list[list[int]] = field(default_factory=list)  # [offset, length] data runs
    method: int = ZIP_STORED       # zip compression method
    target: str = ""               # link target
    crc: int = 0                   # zip CRC-32 (to frame a deflate member as gzip)

    @property
    def is_file(self) -> bool:
        return self.type in ("file", "sparse")


@dataclass
class ArchiveInfo:
    """What `rescue inspect` shows about the outer file."""

    format: str                    # "tar", "zip" or "compressed" (a bare .gz/.zst/... of a disk)
    codec: str | None              # gzip, zstd, xz, bzip2 or None
    members: list[Member]


def _is_tar(source: ByteSource) -> bool:
    head = source.read(0, 512)
    if len(head) < 512 or head[257:262] != b"ustar":
        return False
    import tarfile
    try:
        tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


def _is_zip(source: ByteSource) -> bool:
    return source.read(0, 4) in (b"PK\x03\x04", b"PK\x05\x06")


def _tar_type(info: tarfile.TarInfo) -> str:
    if info.issparse():
        return "sparse"
    if info.isreg():
        return "file"
    if info.isdir():
        return "dir"
    if info.issym():
        return "symlink"
    if info.islnk():
        return "hardlink"
    return "other"


class _ProgressFile(SourceFile):
    """Reports how far the tar walk has got (it decodes a one-frame stream)."""

    def __init__(self, source: ByteSource, progress: Progress | None) -> None:
        super().__init__(source)
        self._progress = progress
        self._reported = 0

    def read(self, size: int = -1) -> bytes:
        data = super().read(size)
        if self._progress and self._pos - self._reported >= 64 << 20:
            self._reported = self._pos
            self._progress(self._pos, self.source.size)
        return data


def _sparse_map_ok(m: Member) -> bool:
    """Runs in order, not overlapping, inside the file: reads then never come up short."""
    end = 0
    for offset, length in m.sparse:
        if offset < end or length < 0:
            return False
        end = offset + length
    return end <= m.size


def root_tree_prefix(names) -> str | None:
    """Where a server's root lies in a tar of files ("" for ./etc/passwd, "rootfs/" for
    an Incus export), or None when the names do not look like a root tree."""
    best: str | None = None
    tops: set[str] = set()
    for raw in names:
        name = raw.lstrip("/")
        while name.startswith("./"):
            name = name[2:]
        name = name.rstrip("/")
        tops.add(name.split("/", 1)[0])
        for marker in ROOT_MARKERS:
            if name == marker or name.endswith("/" + marker):
                prefix = name[:len(name) - len(marker)]
                if prefix.count("/") <= 3 and (best is None or len(prefix) < len(best)):
                    best = prefix
    if best is None and len(tops & ROOT_DIRS) >= 4:
        best = ""
    return best


def _read_tar_table(source: ByteSource, progress: Progress | None = None, partial: bool = False,
                    notes: list[str] | None = None) -> list[Member]:
    import tarfile
    members = []
    try:
        tf = tarfile.open(fileobj=_ProgressFile(source, progress), mode="r:")
        while True:
            info = tf.next()
            if info is None:
                break
            tf.members.clear()  # tarfile keeps every TarInfo; we keep our own compact table
            if len(members) >= MAX_MEMBERS:
                if root_tree_prefix(m.name for m in members) is not None:
                    break   # a server's file tree: fs/tartree.py walks it, no disk to find here
                raise SourceError(f"tar holds more than {MAX_MEMBERS} members; this looks like a "
                                  f"file-level backup, not a disk snapshot", file=source.name,
                                  hint="unpack it with tar; rescue reads disk images")
            sparse = [[o, n] for o, n in (info.sparse or []) if n > 0]
            stored = sum(n for _, n in sparse) if info.issparse() else info.size
            members.append(Member(name=info.name, size=info.size, type=_tar_type(info),
                                  offset=info.offset_data, stored=stored if info.isreg() else 0,
                                  sparse=sparse, target=info.linkname or ""))
    except BAD_BYTES as exc:
        if not is_bad_bytes(exc) and not isinstance(exc, OSError):   # DamagedRange: the stream is damaged there
            raise
        if root_tree_prefix(m.name for m in members) is not None:
            return members   # a server's file tree: fs/tartree.py rescues the files before the damage
        if not (partial and members):
            raise SourceError(f"tar archive is damaged after {len(members)} members: {describe(exc)}",
                              file=source.name, hint="re-download the snapshot and compare its checksum",
                              ) from None
        if notes is not None:   # --partial: the members before the cut, the last one clamped below
            notes.append(f"tar archive ends early after {len(members)} members ({describe(exc)})")
    for m in members:
        if m.size < 0 or m.offset < 0:   # base-256 header fields may be negative
            raise SourceError(f"tar member {m.name!r} claims a negative size or offset ({m.size}, {m.offset})",
                              file=source.name, hint="the archive is damaged")
    return _clamp_members(source, members, partial, notes)


def _clamp_members(source: ByteSource, members: list[Member], partial: bool,
                   notes: list[str] | None) -> list[Member]:
    """Check each member lies within the archive; with --partial, a plain file
    cut by the end of the archive is kept as far as it goes."""
    for m in members:
        if m.type == "sparse" and not _sparse_map_ok(m):
            raise SourceError(f"tar member {m.name!r} has an inconsistent sparse map "
                              f"({len(m.sparse)} runs for a {m.size}-byte file)",
                              file=source.name, hint="the archive is damaged")
        if not m.is_file or m.offset + m.stored <= source.size:
            continue
        if partial and m.type == "file" and m.offset < source.size:
            # the member as far as the archive goes (a raw disk then says what it lacks)
            have = source.size - m.offset
            if notes is not None:
                notes.append(f"tar member {m.name!r} is cut short: {have} of its {m.size} bytes are in the "
                             f"archive (--partial: reading those)")
            m.size = m.stored = have
            continue
        raise SourceError(f"tar archive is truncated: member {m.name!r} needs bytes up to "
                          f"{m.offset + m.stored}, the archive ends at {source.size}",
                          file=source.name, hint="download it again (`rescue download` resumes), or add "
                                                 "--partial to rescue what lies before the cut")
    return members


def _read_zip_table(source: ByteSource) -> list[Member]:
    import zipfile
    members = []
    try:
        with zipfile.ZipFile(SourceFile(source)) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_MEMBERS:
                raise SourceError(f"zip holds {len(infos)} members; this is not a disk snapshot",
                                  file=source.name)
            for number, info in enumerate(infos, 1):
                if not info.filename:
                    raise SourceError(f"zip member {number} has an empty name", file=source.name,
                                      hint="the zip is damaged; unpack what is readable with unzip or 7z")
                kind = "dir" if info.is_dir() else "file"
                offset = 0
                if kind == "file":
                    if info.flag_bits & 0x1:
                        raise SourceError(f"zip member {info.filename!r} is encrypted",
                                          file=source.name, hint="unpack it with the password first")
                    if info.header_offset < 0 or info.compress_size < 0:   # a central directory offset
                        raise SourceError(f"zip member {info.filename!r} lies before the start of the "  # too large
                                          f"file (local header at {info.header_offset})", file=source.name,
                                          hint="the zip is damaged or truncated at its start")
                    raw = source.read(info.header_offset, ZIP_LOCAL_HEADER_SIZE)
                    try:
                        head = ZipLocalHeader.parse(raw)
                    except Exception:
                        raise SourceError(f"zip member {info.filename!r}: no local header at byte "
                                          f"{info.header_offset}", file=source.name) from None
                    offset = (info.header_offset + ZIP_LOCAL_HEADER_SIZE + head.name_length
                              + head.extra_length)
                    if offset + info.compress_size > source.size:
                        raise SourceError(f"zip archive is truncated: member {info.filename!r} "
                                          f"needs bytes up to {offset + info.compress_size}",
                                          file=source.name)
                members.append(Member(name=info.filename, size=info.file_size, type=kind,
                                      offset=offset, stored=info.compress_size,
                                      method=info.compress_type, crc=info.CRC))
    except BAD_BYTES as exc:
        if not is_bad_bytes(exc):
            raise
        raise SourceError(f"zip archive is damaged: {describe(exc)}", file=source.name,
                          hint="re-download the snapshot and compare its checksum") from None
    return members






def _describe(members: list[Member]) -> str:
    shown = ", ".join(f"{m.name} ({human_size(m.size)})" for m in members[:10])
    return shown + (f", ... ({len(members) - 10} more)" if len(members) > 10 else "")


class Archive:
    """An opened archive: the outer file, its decompressed view, the member table."""

    def __init__(self, source: ByteSource, *, progress: Progress | None = None, partial: bool = False) -> None:
        self.source = source
        self.partial = partial   # --partial: an archive cut short gives what lies before the cut
        self.notes: list[str] = []
        self.cache = IndexCache(source)
        self.codec = detect_codec(source)
        self.inner: ByteSource = source
        self.format = "none"
        self.members: list[Member] = []
        self.tree_prefix: str | None = None   # set when the tar is a server's file tree
        if self.codec:
            self.inner = open_compressed(source, self.codec, cache=self.cache, progress=progress, partial=partial)
            self.notes += getattr(self.inner, "notes", [])
        self._detect_container(progress)

    def _detect_container(self, progress: Progress | None) -> None:
        cached = self.cache.load_json("members.json")
        if cached and cached.get("version") == TABLE_VERSION:
            self.format = cached["format"]
            self.members = [Member(**m) for m in cached["members"]]
            self._find_tree()
            return
        if _is_tar(self.inner):
            self.format, self.members = "tar", _read_tar_table(self.inner, progress, self.partial, self.notes)
        elif self.codec is None and _is_zip(self.source):
            self.format, self.members = "zip", _read_zip_table(self.source)
        elif self.codec:
            self.format = "compressed"
        else:
            return  # not an archive: nothing worth caching
        if getattr(self.inner, "truncated", None) or any("--partial" in n for n in self.notes):
            self._find_tree()
            return   # a table of a cut archive is never cached: a plain open must refuse it again
        self.cache.store_json("members.json", {"version": TABLE_VERSION, "format": self.format,
                                               "members": [asdict(m) for m in self.members]})
        self._find_tree()

    def _find_tree(self) -> None:
        if self.format == "tar":
            self.tree_prefix = root_tree_prefix(m.name for m in self.members)

    @property
    def is_archive(self) -> bool:
        return self.format in ("tar", "zip")

    def info(self) -> ArchiveInfo:
        return ArchiveInfo(self.format, self.codec, list(self.members))

    def find(self, name: str) -> Member | None:
        want = name.lstrip("/")
        want = want[2:] if want.startswith("./") else want
        for m in reversed(self.members):  # tar: a name appended later replaces the earlier one
            have = m.name[2:] if m.name.startswith("./") else m.name
            if have == want or have.rstrip("/") == want.rstrip("/"):
                return m
        return None

    def choose(self, member: str | None) -> Member:
        """The member to read: the one named, else the single disk-looking file."""
        files = [m for m in self.members if m.is_file]
        if member is not None:
            found = self.find(member)
            if found is None:
                raise SourceError(f"no member {member!r} in the archive; it holds: "
                                  f"{_describe(files) or 'no files'}", file=self.source.name,
                                  hint="see the member list with: rescue inspect SNAPSHOT")
            if found.type == "hardlink" and self.find(found.target):
                found = self.find(found.target)
            if not found.is_file:
                raise SourceError(f"member {member!r} is a {found.type}, not a file",
                                  file=self.source.name)
            return found
        if not files:
            raise SourceError("the archive holds no files", file=self.source.name)
        candidates = [m for m in files if m.name.lower().endswith(DISK_SUFFIXES)]
        candidates = self._drop_extents(candidates)
        if len(candidates) == 1:
            return candidates[0]
        if not candidates:
            ranked = sorted(files, key=lambda m: m.size, reverse=True)
            # The largest file is the disk when it clearly dominates (a manifest
            # or checksum file beside one image); two similar ones are ambiguous.
            if len(ranked) == 1 or ranked[0].size > 4 * ranked[1].size:
                return ranked[0]
            candidates = ranked
        raise SourceError(f"the archive holds several files that could be the disk: "
                          f"{_describe(candidates)}", file=self.source.name,
                          hint=f"pick one with --member NAME, e.g. --member {candidates[0].name}")

    def _drop_extents(self, candidates: list[Member]) -> list[Member]:
        """A VMDK descriptor names its extents: offer the descriptor, not its parts."""
        referenced: set[str] = set()
        for m in candidates:
            if m.size <= 64 * 1024 and m.name.lower().endswith(".vmdk"):
                text = self.open_member(m).read(0, m.size)
                if text.startswith(b"# Disk DescriptorFile"):
                    base = posixpath.dirname(m.name)
                    for line in text.decode("latin-1").splitlines():
                        parts = line.split('"')
                        if len(parts) >= 3 and line.split()[0] in ("RW", "RDONLY", "NOACCESS"):
                            referenced.add(posixpath.normpath(posixpath.join(base, parts[1])))
        return [m for m in candidates if posixpath.normpath(m.name) not in referenced]

    def open_member(self, m: Member, *, primary: bool = False) -> ByteSource:
        name = f"{self.source.name}::{m.name}"
        if self.format == "zip" and m.method != ZIP_STORED:
            raw: ByteSource = Window(self.source, m.offset, m.stored, name=name)
            if m.method == ZIP_DEFLATED:
                raw, codec = deflate_as_gzip(raw, m.crc, m.size), "gzip"
            elif m.method == ZIP_BZIP2:
                codec = "bzip2"
            else:
                raise SourceError(f"zip member {m.name!r} uses compression method {m.method}, "
                                  f"which rescue does not read (only stored, deflate, bzip2)",
                                  file=self.source.name, hint="unpack it with unzip or 7z")
            index = self.members.index(m)
            stream = open_compressed(raw, codec, cache=self.cache, name=name,
                                     cache_name=f"zip-{index}", size_hint=m.size)
            return MemberSource(self, m, stream, name, primary=primary, owns_data=True)
        data = self.source if self.format == "zip" else self.inner
        if m.type == "sparse":
            return SparseMemberSource(self, m, data, name, primary=primary)
        return MemberSource(self, m, Window(data, m.offset, m.size), name, primary=primary)

    def close(self) -> None:
        if self.inner is not self.source:
            self.inner.close()
        self.source.close()


class MemberSource:
    """One archive member as a byte source; siblings open through open_relative."""

    def __init__(self, archive: Archive, member: Member, data: ByteSource, name: str, *,
                 primary: bool = False, owns_data: bool = False) -> None:
        self.archive = archive
        self.member = member
        self.name = name
        self.size = member.size
        self._data = data
        self._primary = primary
        self._owns_data = owns_data
        self.notes = list(archive.notes)   # the decompressor's and the member table's
        outer = source_key(archive.source)
        # Lets an archive inside this member (a .gz in a .tar) cache its index too.
        self.identity = ("member", outer, member.name, member.offset, member.size) if outer else None

    def read(self, offset: int, length: int) -> bytes:
        if offset >= self.size or length <= 0:
            return b""
        return self._data.read(offset, min(length, self.size - offset))

    def runs(self, offset: int, length: int) -> Iterator[Run]:
        yield Run(offset, min(length, self.size - offset), "data")

    def archive_info(self) -> ArchiveSummary:
        members = self.archive.members
        shown = [{"name": m.name, "size": m.size, "type": m.type} for m in members[:100]]
        info = ArchiveSummary(format=self.archive.format, compression=self.archive.codec,
                              member=self.member.name, members=shown)
        if len(members) > 100:
            info["members_total"] = len(members)
        if self.notes:
            info["notes"] = list(self.notes)
        outer = getattr(self.archive.source, "archive_info", None)
        if outer is not None:
            info["inside"] = outer()
        return info

    def open_relative(self, name: str) -> ByteSource:
        """A file named relative to this member: first inside the archive, then
        beside the archive file (an extent shipped next to the .tar)."""
        if not name.startswith("/"):
            path = posixpath.normpath(posixpath.join(posixpath.dirname(self.member.name), name))
            found = self.archive.find(path)
            if found is not None and found.is_file:
                return self.archive.open_member(found)
        from .base import open_relative
        return open_relative(self.archive.source, name)

    def close(self) -> None:
        if self._owns_data:
            self._data.close()
        if self._primary:
            self.archive.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class SparseMemberSource(MemberSource):
    """A GNU sparse tar member: data runs stored back to back, holes read as zeros."""

    def __init__(self, archive: Archive, member: Member, data: ByteSource, name: str, *,
                 primary: bool = False) -> None:
        super().__init__(archive, member, data, name, primary=primary)
        self._starts = [o for o, _ in member.sparse]
        self._stored_at = []  # where each run's bytes start in the archive
        pos = member.offset
        for _, n in member.sparse:
            self._stored_at.append(pos)
            pos += n

    def runs(self, offset: int, length: int) -> Iterator[Run]:
        end = min(offset + length, self.size)
        pos = offset
        i = max(0, bisect.bisect_right(self._starts, pos) - 1)
        while pos < end:  # one step per stored run or hole, never per block
            if i < len(self._starts):
                start, n = self.member.sparse[i]
            else:
                start, n = end, 0
            if pos < start:
                stop = min(start, end)
                yield Run(pos, stop - pos, "zero")
                pos = stop
            elif pos < start + n:
                stop = min(start + n, end)
                yield Run(pos, stop - pos, "data")
                pos = stop
            else:
                i += 1

    def read(self, offset: int, length: int) -> bytes:
        if offset >= self.size or length <= 0:
            return b""
        parts = []
        for run in self.runs(offset, length):
            if run.kind == "zero":
                parts.append(bytes(run.length))
            else:
                i = bisect.bisect_right(self._starts, run.offset) - 1
                at = self._stored_at[i] + run.offset - self._starts[i]
                parts.append(self._data.read(at, run.length))
        return b"".join(parts)


class TarTreeSource:
    """A tar of a server's files, as the byte source of its own filesystem: the
    (decompressed) tar stream, read by fs/tartree.py through its member headers."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self.inner = archive.inner
        self.tar_tree_prefix = archive.tree_prefix
        self.name = archive.source.name
        self.size = archive.inner.size
        self.notes = list(archive.notes)   # the decompressor's and the member table's
        outer = source_key(archive.source)
        self.identity = ("tar-tree", outer) if outer else None

    def read(self, offset: int, length: int) -> bytes:
        return self.inner.read(offset, length)

    def archive_info(self) -> ArchiveSummary:
        info = ArchiveSummary(format=self.archive.format, compression=self.archive.codec,
                              tree=self.tar_tree_prefix or "./")
        if self.notes:
            info["notes"] = list(self.notes)
        outer = getattr(self.archive.source, "archive_info", None)
        if outer is not None:
            info["inside"] = outer()
        return info

    def close(self) -> None:
        self.archive.close()

    def __repr__(self) -> str:
        return f"TarTreeSource({self.name!r})"


def open_archive(source: ByteSource, *, member: str | None = None,
                 progress: Progress | None = None, partial: bool = False) -> ByteSource | None:
    """The disk inside `source` when it is an archive or compressed, else None.

    `member` picks a file by name; otherwise the single disk-looking file is
    chosen (SourceError listing the candidates when that is ambiguous)."""
    if getattr(source, "tar_tree_prefix", None) is not None:
        return None   # a server's file tree: the filesystem layer reads it (fs/tartree.py)
    if detect_codec(source) is None and not _is_tar(source) and not _is_zip(source):
        return None
    archive = Archive(source, progress=progress, partial=partial)
    try:
        if archive.format == "compressed":
            if member is not None:
                raise SourceError(f"--member {member!r} given, but this is a single compressed "
                                  f"{archive.codec} stream, not an archive", file=source.name)
            inner = archive.inner
            assert isinstance(inner, CompressedSource)
            inner.owns_source = True
            return inner
        if not archive.is_archive:
            return None
        if archive.tree_prefix is not None and member is None:
            return TarTreeSource(archive)
        return archive.open_member(archive.choose(member), primary=True)
    except BaseException:
        if archive.inner is not source:
            archive.inner.close()
        raise


def describe_archive(source: ByteSource, *, progress: Progress | None = None) -> ArchiveInfo | None:
    """Format, compression and members of `source` (None when it is not an archive)."""
    if detect_codec(source) is None and not _is_tar(source) and not _is_zip(source):
        return None
    with classify(SourceError, "damaged or truncated archive or compressed stream", file=source.name,
                  hint="re-download the snapshot and compare its checksum"):
        archive = Archive(source, progress=progress)
    try:
        return archive.info()
    finally:
        if archive.inner is not source:
            archive.inner.close()


def list_members(source: ByteSource) -> list[Member]:
    """The members of an archive (name, size, type): empty when it is not one."""
    info = describe_archive(source)
    return info.members if info else []
