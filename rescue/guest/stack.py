"""Open every layer of a snapshot: source -> disk (and --disk) -> volumes -> filesystems.

`Stack` is what lies below the guest: the byte source, the disk container, the
volumes found on it, and each volume's filesystem through the chosen backend
(the registry's native readers, The Sleuth Kit, libguestfs as the last resort),
opened on demand and cached. Choosing which of them is the guest's root, and
stitching its /etc/fstab mounts into one tree, is `root.py`'s job.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, Iterator

from ..disk import DiskOptions, open_disk
from ..errors import FilesystemError, RescueError, VolumeError
from ..fs import open_filesystem
from ..fs.base import Entry, FileReadError, FileSystem, FsInfo
from ..source import open_source
from ..source.base import Run
from ..volume import Volume, VolumeMap, discover

# Filesystems that hold no files to rescue.
NOT_FILESYSTEMS = {"swap", "LVM2_member", "crypto_LUKS", "jbd", "BitLocker"}
# What The Sleuth Kit cannot read; libguestfs can (Linux only).
GUESTFS_ONLY = {"f2fs", "reiserfs", "jfs", "zfs_member"}


@dataclass
class SnapshotOptions:
    """How to read the user's snapshot (the CLI's shared options)."""

    volume: str | None = None        # --volume: a volume id ("2", "vg0/root", "whole")
    backend: str = "auto"            # "auto", "native" (never libguestfs), "tsk", "guestfs", or a reader's name
    member: str | None = None        # --member: file inside an archive
    backing: str | None = None       # --backing: parent image override
    internal_snapshot: str | None = None   # --internal-snapshot: a qcow2 internal snapshot (a VMA: its drive)
    partial: bool = False            # --partial: read a truncated image anyway
    extra_disks: list[str] = field(default_factory=list)   # --disk: more disks of the same server
    status: Callable[[str], None] | None = None   # progress notes ("starting libguestfs ...")
    progress: Callable[[int, int], None] | None = None   # (done, total) while an archive is indexed


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
        pass   # the filesystem inside belongs to the Stack, which closes it


class Stack:
    """The layers of one snapshot, opened: `source`, `disk`, `extra` (each
    --disk), `volumes`, and `open_filesystem(volume)`. `warnings` collects
    what the layers noticed (a read-write mounted device, a cut table...)."""

    def __init__(self, spec: str, options: SnapshotOptions | None = None) -> None:
        self.spec = str(spec)
        self.options = options or SnapshotOptions()
        self.source = open_source(self.spec, member=self.options.member, progress=self.options.progress,
                                  partial=self.options.partial)
        self.extra: list = []   # (source, disk) of each --disk
        try:
            self.disk = open_disk(self.source, DiskOptions(backing=self.options.backing,
                                                           internal_snapshot=self.options.internal_snapshot))
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

    def open_when_used(self, volume: Volume) -> FileSystem:
        """A volume's filesystem, but one read through libguestfs is opened
        when a path on it is first used: `extract --path /etc` on an ext4 root
        never starts the appliance for an f2fs /var."""
        try:
            return self.open_filesystem(volume, appliance=False)
        except NeedsAppliance:
            info = FsInfo(type=volume.filesystem or "?", label=volume.label, uuid=volume.uuid)
            return DeferredFileSystem(lambda: self.open_filesystem(volume), info,
                                      f"{self.spec} volume {volume.id}")

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
            hint = guestfs_hint()
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
                                  file=self.spec, hint=guestfs_hint())
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

    def btrfs_member(self, volume: Volume) -> bool:
        """A second (third...) device of a multi-device btrfs: the first one stands for it."""
        if volume.filesystem != "btrfs" or not volume.uuid:
            return False
        first = next(v for v in self.volumes.volumes if v.filesystem == "btrfs" and v.uuid == volume.uuid)
        return first is not volume

    # -- is it whole? ----------------------------------------------------------

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

    def close(self) -> None:
        for fs in getattr(self, "_filesystems", {}).values():
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

    def __enter__(self) -> "Stack":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def guestfs_hint() -> str:
    if sys.platform.startswith("linux"):
        return "install libguestfs (apt install libguestfs-tools python3-guestfs) and add --backend guestfs"
    return "use the Linux VM from the Vagrantfile (see README: macOS and Windows)"
