"""The user's snapshot, opened: its layers, the guest's root, what inspect shows.

`Snapshot` is a `Stack` (stack.py: source -> disk -> volumes -> filesystems)
whose root is chosen and assembled once, when first asked (root.py), with what
the guest is on top: its OS, users and groups, and `inspect()`, the data
`rescue inspect` shows.
"""

from __future__ import annotations

from typing import Any

from ..errors import RescueError
from ..fs.base import FileSystem
from ..volume import Volume
from .identity import id_names, os_release
from .not_a_disk import refuse_non_disk
from .root import assemble, choose_root
from .stack import NOT_FILESYSTEMS, SnapshotOptions, Stack


class Snapshot(Stack):
    """The user's snapshot file, opened as a whole server (see the module)."""

    def __init__(self, spec: str, options: SnapshotOptions | None = None) -> None:
        super().__init__(spec, options)
        self._root: Volume | None = None
        self._tree: FileSystem | None = None
        self.mounts: list[dict[str, Any]] = []   # how /etc/fstab was applied (inspect's rows)

    def root_volume(self) -> Volume:
        """The volume to read: --volume, else the guest's root, else the only filesystem."""
        if self._root is None:
            self._root = choose_root(self)
        return self._root

    def filesystem(self) -> FileSystem:
        """The guest's tree: the root filesystem, with the volumes its /etc/fstab
        mounts stitched in (unless --volume chose one filesystem)."""
        if self._tree is None:
            tree = assemble(self, self.root_volume())
            self._tree, self.mounts = tree.fs, tree.mounts
        return self._tree

    # -- what the guest is ---------------------------------------------------

    def os_info(self) -> dict[str, str] | None:
        try:
            return os_release(self.filesystem())
        except RescueError:
            return None

    def user_names(self) -> dict[int, str]:
        return id_names(self.filesystem(), "/etc/passwd")

    def group_names(self) -> dict[int, str]:
        return id_names(self.filesystem(), "/etc/group")

    def inspect(self) -> dict[str, Any]:
        """Everything `rescue inspect` shows, as plain data. Raises VolumeError when
        the file is not a disk image at all (no container, table or filesystem)."""
        info = self.disk.info
        out: dict[str, Any] = {"snapshot": self.spec}
        members = getattr(self.source, "archive_info", None)
        if members:
            out["archive"] = members() if callable(members) else members
        out.update(info.to_json())
        out["partition_table"] = self.volumes.partition_table
        try:
            if self.disk.size >= 512 and self.disk.read(510, 2) == b"\x55\xaa":
                out["boot_sector"] = True   # an MBR signature, even with no partitions in it
        except OSError as exc:   # DamagedRange: a damaged first block is a finding, not the end
            self.warnings.append(f"the first sector is damaged: {exc}")
        volumes = []
        for volume in self.volumes.volumes:
            row = volume.to_json()
            if volume.filesystem and volume.filesystem not in NOT_FILESYSTEMS:
                try:
                    fs = self.open_filesystem(volume)
                    row["backend"] = fs.backend
                    if fs.info.label and not row.get("label"):
                        row["label"] = fs.info.label
                    if fs.info.details.get("subvolumes") is not None:   # btrfs: subvolumes and snapshots
                        row["subvolumes"] = fs.info.details["subvolumes"]
                    # used/free as the reader counts them (the volume probe knows ext's and
                    # btrfs' superblock counters only; XFS and the others come from their readers)
                    details = dict(row.get("details") or {})
                    for key in ("used", "free"):
                        value = getattr(fs.info, key, None)
                        if details.get(key) is None and value is not None:
                            details[key] = value
                    if details:
                        row["details"] = details
                except RescueError as exc:
                    row["error"] = exc.problem
            volumes.append(row)
        out["volumes"] = volumes
        if self.volumes.volume_groups:
            out["volume_groups"] = self.volumes.volume_groups
        try:
            root = self.root_volume()
            out["root_volume"] = root.id
            os_info = self.os_info()
            if os_info:
                out["os"] = {k: os_info[k] for k in ("id", "name", "pretty_name", "version_id", "version_codename",
                                                     "id_like") if k in os_info}
            if self.mounts:
                out["mounts"] = self.mounts
            # inspect's searches, imported here: ls and cat need none of them (apps pulls in sqlite3)
            from .apps import find_applications
            from .databases import find_databases
            from .valuables import find_valuables
            out["valuables"] = [f.to_json() for f in find_valuables(self.filesystem())]
            apps = find_applications(self.filesystem())
            if apps.engines or apps.containers or apps.volumes:
                out["applications"] = apps.to_json()
                self.warnings.extend(apps.warnings)
            databases = find_databases(self.filesystem(), ["/srv", "/opt", "/var/www"])
            if databases:
                out["databases"] = [d.to_json() for d in databases]
        except RescueError as exc:
            out["root_volume"] = None
            out["root_error"] = exc.one_line()
        if self.warnings:
            out["warnings"] = self.warnings
        refuse_non_disk(out)
        return out

    def __enter__(self) -> "Snapshot":
        return self


def open_snapshot(spec: str, options: SnapshotOptions | None = None) -> Snapshot:
    return Snapshot(spec, options)


__all__ = ["Snapshot", "SnapshotOptions", "open_snapshot"]
