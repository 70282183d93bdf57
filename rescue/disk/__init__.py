"""Disk layer: virtual disk containers, detected by content.

`FORMATS` is the registry: modules with `detect(source)` and `open(source, options)`,
tried in order. Anything no reader claims is a raw disk.
"""

from __future__ import annotations

from importlib import import_module

from ..errors import DiskFormatError, classify
from ..source.base import ByteSource
from .base import DiskImage, DiskInfo, DiskOptions, RawDisk

# Module names under rescue.disk, tried in order; each reader registers here.
FORMATS: list[str] = ["qcow2", "vdi", "vmdk", "vhdx", "vhd"]  # vhd last: its magic is at the end
# Issue 3 follow-up: more containers, each detected by its magic only.
FORMATS += ["parallels", "bochs", "cloop", "dmg", "vma"]
# Last: formats recognised only to say they are not read (ASIF, QED, E01).
FORMATS += ["unsupported"]


def _readers():
    for name in FORMATS:
        yield import_module(f"{__name__}.{name}")


def open_disk(source: ByteSource, options: DiskOptions | None = None) -> DiskImage:
    """Open the virtual disk stored in `source` (raw if no container is recognised)."""
    options = options or DiskOptions()
    for reader in _readers():
        # The layer's boundary: a reader's parser choking on damaged bytes
        # (construct, struct, IndexError, plistlib, zlib...) is a DiskFormatError.
        kind = reader.__name__.rsplit(".", 1)[-1]
        with classify(DiskFormatError, f"{kind} image is damaged", file=source.name,
                      hint="the file may be truncated or corrupt; re-download it and compare its checksum"):
            if reader.detect(source):
                return reader.open(source, options)
    return RawDisk(source)


__all__ = ["DiskImage", "DiskInfo", "DiskOptions", "RawDisk", "FORMATS", "open_disk"]
