"""Filesystem layer: readers of the filesystems inside volumes, detected by content.

`FILESYSTEMS` is the registry, like `disk.FORMATS`: "module:Class" names under
rescue.fs, tried in order. Each class is a `FileSystem` (fs/base.py) with a
`detect(source)` classmethod and a `(source, name)` constructor. Native readers
come first; The Sleuth Kit last, as the fallback for everything else (FAT,
exFAT, NTFS, HFS+, ISO 9660). libguestfs is not in the list: it is the last
resort the guest layer chooses (one appliance for several volumes).
"""

from __future__ import annotations

from importlib import import_module
from typing import Iterator

from ..errors import FilesystemError, classify
from ..source.base import ByteSource
from .base import FileSystem

# Readers are imported only when a volume is opened (start-up stays small).
FILESYSTEMS: list[str] = [
    "ext:ExtFileSystem",
    "xfs:XfsFileSystem",
    "btrfs:BtrfsFileSystem",
    "tartree:TarTreeFileSystem",   # a tar of a server's files (vzdump-lxc, tar czf backup.tar.gz /)
    "tsk:TskFileSystem",   # fallback: claims anything its library may read
]
BACKENDS = ("auto", "tsk", "guestfs")   # --backend: the registry, TSK only, libguestfs only


def readers() -> Iterator[type[FileSystem]]:
    for spec in FILESYSTEMS:
        module, _, cls = spec.partition(":")
        yield getattr(import_module(f"{__name__}.{module}"), cls)


def open_filesystem(source: ByteSource, name: str | None = None, backend: str = "auto") -> FileSystem:
    """The filesystem in `source`, read by the first registered reader that
    recognises it and opens it; `backend="tsk"` asks The Sleuth Kit only.
    Raises FilesystemError (the first reader's reason) when none can."""
    first: FilesystemError | None = None
    for reader in readers():
        if backend not in ("auto", reader.backend):
            continue
        try:
            # The layer's boundary: a reader's parser choking on damaged
            # metadata is a FilesystemError naming the reader, never a traceback.
            with classify(FilesystemError, f"{reader.backend} metadata is damaged", file=name or source.name):
                if not reader.detect(source):
                    continue
                return reader(source, name=name)
        except FilesystemError as exc:
            first = first or exc
    if first is not None:
        raise first
    raise FilesystemError("no filesystem reader recognises this volume", file=name or source.name)


__all__ = ["FILESYSTEMS", "BACKENDS", "FileSystem", "open_filesystem", "readers"]
