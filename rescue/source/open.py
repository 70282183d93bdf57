"""Turn what the user typed (a path or a URL) into a byte source, and unwrap
an archive or compressed stream into the disk inside it."""

from __future__ import annotations

import os
from typing import Callable

from ..errors import SourceError, classify
from .archives import open_archive
from .base import ByteSource, FileSource
from .block import BlockDeviceSource, is_block_device
from .bundle import bundle_descriptor, open_bundle
from .split import open_split


def _is_url(spec: str | os.PathLike) -> bool:
    return isinstance(spec, str) and spec[:8].lower().startswith(("http://", "https://"))


def _open_url(spec: str) -> ByteSource:
    from .http import HttpSource  # urllib3 is imported only for URLs
    return HttpSource(spec)


def _is_ssh(spec: str | os.PathLike) -> bool:
    return isinstance(spec, str) and spec[:6].lower() == "ssh://"


def _open_ssh(spec: str) -> ByteSource:
    from .ssh import SshSource  # the ssh client runs only for ssh:// addresses
    return SshSource(spec)


# Where the bytes live, tried in order: (claims(spec), open(spec)).
LOCATIONS: list[tuple[Callable, Callable]] = [
    (_is_url, _open_url),
    (_is_ssh, _open_ssh),               # ssh://[user@]host[:port]/dev/vda: read in place over SSH
    (is_block_device, BlockDeviceSource),   # /dev/vdb, \\.\PhysicalDrive1: size from the device
    (bundle_descriptor, open_bundle),   # a Parallels .hdd folder or its empty stub
    (lambda spec: True, FileSource),
]

# What the bytes are, tried in order: each returns the source inside, or None
# (archives/: tar and zip members, and the codecs/ for a bare .gz/.zst/.xz/.bz2).
UNWRAPPERS: list[Callable] = [open_split, open_archive]   # a split set may hold a .tar.gz
MAX_NESTING = 3   # layers peeled at most (a .qcow2.gz inside a .tar inside a split set)


def open_source(spec: str | os.PathLike, *, member: str | None = None,
                progress: Callable[[int, int], None] | None = None, partial: bool = False) -> ByteSource:
    """Open SNAPSHOT as typed on the command line.

    `member` picks a file inside an archive when there are several; `progress`
    is called with (bytes_done, total) while a first open builds a seek index.
    Closing the returned source closes everything under it.
    """
    opener = next(open_ for claims, open_ in LOCATIONS if claims(spec))
    with classify(SourceError, "cannot be opened", file=str(spec)):
        source = opener(spec)
    # Peel layers (a split set, a .qcow2.gz inside a .tar): `member` goes to
    # the first archive met; archives inside it must hold a single disk.
    for _ in range(MAX_NESTING):
        inner = _unwrap(source, member, progress, partial)
        if inner is None:
            break
        source = inner
        if getattr(inner, "member", None) is not None:  # an archive member: --member used
            member = None
    if member is not None:
        source.close()
        raise SourceError(f"--member {member!r} given, but this is not an archive",
                          file=source.name, hint="drop --member")
    return source


def _unwrap(source: ByteSource, member: str | None, progress, partial: bool = False) -> ByteSource | None:
    """The source inside `source` (closing it on failure), or None if it is a disk."""
    try:
        # The layer's boundary: tarfile, zipfile, python-xz, zstandard... raise
        # their own exceptions on damaged bytes; they become one SourceError.
        with classify(SourceError, "damaged or truncated archive or compressed stream", file=source.name,
                      hint="re-download the snapshot and compare its checksum"):
            for unwrap in UNWRAPPERS:
                inner = unwrap(source, member=member, progress=progress, partial=partial)
                if inner is not None:
                    return inner
    except BaseException:
        source.close()
        raise
    return None
