"""Volume layer: partitions, LVM logical volumes, or the bare disk.

`discover(disk)` returns everything that may hold a filesystem, each volume
probed for its content (filesystem type, label, UUID).
"""

from __future__ import annotations

from ..errors import BAD_BYTES, describe, is_bad_bytes
from ..source.base import ByteSource, Window
from .base import Volume, VolumeMap
from .partitions import find_partitions
from .probe import probe


def _probe_into(volume: Volume) -> None:
    try:
        found = probe(volume.source)
    except BAD_BYTES as exc:   # DamagedRange, or a superblock parser choking on damaged bytes
        if not isinstance(exc, OSError) and not is_bad_bytes(exc):
            raise
        volume.details["probe_error"] = describe(exc)
        return
    volume.filesystem, volume.label, volume.uuid = found.type, found.label, found.uuid
    for key in ("used", "free"):
        if getattr(found, key) is not None:
            volume.details[key] = getattr(found, key)


def discover(disks: list[ByteSource] | ByteSource) -> VolumeMap:
    """Find the volumes of one snapshot (one or several disks of one server)."""
    if not isinstance(disks, list):
        disks = [disks]
    tables: list[str | None] = []
    volumes: list[Volume] = []
    warnings: list[str] = []
    for index, disk in enumerate(disks):
        prefix = f"d{index}." if len(disks) > 1 else ""
        # A bare filesystem is checked first: a FAT or NTFS boot sector also
        # looks like an MBR to TSK.
        try:
            bare_type = probe(disk).type
        except BAD_BYTES as exc:   # DamagedRange or damaged superblock bytes: still look for a table
            if not isinstance(exc, OSError) and not is_bad_bytes(exc):
                raise
            warnings.append(f"the start of disk {prefix or '0'} is damaged: {describe(exc)}")
            bare_type = None
        kind, parts = (None, []) if bare_type else find_partitions(disk)
        tables.append(kind)
        if not parts:
            whole = Volume(id=f"{prefix}whole", start=0, size=disk.size,
                           source=Window(disk, 0, disk.size, name=disk.name),
                           description="whole disk (no partition table)")
            volumes.append(whole)
        for part in parts:
            part.id = prefix + part.id
            if part.start + part.size > disk.size:
                warnings.append(f"partition {part.id} ends past the end of the disk "
                                f"({part.start + part.size} > {disk.size} bytes): the image may be truncated")
            volumes.append(part)
    for volume in volumes:
        _probe_into(volume)
    vgs: list[dict] = []
    pvs = [v for v in volumes if v.filesystem == "LVM2_member"]
    if pvs:
        try:
            from . import lvm
        except ImportError:
            lvm = None
        if lvm is not None:
            try:
                vgs, lvs = lvm.assemble([v.source for v in pvs])
            except Exception as exc:   # the rest of the disk is still worth reading
                warnings.append(f"LVM metadata unreadable: {exc}")
                lvs = []
            for lv in lvs:
                if not lv.details.get("unsupported"):
                    _probe_into(lv)
                volumes.append(lv)
    table = next((t for t in tables if t), None)
    return VolumeMap(partition_table=table, volumes=volumes, volume_groups=vgs, warnings=warnings)


__all__ = ["Volume", "VolumeMap", "discover"]
