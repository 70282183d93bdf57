"""Backing chains: opening a parent image next to its child, with one loop
and length check for every format.

The images being opened are kept in a context variable, top first, so a
parent opened through any reader (its own format's, or `open_disk` for a
qcow2 whose parent is a VMDK) sees the whole chain above it.
"""

from __future__ import annotations

import contextvars
import dataclasses
from typing import Callable, TypeVar

from ..errors import DiskFormatError, RescueError, SourceError
from ..source.base import ByteSource, open_relative
from .base import DiskImage, DiskOptions, RawDisk

T = TypeVar("T")

# (identity, name) of each image being opened in the current chain, top first.
_OPENING: contextvars.ContextVar[tuple] = contextvars.ContextVar("rescue_disk_chain", default=())


def open_in_chain(source: ByteSource, options: DiskOptions, make: Callable[[], T]) -> T:
    """Run `make()` (which may open parents) refusing loops and chains longer
    than options.max_chain images."""
    identity = getattr(source, "identity", None) or source.name
    chain = _OPENING.get()
    if any(ident == identity for ident, _ in chain):
        names = " -> ".join([n for _, n in chain] + [source.name])
        raise DiskFormatError(f"backing chain loops: {names}", file=chain[0][1],
                              hint="one of the backing files names an image above it")
    if len(chain) >= options.max_chain:
        raise DiskFormatError(f"backing chain longer than {options.max_chain} images",
                              file=chain[0][1] if chain else source.name)
    token = _OPENING.set(chain + ((identity, source.name),))
    try:
        return make()
    finally:
        _OPENING.reset(token)


def open_sibling(source: ByteSource, name: str, what: str, hint: str | None = None) -> ByteSource:
    """open_relative with a disk-layer error that names the missing file."""
    try:
        return open_relative(source, name)
    except SourceError as e:
        raise DiskFormatError(f"{what} {name!r} cannot be opened ({e.problem})", file=source.name,
                              hint=hint) from None
    except (ValueError, OSError) as e:   # names from a damaged image: NUL bytes, too long ...
        raise DiskFormatError(f"{what} {name!r} cannot be opened ({e})", file=source.name,
                              hint=hint) from None


def open_parent(child: DiskImage, names: list[str], what: str, options: DiskOptions,
                detect: Callable[[ByteSource], bool],
                open_image: Callable[[ByteSource, DiskOptions], DiskImage]) -> DiskImage:
    """Open the first of `names` found next to `child`'s file (VHD, VHDX and
    VMDK locators give several guesses): with the child's reader (`detect`,
    `open_image`) when it is of the child's format, else as a raw disk (a
    flattened parent)."""
    hint = "put the parent next to this file or use --backing PATH"
    tried: RescueError | None = None
    for name in names:
        try:
            src = open_sibling(child.source, name, what, hint=hint)
        except RescueError as e:
            tried = e
            continue
        return open_as_parent(src, options, open_image if detect(src) else None)
    if len(names) == 1 and tried is not None:
        raise tried
    raise DiskFormatError(f"{what} not found (tried {', '.join(repr(n) for n in names)})",
                          file=child.name, hint=hint) from tried


def open_as_parent(src: ByteSource, options: DiskOptions,
                   open_image: Callable[[ByteSource, DiskOptions], DiskImage] | None = None) -> DiskImage:
    """`src` opened as a parent image with `open_image`, else as a raw disk;
    closed again if that fails. --backing and --internal-snapshot are the child's
    choices, so they are not passed up the chain."""
    if open_image is None:
        return RawDisk(src)
    try:
        return open_image(src, dataclasses.replace(options, backing=None, internal_snapshot=None))
    except BaseException:
        close_quietly(src)
        raise


def close_quietly(source: ByteSource | DiskImage | None) -> None:
    try:
        if source is not None:
            source.close()
    except (OSError, RescueError):
        pass
