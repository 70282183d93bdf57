"""The guest's /etc/fstab: which volume is mounted where.

Reference: fstab(5) (fields, octal escapes like \\040), the udev names under
/dev/disk/by-* (`\\x2f` escapes), and LVM's /dev/mapper naming (a '-' inside a
VG or LV name is doubled: VG "my-vg", LV "root" -> /dev/mapper/my--vg-root).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..volume.base import Volume

# Filesystem types that never live on a volume of the snapshot.
_VIRTUAL = {"proc", "sysfs", "devpts", "tmpfs", "devtmpfs", "cgroup", "cgroup2", "securityfs",
            "debugfs", "mqueue", "hugetlbfs", "efivarfs", "pstore", "configfs", "fusectl",
            "binfmt_misc", "ramfs", "autofs", "tracefs", "bpf", "rpc_pipefs", "nfsd", "overlay"}
_NETWORK = {"nfs", "nfs4", "cifs", "smbfs", "smb3", "sshfs", "fuse.sshfs", "glusterfs", "ceph",
            "9p", "davfs", "fuse.s3fs", "fuse.rclone", "virtiofs", "afs", "lustre"}
_DEV_DIRS = {"disk", "mapper", "md", "block", "char", "loop", "bus", "input", "snd", "net", "pts",
             "shm", "dri", "cpu", "hugepages", "mqueue", "fd", "vfio"}

# /dev/sda1, /dev/vdb, /dev/xvda2, /dev/hda1 ; /dev/nvme0n1p2, /dev/mmcblk0p1
_SCSI = re.compile(r"^/dev/(?:sd|vd|xvd|hd)([a-z]+)(\d*)$")
_NVME = re.compile(r"^/dev/(?:nvme(\d+)n\d+|mmcblk(\d+))(?:p(\d+))?$")


@dataclass
class Spec:
    """A parsed fstab source: how to find the volume."""

    kind: str          # "uuid", "label", "partuuid", "partlabel", "lv", "lv_uuid", "device", "mapper", "path", "other"
    value: str         # uuid/label text, "vg/lv", device path
    disk: int = 0      # "device": 0 for sda/vda/nvme0n1, 1 for sdb ...
    partition: int | None = None  # "device": the partition number, None = whole disk


@dataclass
class FstabEntry:
    spec: str                      # the first field verbatim (unescaped)
    mountpoint: str
    fstype: str
    options: list[str] = field(default_factory=list)
    dump: int = 0
    passno: int = 0
    skipped: str | None = None     # why rescue does not mount it ("swap", "noauto", ...)
    source: Spec | None = None
    line: int = 0

    def to_json(self) -> dict:
        out = {"spec": self.spec, "mountpoint": self.mountpoint, "fstype": self.fstype,
               "options": self.options, "line": self.line}
        if self.skipped:
            out["skipped"] = self.skipped
        return out


def _unescape(field_text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_text)


def _udev_unescape(name: str) -> str:
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), name)


def _split_mapper(name: str) -> tuple[str, str] | None:
    """'my--vg-root' -> ('my-vg', 'root'); None if there is no single '-'."""
    i = 0
    while i < len(name):
        if name[i] == "-":
            if name[i + 1:i + 2] == "-":
                i += 2
                continue
            vg, lv = name[:i], name[i + 1:]
            if vg and lv:
                return vg.replace("--", "-"), lv.replace("--", "-")
            return None
        i += 1
    return None


def parse_spec(spec: str) -> Spec:
    """Classify an fstab source field."""
    text = spec.strip()
    m = re.match(r"^(UUID|LABEL|PARTUUID|PARTLABEL)=(.*)$", text, re.I)
    if m:
        value = m.group(2).strip().strip('"').strip("'")
        return Spec(m.group(1).lower(), value)
    for prefix, kind in (("/dev/disk/by-uuid/", "uuid"), ("/dev/disk/by-label/", "label"),
                         ("/dev/disk/by-partuuid/", "partuuid"), ("/dev/disk/by-partlabel/", "partlabel")):
        if text.startswith(prefix):
            return Spec(kind, _udev_unescape(text[len(prefix):]))
    if text.startswith("/dev/disk/by-id/dm-name-"):
        text = "/dev/mapper/" + _udev_unescape(text[len("/dev/disk/by-id/dm-name-"):])
    if text.startswith("/dev/disk/by-id/dm-uuid-LVM-"):
        # LVM's device-mapper uuid: VG uuid then LV uuid, 32 characters each, no dashes
        ids = text[len("/dev/disk/by-id/dm-uuid-LVM-"):]
        if len(ids) >= 64:
            return Spec("lv_uuid", ids[32:64])
    if text.startswith("/dev/mapper/"):
        split = _split_mapper(text[len("/dev/mapper/"):])
        if split:
            return Spec("lv", f"{split[0]}/{split[1]}")
        return Spec("mapper", text[len("/dev/mapper/"):])
    m = _SCSI.match(text)
    if m:
        letters = m.group(1)
        disk = 0
        for ch in letters:                       # a..z, aa.. like the kernel
            disk = disk * 26 + (ord(ch) - 96)
        return Spec("device", text, disk=disk - 1, partition=int(m.group(2)) if m.group(2) else None)
    m = _NVME.match(text)
    if m:
        disk = int(m.group(1) if m.group(1) is not None else m.group(2))
        return Spec("device", text, disk=disk, partition=int(m.group(3)) if m.group(3) else None)
    parts = text.split("/")
    if len(parts) == 4 and parts[0] == "" and parts[1] == "dev" and parts[2] not in _DEV_DIRS \
            and parts[2] and parts[3]:
        return Spec("lv", f"{parts[2]}/{parts[3]}")
    if text.startswith("/"):
        return Spec("path", text)
    return Spec("other", text)


def _skip_reason(spec: str, mountpoint: str, fstype: str, options: list[str]) -> str | None:
    fs = fstype.lower()
    if fs == "swap" or mountpoint in ("swap", "none") and fs in ("swap", "auto", ""):
        return "swap"
    if fs in _VIRTUAL or spec in ("proc", "sysfs", "devpts", "tmpfs", "none") and fs != "auto":
        return f"virtual filesystem ({fstype})"
    if "bind" in options or "rbind" in options:
        return "bind mount"
    if fs in _NETWORK or fs.startswith("fuse.") or re.match(r"^[^/=]+:/", spec) or spec.startswith("//"):
        return f"network filesystem ({fstype})"
    if "noauto" in options:
        return "noauto"
    if not mountpoint.startswith("/"):
        return f"mountpoint {mountpoint!r} is not an absolute path"
    return None


def parse_fstab(text: str) -> list[FstabEntry]:
    """Every entry of an fstab, in order; entries rescue will not mount carry `skipped`."""
    entries: list[FstabEntry] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) < 2:
            entries.append(FstabEntry(spec=_unescape(fields[0]), mountpoint="", fstype="",
                                      skipped="malformed line (fewer than 2 fields)", line=lineno))
            continue
        spec, mountpoint = _unescape(fields[0]), _unescape(fields[1])
        fstype = fields[2] if len(fields) > 2 else "auto"
        options = fields[3].split(",") if len(fields) > 3 else ["defaults"]
        nums = []
        for f in fields[4:6]:
            nums.append(int(f) if f.isdigit() else 0)
        nums += [0] * (2 - len(nums))
        if mountpoint != "/" and mountpoint.startswith("/"):
            mountpoint = mountpoint.rstrip("/") or "/"
        entries.append(FstabEntry(spec=spec, mountpoint=mountpoint, fstype=fstype, options=options,
                                  dump=nums[0], passno=nums[1],
                                  skipped=_skip_reason(spec, mountpoint, fstype, options),
                                  source=parse_spec(spec), line=lineno))
    return entries


def _eq(a: str | None, b: str) -> bool:
    return a is not None and a.lower() == b.lower()


def match_volume(spec: str | Spec | FstabEntry, volumes: list[Volume]) -> Volume | None:
    """The volume an fstab source names, or None when none of ours fits."""
    if isinstance(spec, FstabEntry):
        spec = spec.source or parse_spec(spec.spec)
    elif isinstance(spec, str):
        spec = parse_spec(spec)
    kind, value = spec.kind, spec.value
    if kind == "uuid":
        # vfat/NTFS uuids are printed with or without '-' and in any case.
        want = value.replace("-", "").lower()
        return next((v for v in volumes if v.uuid and v.uuid.replace("-", "").lower() == want), None)
    if kind == "label":
        return next((v for v in volumes if v.label == value), None) or \
            next((v for v in volumes if _eq(v.label, value)), None)
    if kind == "partuuid":
        return next((v for v in volumes if _eq(v.part_uuid, value)), None)
    if kind == "partlabel":
        return next((v for v in volumes if v.part_label == value), None)
    if kind == "lv":
        return next((v for v in volumes if v.id == value), None)
    if kind == "lv_uuid":
        return next((v for v in volumes
                     if str(v.details.get("lv_uuid", "")).replace("-", "") == value), None)
    if kind == "device":
        # One snapshot is one disk: only the first disk's names can be ours.
        if spec.disk != 0:
            return None
        if spec.partition is None:
            return next((v for v in volumes if v.id == "whole"), None)
        return next((v for v in volumes if v.id == str(spec.partition)), None)
    return None
