"""Volumes: the byte ranges of a disk that may hold a filesystem.

A `Volume` is a partition, a logical volume, or the whole disk when there is no
partition table. Its `source` is a byte source (a `Window`, or an LV mapping)
that the filesystem layer reads like any other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..source.base import ByteSource


@dataclass
class Volume:
    id: str                       # "1", "2", "5" (logical), "vg0/root", "whole"
    start: int                    # byte offset on its disk (0 for LVs: see details)
    size: int
    source: ByteSource
    description: str = ""         # "Linux filesystem", "EFI System", "Linux LVM", ...
    type_id: str | None = None    # MBR type byte "0x83" or GPT type GUID
    part_uuid: str | None = None  # GPT partition GUID / MBR disk signature-based id
    part_label: str | None = None  # GPT partition name
    filesystem: str | None = None  # probed content: "ext4", "xfs", "LVM2_member", "swap", ...
    label: str | None = None
    uuid: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "source" and v not in (None, {}, "")}
        out["id"], out["start"], out["size"] = self.id, self.start, self.size
        out["filesystem"] = self.filesystem
        out["label"] = self.label
        out["uuid"] = self.uuid
        return out


@dataclass
class VolumeMap:
    """Everything the volume layer found on one snapshot."""

    partition_table: str | None   # "gpt", "mbr", None (bare filesystem)
    volumes: list[Volume]
    volume_groups: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def find(self, volume_id: str) -> Volume | None:
        for v in self.volumes:
            if v.id == volume_id:
                return v
        return None
