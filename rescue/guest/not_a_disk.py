"""Tell a file that is not a disk image (a text file, an HTML error page saved as
the download, a wrong file) from a blank disk, so `Snapshot.inspect()` refuses it
with one clear error instead of showing an empty table."""

from __future__ import annotations

from typing import Any

from ..errors import VolumeError

FORMATS_READ = "raw, qcow2, VMDK, VHD/VHDX, VDI, Parallels, DMG, VMA, and archives of them"


def refuse_non_disk(data: dict[str, Any]) -> None:
    """Raise VolumeError when `data` (what inspect found) shows no container format,
    no archive, no partition table, no boot sector and no filesystem."""
    if data.get("format") == "raw" and not data.get("partition_table") and not data.get("archive") \
            and not data.get("boot_sector") and not any(v.get("filesystem") for v in data.get("volumes", [])):
        raise VolumeError("not a disk image: no container format, partition table or filesystem found",
                          file=data.get("snapshot"),
                          hint=f"is the download complete? formats read: {FORMATS_READ}")
