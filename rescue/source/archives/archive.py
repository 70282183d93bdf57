"""An opened archive (its decompressed view and member table) and its members
as byte sources: a tar member is a window onto the (decompressed) archive, a
sparse member maps its data runs and reads holes as zeros, a zip member is a
window (stored) or a compressed stream. Nothing is unpacked to disk.

The member table and the decompression seek index are cached (see cache.py),
so a second open of the same archive starts at once.
"""

from __future__ import annotations

import bisect
import posixpath
from dataclasses import asdict
from types import ModuleType
from typing import Iterator

from ...errors import SourceError
from ...units import human_size
from ..base import ByteSource, Run, Window, open_relative
from ..cache import IndexCache, source_key
from ..codecs import Progress, detect_codec, open_compressed
from ..summary import ArchiveSummary, with_outer
from .base import ArchiveInfo, Member

DISK_SUFFIXES = (".disk", ".raw", ".img", ".qcow2", ".vmdk", ".vhd", ".vhdx", ".vdi")
TABLE_VERSION = 2


def _describe(members: list[Member]) -> str:
    shown = ", ".join(f"{m.name} ({human_size(m.size)})" for m in members[:10])
    return shown + (f", ... ({len(members) - 10} more)" if len(members) > 10 else "")


class Archive:
    """An opened archive: the outer file, its decompressed view, the member table."""

    def __init__(self, source: ByteSource, formats: list[ModuleType], *, progress: Progress | None = None,
                 partial: bool = False) -> None:
        self.source = source
        self.formats = formats   # the archive readers (archives.FORMATS), tried in order
        self.reader: ModuleType | None = None   # the one that read the member table
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
            self.reader = next((f for f in self.formats if f.NAME == self.format), None)
            self.members = [Member(**m) for m in cached["members"]]
            self._find_tree()
            return
        # A tar may sit inside the compressed stream; a zip only as the file itself.
        self.reader = next((f for f in self.formats
                            if (self.codec is None or f.IN_STREAM) and f.detect(self.inner)), None)
        if self.reader is not None:
            self.format = self.reader.NAME
            self.members = self.reader.open(self.inner, progress=progress, partial=self.partial, notes=self.notes)
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
        find = getattr(self.reader, "root_tree_prefix", None)   # tar: a server's files
        if find is not None:
            self.tree_prefix = find(m.name for m in self.members)

    @property
    def is_archive(self) -> bool:
        return self.reader is not None

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
        open_stream = getattr(self.reader, "open_member", None)   # zip: a compressed member
        stream = open_stream(self.inner, m, cache=self.cache, name=name,
                             index=self.members.index(m)) if open_stream else None
        if stream is not None:
            return MemberSource(self, m, stream, name, primary=primary, owns_data=True)
        if m.type == "sparse":
            return SparseMemberSource(self, m, self.inner, name, primary=primary)
        return MemberSource(self, m, Window(self.inner, m.offset, m.size), name, primary=primary)

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
        return with_outer(info, self.notes, self.archive.source)

    def open_relative(self, name: str) -> ByteSource:
        """A file named relative to this member: first inside the archive, then
        beside the archive file (an extent shipped next to the .tar)."""
        if not name.startswith("/"):
            path = posixpath.normpath(posixpath.join(posixpath.dirname(self.member.name), name))
            found = self.archive.find(path)
            if found is not None and found.is_file:
                return self.archive.open_member(found)
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
        # --partial: the stream was cut (what is missing); the tree reader reports the files after it lost
        self.truncated: str | None = getattr(archive.inner, "truncated", None)
        outer = source_key(archive.source)
        self.identity = ("tar-tree", outer) if outer else None

    def read(self, offset: int, length: int) -> bytes:
        return self.inner.read(offset, length)

    def archive_info(self) -> ArchiveSummary:
        info = ArchiveSummary(format=self.archive.format, compression=self.archive.codec,
                              tree=self.tar_tree_prefix or "./")
        return with_outer(info, self.notes, self.archive.source)

    def close(self) -> None:
        self.archive.close()

    def __repr__(self) -> str:
        return f"TarTreeSource({self.name!r})"
