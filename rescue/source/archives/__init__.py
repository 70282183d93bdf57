"""Snapshot archives read in place: tar (plain or gzip/zstd/xz/bzip2), zip,
and bare compressed disks.

`FORMATS` is the registry: modules with `NAME`, `IN_STREAM` (may sit inside a
compressed stream), `detect(source)` and `open(source, ...)` returning the
member table; a format whose members need more than a window onto the archive
adds `open_member` (zip). `open_archive` is the source layer's unwrapper.
"""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

from ...errors import SourceError, classify
from ..base import ByteSource
from ..codecs import CompressedSource, Progress, detect_codec
from .archive import Archive, TarTreeSource
from .base import ArchiveInfo, Member

# Module names under rescue.source.archives, tried in order; each format registers here.
FORMATS: list[str] = ["tar", "zip"]


def _formats() -> list[ModuleType]:
    return [import_module(f"{__name__}.{name}") for name in FORMATS]


def _claims(source: ByteSource) -> bool:
    """Compressed, or an archive format's magic at the start."""
    return detect_codec(source) is not None or any(f.detect(source) for f in _formats())


def open_archive(source: ByteSource, *, member: str | None = None,
                 progress: Progress | None = None, partial: bool = False) -> ByteSource | None:
    """The disk inside `source` when it is an archive or compressed, else None.

    `member` picks a file by name; otherwise the single disk-looking file is
    chosen (SourceError listing the candidates when that is ambiguous)."""
    if getattr(source, "tar_tree_prefix", None) is not None:
        return None   # a server's file tree: the filesystem layer reads it (fs/tartree.py)
    if not _claims(source):
        return None
    archive = Archive(source, _formats(), progress=progress, partial=partial)
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
    if not _claims(source):
        return None
    with classify(SourceError, "damaged or truncated archive or compressed stream", file=source.name,
                  hint="re-download the snapshot and compare its checksum"):
        archive = Archive(source, _formats(), progress=progress)
    try:
        return archive.info()
    finally:
        if archive.inner is not source:
            archive.inner.close()


def list_members(source: ByteSource) -> list[Member]:
    """The members of an archive (name, size, type): empty when it is not one."""
    info = describe_archive(source)
    return info.members if info else []


__all__ = ["FORMATS", "ArchiveInfo", "Member", "describe_archive", "list_members", "open_archive"]
