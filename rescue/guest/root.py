"""Choose the guest's root among a snapshot's volumes and assemble its tree.

`choose_root(stack)` picks the volume to read: --volume, else the one volume
holding a Linux root (/etc/os-release, /etc/fstab...), else the only readable
filesystem, else one clear error saying why. `assemble(stack, volume)` opens
it, checks that the image holds it whole (--partial: a warning), and stitches
the volumes its /etc/fstab mounts into one tree. Volumes that need the
libguestfs appliance are opened only when nothing read here is the root, and
a mounted one only when a path on it is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import FilesystemError, RescueError, VolumeError
from ..fs.base import FileSystem, FsInfo, normalize
from ..units import human_size
from ..volume import Volume
from .merged import MergedFileSystem, build_mount_table
from .stack import NOT_FILESYSTEMS, DeferredFileSystem, NeedsAppliance, Stack

# A volume holding one of these is a Linux root; the last two are btrfs roots
# opened at the top level (Ubuntu '@', Fedora 'root' subvolumes).
ROOT_MARKERS = ("/etc/os-release", "/etc/fstab", "/usr/lib/os-release", "/@/etc/os-release", "/root/etc/os-release")


@dataclass
class GuestTree:
    """The guest's files as one tree, and how /etc/fstab was applied."""

    fs: FileSystem
    mounts: list[dict[str, Any]] = field(default_factory=list)   # rows as `rescue inspect` shows them


@dataclass
class _Candidate:
    volume: Volume
    fs: FileSystem | None = None
    error: str | None = None
    has_root: bool = False


def choose_root(stack: Stack) -> Volume:
    """The volume to read: --volume, else the guest's root, else the only filesystem."""
    wanted = stack.options.volume
    if wanted:
        volume = stack.volumes.find(wanted)
        if volume is None and ":" in wanted:   # "2:@home": a btrfs subvolume (or snapshot) of volume 2
            volume = stack.volumes.find(wanted.split(":", 1)[0])
        if volume is None:
            ids = ", ".join(v.id for v in stack.volumes.volumes) or "none"
            raise VolumeError(f"there is no volume {wanted!r} (volumes: {ids})", file=stack.spec,
                              hint=f"rescue inspect {stack.spec}")
        return volume
    cands = _candidates(stack)
    roots = [c for c in cands if c.has_root]
    readable = [c for c in cands if c.fs is not None]
    if len(roots) == 1:
        return roots[0].volume
    if len(roots) > 1 or len(readable) > 1:
        choices = roots if roots else readable
        listing = ", ".join(f"{c.volume.id} ({c.volume.filesystem or '?'}, {human_size(c.volume.size)})"
                            for c in choices)
        why = "several volumes look like a Linux root" if roots else "no volume holds /etc/os-release"
        raise VolumeError(f"{why}: {listing}; pick one with --volume ID", file=stack.spec,
                          hint=f"rescue inspect {stack.spec}")
    if len(readable) == 1:
        return readable[0].volume
    raise _nothing_readable(stack, cands)


def assemble(stack: Stack, volume: Volume) -> GuestTree:
    """The guest's tree on `volume`: its filesystem (a btrfs subvolume for
    --volume N:SUBVOL), with the volumes its /etc/fstab mounts stitched in
    (unless --volume chose one filesystem). Notes go to `stack.warnings`."""
    root = stack.open_filesystem(volume)
    _check_complete(stack, volume, root)
    wanted = stack.options.volume
    if wanted and ":" in wanted and stack.volumes.find(wanted) is None:
        root = _subvolume(root, wanted.split(":", 1)[1], stack.spec)
    if wanted:
        return GuestTree(root)
    return _stitch(stack, root)


# -- choosing ------------------------------------------------------------------

def _candidates(stack: Stack) -> list[_Candidate]:
    usable = [v for v in stack.volumes.volumes
              if v.filesystem not in NOT_FILESYSTEMS and not v.details.get("unsupported")
              and not stack.btrfs_member(v)]
    # Volumes whose content was recognised first; the rest only if nothing was.
    known = [v for v in usable if v.filesystem]
    # Volumes read in this process first: the libguestfs appliance starts
    # only when none of them is the root (a /var it reads opens when read).
    out, later = _probe_roots(stack, known or usable, appliance=False)
    if later and not any(c.has_root for c in out):
        out += _probe_roots(stack, later, appliance=True)[0]
    return out


def _probe_roots(stack: Stack, volumes: list[Volume], appliance: bool) -> tuple[list[_Candidate], list[Volume]]:
    """(candidates, volumes left for the appliance) of `volumes`."""
    out: list[_Candidate] = []
    later: list[Volume] = []
    for volume in volumes:
        cand = _Candidate(volume)
        try:
            cand.fs = stack.open_filesystem(volume, appliance=appliance)
        except NeedsAppliance:
            later.append(volume)
            continue
        except RescueError as exc:
            cand.error = exc.problem
            out.append(cand)
            continue
        for marker in ROOT_MARKERS:
            try:
                cand.fs.resolve(marker)
                cand.has_root = True
                break
            except Exception:
                continue
        out.append(cand)
    return out, later


def _nothing_readable(stack: Stack, cands: list[_Candidate]) -> RescueError:
    volumes = stack.volumes.volumes
    if not volumes:
        return VolumeError("no partitions or filesystems found", file=stack.spec)
    if not any(c.volume.filesystem for c in cands):
        ids = ", ".join(v.id for v in volumes)
        ends = [v.start + v.size for v in volumes]
        if all(end > stack.disk.size for end in ends):   # a disk head: the download was cut short
            return VolumeError(f"the image is truncated: it ends at {stack.disk.size} bytes but its partition "
                               f"table describes a disk of at least {max(ends)} bytes (volumes {ids} are cut off)",
                               file=stack.spec, hint="download the snapshot again; `rescue download` resumes")
        return VolumeError(f"no filesystem found: the content of every volume ({ids}) is unrecognised",
                           file=stack.spec, hint="is this the right disk? `rescue inspect` shows what was found")
    problems = "; ".join(c.error for c in cands if c.error)
    if not problems:
        kinds = ", ".join(f"{v.id} ({v.filesystem or 'unknown content'})" for v in volumes)
        return VolumeError(f"no readable filesystem found (volumes: {kinds})", file=stack.spec,
                           hint="is this a disk image? `rescue inspect` shows what was found")
    return FilesystemError(f"no readable filesystem: {problems}", file=stack.spec)


# -- assembling ----------------------------------------------------------------

def _check_complete(stack: Stack, volume: Volume, fs: FileSystem) -> None:
    why = stack.truncation(volume, fs) or stack.container_truncation()
    if why is None:
        return
    if not stack.options.partial:
        raise VolumeError(why, file=stack.spec,
                          hint="download the snapshot again (`rescue download` resumes), or add --partial "
                               "to rescue what the image still holds")
    stack.warnings.append(why)


def _subvolume(fs: FileSystem, spec: str, name: str) -> FileSystem:
    """`--volume 2:@home`: the subvolume (or snapshot) `spec` of a btrfs, by
    path from its top level or by id."""
    opener = getattr(fs, "subvolume", None)
    if opener is None:
        raise VolumeError(f"--volume ...:{spec}: this volume holds {fs.info.type}, which has no subvolumes",
                          file=name)
    return opener(spec)


def _stitch(stack: Stack, root: FileSystem) -> GuestTree:
    try:
        rows, merged = build_mount_table(root, stack.volumes.volumes, stack.open_when_used)
    except Exception as exc:   # a strange fstab must not stop a rescue of the root
        stack.warnings.append(f"/etc/fstab could not be applied: {exc}")
        return GuestTree(root)
    mounts = [row.to_json() if hasattr(row, "to_json") else dict(row.__dict__) for row in rows]
    merged = _unreadable_mounts(stack, merged, mounts)
    if not any(m.get("mountpoint") != "/" and (m.get("status") == "mounted" or
                                               str(m.get("status", "")).startswith("failed: "))
               for m in mounts) and getattr(merged, "root", root) is root:
        return GuestTree(root, mounts)   # nothing stitched in (and / is not a btrfs subvolume): skip the routing layer
    return GuestTree(merged, mounts)


def _unreadable_mounts(stack: Stack, merged: FileSystem, rows: list[dict[str, Any]]) -> FileSystem:
    """A volume fstab mounts that no reader can open stays in the tree as
    what it is: every path under its mountpoint says why it cannot be read
    (not "no such file" from the empty directory it would be mounted on)."""
    failed = {normalize(m["mountpoint"]): m for m in rows
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
                                file=stack.spec)

        def opener(error: FilesystemError = error) -> FileSystem:
            raise error

        mounts[mp] = DeferredFileSystem(opener, FsInfo(type=row.get("fstype") or "?"), f"{stack.spec} {mp}")
    return MergedFileSystem(merged.root, mounts)
