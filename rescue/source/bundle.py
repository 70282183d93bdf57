"""Parallels Desktop `.hdd` bundles given as a folder or as the empty stub.

A bundle is a folder (`disk.hdd/`) holding DiskDescriptor.xml, a 0-byte stub
named like the folder and the `.hds` storages. A user may type the folder, the
stub or the descriptor; the first two have no content to detect, so this
location opens the descriptor instead and the disk layer (rescue.disk.parallels)
reads it.
"""

from __future__ import annotations

import os

from .base import FileSource

DESCRIPTOR = "DiskDescriptor.xml"


def bundle_descriptor(spec: str | os.PathLike) -> str | None:
    """The DiskDescriptor.xml that `spec` stands for, or None."""
    if not isinstance(spec, (str, os.PathLike)):
        return None
    path = os.fspath(spec)
    if isinstance(path, bytes):
        return None
    try:
        if os.path.isdir(path):
            cand = os.path.join(path, DESCRIPTOR)
            return cand if os.path.isfile(cand) else None
        # The stub: an empty file inside the bundle, next to the descriptor.
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            cand = os.path.join(os.path.dirname(os.path.abspath(path)), DESCRIPTOR)
            return cand if os.path.isfile(cand) else None
    except (OSError, ValueError):
        return None
    return None


def open_bundle(spec: str | os.PathLike) -> FileSource:
    path = bundle_descriptor(spec)
    assert path is not None
    return FileSource(path)
