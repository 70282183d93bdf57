"""Open a snapshot down to its filesystems and choose the guest's root."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from ..disk import DiskOptions, open_disk
from ..errors import FilesystemError, RescueError, VolumeError
from ..fs import open_filesystem
from ..fs.base import Entry, FileReadError, FileSystem, FsInfo, normalize
from ..source.base import Run
from ..source import open_source
from ..units import human_size
from ..volume import Volume, VolumeMap, discover
from .identity import id_names, os_release
from .not_a_disk import refuse_non_disk
from .apps import find_applications
from .databases import find_databases
from .valuables import find_valuables

# Filesystems that hold no files to rescue.
NOT_FILESYSTEMS = {"swap", "LVM2_member", "crypto_LUKS", "jbd", "BitLocker"}
# What The Sleuth Kit cannot read; libguestfs can (Linux only).
GUESTFS_ONLY = {"f2fs", "reiserfs", "jfs", "zfs_member"}


@dataclass
class SnapshotOptions:
    volume: str | None = None        # --volume: a volume id ("2", "vg0/root", "whole")
    backend: str = "auto"            # "auto", "native" (never libguestfs), "tsk", "guestfs", or a reader's name
    member: str | None = None        # --member: file inside an archive
    backing: str | None = None       # --backing: parent image override
    snapshot: str | None = None      # --snapshot: qcow2 internal snapshot
    partial: bool = False            # --partial: read a truncated image anyway
    extra_disks: list[str] = field(default_factory=list)   # --disk: more disks of the same server
    status: Callable[[str], None] | None = None   # progress notes ("starting libguestfs ...")
    progress: Callable[[int, int], None] | None = None   # (done, total) while an archive is indexed


@dataclass
class _Candidate:
    volume: Volume
    fs: FileSystem | None = None
    error: str | None = None
    has_root: bool = False


class NeedsAppliance(FilesystemError):
    """Opening this volume would start the libguestfs appliance (asked not to)."""


class DeferredFileSystem(FileSystem):
    """A filesystem opened on first use: a mounted volume that needs the
    libguestfs appliance costs its start (seconds to a minute) only when a
    path on it is read. A failure to open is raised again at every use."""

    backend = "deferred"

    def __init__(self, opener: Callable[[], FileSystem], info: FsInfo, name: str) -> None:
        self._opener = opener
        self._fs: FileSystem | None = None
        self._error: RescueError | None = None
        self.info = info
        self.name = name

    def _open(self) -> FileSystem:
        if self._fs is None:
            if self._error is not None:
                raise self._error
            try:
                self._fs = self._opener()
            except RescueError as exc:
                self._error = exc
                raise
            self.info = self._fs.info
        return self._fs

    def stat(self, path: str) -> Entry:
        return self._open().stat(path)

    def listdir(self, path: str) -> list[Entry]:
        return self._open().listdir(path)

    def _content(self) -> FileSystem:
        """The filesystem, for one entry's content: failing to open it is that
        entry's damage (skipped and reported), as a damaged file's would be."""
        try:
            return self._open()
        except RescueError as exc:
            raise FileReadError(exc.problem) from None

    def file_runs(self, entry: Entry) -> list[Run]:
        return self._content().file_runs(entry)

    def read_chunks(self, entry: Entry, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        return self._content().read_chunks(entry, chunk_size)

    def read_range(self, entry: Entry, offset: int, length: int) -> bytes:
        return self._content().read_range(entry, offset, length)

    def data_ranges(self, entry: Entry) -> list[tuple[int, int]] | None:
        return self._content().data_ranges(entry)

    def xattrs(self, entry: Entry) -> dict[str, bytes]:
        return self._content().xattrs(entry)

    def listing_damage(self, path: str) -> str | None:
        return self._fs.listing_damage(path) if self._fs is not None else None

    def close(self) -> None:
        pass   # the filesystem inside belongs to the Snapshot, which closes it


class Snapshot:
    def __init__(self, spec: str, options: SnapshotOptions | None = None) -> None:
        self.spec = str(spec)
        self.options = options or SnapshotOptions()
        self.source = open_source(self.spec, member=self.options.member, progress=self.options.progress,
                                  partial=self.options.partial)
        self.disk = open_disk(self.source, DiskOptions(backing=self.options.backing,
                                                       snapshot=self.options.snapshot))
        self.extra: list = []   # (source, disk) of each --disk
        try:
            for spec in self.options.extra_disks:
                extra_source = open_source(spec, progress=self.options.progress)
                self.extra.append((extra_source, open_disk(extra_source, DiskOptions())))
        except BaseException:
            self.close()
            raise
        self.volumes: VolumeMap = discover([self.disk] + [d for _, d in self.extra] if self.extra else self.disk)
        self._filesystems: dict[str, FileSystem] = {}
        self._errors: dict[str, str] = {}
        self._native_errors: dict[str, str] = {}   # why the registry's readers cannot open a volume
        self._root: Volume | None = None
        self._tree: FileSystem | None = None
        self.mounts: list[dict[str, Any]] = []
        self.warnings: list[str] = (list(getattr(self.source, "notes", []) or []) + list(self.volumes.warnings)
                                    + list(getattr(self.disk.info, "warnings", [])))

    # -- filesystems ---------------------------------------------------------

    def open_filesystem(self, volume: Volume, appliance: bool = True) -> FileSystem:
        """The filesystem of one volume, through the chosen backend (cached).
        `appliance=False` raises NeedsAppliance rather than start libguestfs."""
        if volume.id in self._filesystems:
            return self._filesystems[volume.id]
        if volume.id in self._errors:
            raise FilesystemError(self._errors[volume.id], file=self.spec)
        unsupported = volume.details.get("unsupported")
        if unsupported:
            raise VolumeError(f"volume {volume.id}: {unsupported}", file=self.spec)
        try:
            fs = self._open_backend(volume, appliance)
        except NeedsAppliance:
            raise
        except RescueError as exc:
            self._errors[volume.id] = exc.problem
            raise
        self._filesystems[volume.id] = fs
        return fs

    def _open_backend(self, volume: Volume, appliance: bool = True) -> FileSystem:
        backend = self.options.backend
        kind = volume.filesystem
        if kind in NOT_FILESYSTEMS:
            raise FilesystemError(f"volume {volume.id} is {kind}, not a filesystem", file=self.spec)
        if self._wants_guestfs(volume) or backend == "guestfs":
            if not appliance:
                raise NeedsAppliance(f"volume {volume.id} ({kind}) is read through libguestfs", file=self.spec)
            return self._open_guestfs(volume)
        native = self._native_errors.get(volume.id)
        if native is None:
            devices = self._btrfs_devices(volume)
            if devices and backend in ("auto", "native", "btrfs"):   # a btrfs over several disks (--disk)
                from ..fs.btrfs import BtrfsFileSystem
                return BtrfsFileSystem(volume.source, name=f"{self.spec} volume {volume.id}", devices=devices)
            try:
                return open_filesystem(volume.source, name=f"{self.spec} volume {volume.id}",
                                       backend="auto" if backend == "native" else backend)
            except FilesystemError as exc:
                native = self._native_errors[volume.id] = exc.problem
        what = kind or "content no reader here recognises"
        if backend == "auto" and kind and self._guestfs_ready():
            if not appliance:
                raise NeedsAppliance(f"volume {volume.id} ({kind}) needs libguestfs: {native}", file=self.spec)
            if self.options.status:
                self.options.status(f"no reader here can open volume {volume.id} ({kind}: {native}); "
                                    "trying libguestfs")
            try:
                return self._open_guestfs(volume)
            except FilesystemError as exc:
                raise FilesystemError(f"volume {volume.id} holds {what}, which no reader here can open: {native}; "
                                      f"libguestfs: {exc.problem}", file=self.spec) from None
        hint = None
        if kind and backend in ("tsk", "native"):
            hint = f"try --backend auto{' (libguestfs last)' if backend == 'native' else ''}"
        elif kind and backend == "auto":
            hint = _guestfs_hint()
        raise FilesystemError(f"volume {volume.id} holds {what}, which no reader here can open: {native}",
                              file=self.spec, hint=hint) from None

    def _open_guestfs(self, volume: Volume) -> FileSystem:
        try:
            from ..fs import guestfs as guestfs_backend
        except ImportError:
            guestfs_backend = None
        opener = getattr(guestfs_backend, "open_volume", None)
        why_not = getattr(guestfs_backend, "guestfs_unavailable", lambda: "not installed")() if opener else "missing"
        if why_not:
            raise FilesystemError(f"volume {volume.id} holds {volume.filesystem or 'unknown content'}, which no "
                                  f"reader here can open: only libguestfs reads it, and here {why_not}",
                                  file=self.spec, hint=_guestfs_hint())
        # One appliance start (18-55 s) serves every volume that needs it: open
        # them together, so a root and a separate /var on XFS cost one start.
        wanted = [volume] + [v for v in self.volumes.volumes
                             if v is not volume and v.id not in self._filesystems and v.id not in self._errors
                             and self._wants_guestfs(v)]
        # The appliance says what it is doing (starting, still starting, retrying
        # under TCG, ready) through the status callback.
        opened = guestfs_backend.open_volumes(wanted, [f"{self.spec} volume {v.id}" for v in wanted],
                                              status=self.options.status)
        for other, fs in zip(wanted[1:], opened[1:]):
            self._filesystems[other.id] = fs
        return opened[0]

    @staticmethod
    def _guestfs_ready() -> bool:
        try:
            from ..fs import guestfs as guestfs_backend
        except ImportError:
            return False
        return getattr(guestfs_backend, "guestfs_unavailable", lambda: "missing")() is None

    def _wants_guestfs(self, volume: Volume) -> bool:
        kind = volume.filesystem
        if kind in NOT_FILESYSTEMS or volume.details.get("unsupported") or not kind:
            return False
        return self.options.backend == "guestfs" or (self.options.backend == "auto" and kind in GUESTFS_ONLY)

    def _btrfs_devices(self, volume: Volume) -> list:
        """The other devices of a multi-device btrfs: volumes (of this disk or
        a --disk) holding a btrfs with the same filesystem uuid."""
        if volume.filesystem != "btrfs" or not volume.uuid:
            return []
        return [v.source for v in self.volumes.volumes
                if v is not volume and v.filesystem == "btrfs" and v.uuid == volume.uuid]

    def _btrfs_member(self, volume: Volume) -> bool:
        """A second (third...) device of a multi-device btrfs: the first one stands for it."""
        if volume.filesystem != "btrfs" or not volume.uuid:
            return False
        first = next(v for v in self.volumes.volumes if v.filesystem == "btrfs" and v.uuid == volume.uuid)
        return first is not volume

    def _candidates(self) -> list[_Candidate]:
        usable = [v for v in self.volumes.volumes
                  if v.filesystem not in NOT_FILESYSTEMS and not v.details.get("unsupported")
                  and not self._btrfs_member(v)]
        # Volumes whose content was recognised first; the rest only if nothing was.
        known = [v for v in usable if v.filesystem]
        # Volumes read in this process first: the libguestfs appliance starts
        # only when none of them is the root (a /var it reads opens when read).
        out, later = self._probe_roots(known or usable, appliance=False)
        if later and not any(c.has_root for c in out):
            out += self._probe_roots(later, appliance=True)[0]
        return out

    def _probe_roots(self, volumes: list[Volume], appliance: bool) -> tuple[list[_Candidate], list[Volume]]:
        """(candidates, volumes left for the appliance) of `volumes`."""
        out: list[_Candidate] = []
        later: list[Volume] = []
        for volume in volumes:
            cand = _Candidate(volume)
            try:
                cand.fs = self.open_filesystem(volume, appliance=appliance)
            except NeedsAppliance:
                later.append(volume)
                continue
            except RescueError as exc:
                cand.error = exc.problem
                out.append(cand)
                continue
            # the last two: btrfs roots opened at the top level (Ubuntu '@', Fedora 'root' subvolumes)
            for marker in ("/etc/os-release", "/etc/fstab", "/usr/lib/os-release",
                           "/@/etc/os-release", "/root/etc/os-release"):
                try:
                    cand.fs.resolve(marker)
                    cand.has_root = True
                    break
                except Exception:
                    continue
            out.append(cand)
        return out, later

    def root_volume(self) -> Volume:
        """The volume to read: --volume, else the guest's root, else the only filesystem."""
        if self._root is not None:
            return self._root
        wanted = self.options.volume
        if wanted:
            volume = self.volumes.find(wanted)
            if volume is None and ":" in wanted:   # "2:@home": a btrfs subvolume (or snapshot) of volume 2
                volume = self.volumes.find(wanted.split(":", 1)[0])
            if volume is None:
                ids = ", ".join(v.id for v in self.volumes.volumes) or "none"
                raise VolumeError(f"there is no volume {wanted!r} (volumes: {ids})", file=self.spec,
                                  hint=f"rescue inspect {self.spec}")
            self._root = volume
            return volume
        cands = self._candidates()
        roots = [c for c in cands if c.has_root]
        readable = [c for c in cands if c.fs is not None]
        if len(roots) == 1:
            self._root = roots[0].volume
        elif len(roots) > 1 or len(readable) > 1:
            choices = roots if roots else readable
            listing = ", ".join(f"{c.volume.id} ({c.volume.filesystem or '?'}, {human_size(c.volume.size)})"
                                for c in choices)
            why = "several volumes look like a Linux root" if roots else "no volume holds /etc/os-release"
            raise VolumeError(f"{why}: {listing}; pick one with --volume ID", file=self.spec,
                              hint=f"rescue inspect {self.spec}")
        elif len(readable) == 1:
            self._root = readable[0].volume
        else:
            raise self._nothing_readable(cands)
        return self._root

    def _nothing_readable(self, cands: list[_Candidate]) -> RescueError:
        if not self.volumes.volumes:
            return VolumeError("no partitions or filesystems found", file=self.spec)
        if not any(c.volume.filesystem for c in cands):
            ids = ", ".join(v.id for v in self.volumes.volumes)
            ends = [v.start + v.size for v in self.volumes.volumes]
            if all(end > self.disk.size for end in ends):   # a disk head: the download was cut short
                return VolumeError(f"the image is truncated: it ends at {self.disk.size} bytes but its partition "
                                   f"table describes a disk of at least {max(ends)} bytes (volumes {ids} are cut off)",
                                   file=self.spec, hint="download the snapshot again; `rescue download` resumes")
            return VolumeError(f"no filesystem found: the content of every volume ({ids}) is unrecognised",
                               file=self.spec, hint="is this the right disk? `rescue inspect` shows what was found")
        problems = "; ".join(c.error for c in cands if c.error)
        if not problems:
            kinds = ", ".join(f"{v.id} ({v.filesystem or 'unknown content'})" for v in self.volumes.volumes)
            return VolumeError(f"no readable filesystem found (volumes: {kinds})", file=self.spec,
                               hint="is this a disk image? `rescue inspect` shows what was found")
        return FilesystemError(f"no readable filesystem: {problems}", file=self.spec)

    def filesystem(self) -> FileSystem:
        """The guest's tree: the root filesystem, with the volumes its /etc/fstab
        mounts stitched in (unless --volume chose one filesystem)."""
        if self._tree is not None:
            return self._tree
        volume = self.root_volume()
        root = self.open_filesystem(volume)
        self._check_complete(volume, root)
        wanted = self.options.volume
        if wanted and ":" in wanted and self.volumes.find(wanted) is None:
            root = _subvolume(root, wanted.split(":", 1)[1], self.spec)
        self._tree = root
        if not self.options.volume:
            self._tree = self._stitch(root)
        return self._tree

    def truncation(self, volume: Volume, fs: FileSystem | None = None) -> str | None:
        """Why this volume cannot be whole (the image ends too early), or None."""
        disk_size = self.disk.size
        wanted = volume.size
        if fs is not None and fs.info.size:
            wanted = max(wanted, fs.info.size) if volume.id.endswith("whole") else min(wanted, fs.info.size)
        if "/" in volume.id:
            return None   # an LV ("vg/lv") maps onto PVs; its reader reports missing extents itself
        have = max(0, disk_size - volume.start)
        if wanted > have:
            return (f"the image is truncated: volume {volume.id} needs {wanted} bytes but the image holds only "
                    f"{have} of them (it ends at {disk_size} bytes); files stored past that point are lost")
        return None

    def container_truncation(self) -> str | None:
        """A container (qcow2, VMDK, VHD/VHDX, VDI...) cut short, the usual
        interrupted download: its tables or grains point past the end of its
        file. Checked once (the tables are read, no data), None when whole."""
        cached = getattr(self, "_container_cut", None)
        if cached is None:
            check = getattr(self.disk, "truncation", None)
            found = check() if check is not None else None
            cached = self._container_cut = found.describe(f"{self.disk.info.format} image") if found else ""
        return cached or None

    def _check_complete(self, volume: Volume, fs: FileSystem) -> None:
        why = self.truncation(volume, fs) or self.container_truncation()
        if why is None:
            return
        if not self.options.partial:
            raise VolumeError(why, file=self.spec,
                              hint="download the snapshot again (`rescue download` resumes), or add --partial "
                                   "to rescue what the image still holds")
        self.warnings.append(why)

    def _stitch(self, root: FileSystem) -> FileSystem:
        try:
            from .merged import build_mount_table
        except ImportError:
            return root
        try:
            rows, merged = build_mount_table(root, self.volumes.volumes, self._mounted)
        except Exception as exc:   # a strange fstab must not stop a rescue of the root
            self.warnings.append(f"/etc/fstab could not be applied: {exc}")
            return root
        self.mounts = [row.to_json() if hasattr(row, "to_json") else dict(row.__dict__) for row in rows]
        merged = self._unreadable_mounts(merged)
        if not any(m.get("mountpoint") != "/" and (m.get("status") == "mounted" or
                                                   str(m.get("status", "")).startswith("failed: "))
                   for m in self.mounts) and getattr(merged, "root", root) is root:
            return root   # nothing stitched in (and / is not a btrfs subvolume): skip the routing layer
        return merged

    def _unreadable_mounts(self, merged: FileSystem) -> FileSystem:
        """A volume fstab mounts that no reader can open stays in the tree as
        what it is: every path under its mountpoint says why it cannot be read
        (not "no such file" from the empty directory it would be mounted on)."""
        from .merged import MergedFileSystem

        failed = {normalize(m["mountpoint"]): m for m in self.mounts
                  if str(m.get("status", "")).startswith("failed: ") and m.get("mountpoint")
                  and normalize(m["mountpoint"]) != "/"}
        mounts = getattr(merged, "mounts", None)
        if not failed or mounts is None:
            return merged
        mounts = dict(mounts)
        for mp, row in failed.items():
            if mp in mounts:
                continue
            problem = row["status"][len("failed: "):]
            error = FilesystemError(f"{mp} is mounted from volume {row.get('volume') or row.get('spec')}: {problem}",
                                    file=self.spec)

            def opener(error: FilesystemError = error) -> FileSystem:
                raise error

            mounts[mp] = DeferredFileSystem(opener, FsInfo(type=row.get("fstype") or "?"), f"{self.spec} {mp}")
        return MergedFileSystem(merged.root, mounts)

    def _mounted(self, volume: Volume) -> FileSystem:
        """A volume the guest's fstab mounts. One read through libguestfs is
        opened when a path on it is first used, so `extract --path /etc` on an
        ext4 root never starts the appliance for an f2fs /var."""
        try:
            return self.open_filesystem(volume, appliance=False)
        except NeedsAppliance:
            info = FsInfo(type=volume.filesystem or "?", label=volume.label, uuid=volume.uuid)
            return DeferredFileSystem(lambda: self.open_filesystem(volume), info,
                                      f"{self.spec} volume {volume.id}")

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

    def close(self) -> None:
        for fs in self._filesystems.values():
            try:
                fs.close()
            except Exception:
                pass
        for extra_source, extra_disk in getattr(self, "extra", []):
            extra_disk.close()
            extra_source.close()
        if getattr(self, "disk", None) is not None:
            self.disk.close()
        self.source.close()

    def __enter__(self) -> "Snapshot":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_snapshot(spec: str, options: SnapshotOptions | None = None) -> Snapshot:
    return Snapshot(spec, options)


def _subvolume(fs: FileSystem, spec: str, name: str) -> FileSystem:
    """`--volume 2:@home`: the subvolume (or snapshot) `spec` of a btrfs, by
    path from its top level or by id."""
    opener = getattr(fs, "subvolume", None)
    if opener is None:
        raise VolumeError(f"--volume ...:{spec}: this volume holds {fs.info.type}, which has no subvolumes",
                          file=name)
    return opener(spec)


def _guestfs_hint() -> str:
    if sys.platform.startswith("linux"):
        return "install libguestfs (apt install libguestfs-tools python3-guestfs) and add --backend guestfs"
    return "use the Linux VM from the Vagrantfile (see README: macOS and Windows)"


