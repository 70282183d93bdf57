"""What a reader does with --internal-snapshot/--backing when its format has neither
(Parallels images, Bochs, cloop, DMG)."""

from __future__ import annotations

from ..errors import DiskFormatError
from .base import DiskImage, DiskOptions


def no_choices(disk: DiskImage, options: DiskOptions, what: str) -> DiskImage:
    """Formats without snapshots or parents: --internal-snapshot is an error (the user
    expects something this image cannot give), --backing a warning."""
    if options.internal_snapshot is not None:   # the caller still owns (and closes) the source
        raise DiskFormatError(f"--internal-snapshot {options.internal_snapshot}: {what} images hold no "
                              "internal snapshots",
                              file=disk.name, hint="drop --internal-snapshot")
    if options.backing:
        disk.info.warnings.append(f"--backing {options.backing} ignored: a {what} image has no parent")
    return disk
