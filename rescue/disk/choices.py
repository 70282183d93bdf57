"""What a reader does with --snapshot/--backing when its format has neither
(Parallels images, Bochs, cloop, DMG)."""

from __future__ import annotations

from ..errors import DiskFormatError
from .base import DiskImage, DiskOptions


def no_choices(disk: DiskImage, options: DiskOptions, what: str) -> DiskImage:
    """Formats without snapshots or parents: --snapshot is an error (the user
    expects something this image cannot give), --backing a warning."""
    if options.snapshot is not None:   # the caller still owns (and closes) the source
        raise DiskFormatError(f"--snapshot {options.snapshot}: {what} images hold no snapshots",
                              file=disk.name, hint="drop --snapshot")
    if options.backing:
        disk.info.warnings.append(f"--backing {options.backing} ignored: a {what} image has no parent")
    return disk
