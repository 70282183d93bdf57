"""tar (POSIX pax/ustar, IEEE 1003.1 `pax`; GNU tar manual "Sparse Formats":
old GNU 'S' headers, PAX 0.0/0.1/1.0), plain or inside a compressed stream.

Headers are parsed by the stdlib `tarfile` (it reads every sparse format GNU
tar writes); we keep only the member table. A tar of a server's files
(vzdump-lxc, OpenVZ, `tar czf backup.tar.gz /`, an Incus export's rootfs/) is
read as a filesystem of its own (fs/tartree.py), not searched for a disk.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...errors import BAD_BYTES, SourceError, describe, is_bad_bytes
from ..base import ByteSource
from ..codecs import Progress
from ..fileobj import SourceFile
from .base import MAX_MEMBERS, Member

if TYPE_CHECKING:   # tarfile is imported when an archive is met: `rescue ls disk.raw` does not need it
    import tarfile

NAME = "tar"
IN_STREAM = True   # found inside a compressed stream (.tar.gz, .tar.zst...)

ROOT_MARKERS = ("etc/passwd", "etc/os-release", "usr/lib/os-release")
ROOT_DIRS = frozenset({"etc", "usr", "var", "bin", "sbin", "lib", "lib64", "home", "root", "opt",
                       "srv", "boot", "dev", "run", "tmp", "mnt", "media", "proc", "sys"})


def detect(source: ByteSource) -> bool:
    head = source.read(0, 512)
    if len(head) < 512 or head[257:262] != b"ustar":
        return False
    import tarfile
    try:
        tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


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


def open(source: ByteSource, *, progress: Progress | None = None, partial: bool = False,   # noqa: A001
         notes: list[str] | None = None) -> list[Member]:
    """The member table; `partial`: an archive cut short gives the members before the cut
    (each step noted in `notes`)."""
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
        # tarfile's word for "the last member's data runs past the end": a cut archive,
        # refused below (by _clamp_members) with the member and the bytes it lacks
        cut = members and str(exc) == "unexpected end of data"
        if not (partial and members) and not cut:
            raise SourceError(f"tar archive is damaged after {len(members)} members: {describe(exc)}",
                              file=source.name, hint="re-download the snapshot and compare its checksum",
                              ) from None
        if partial and notes is not None:   # --partial: the members before the cut, the last one clamped below
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
