"""Helpers for the btrfs tests: images made by mkfs.btrfs and loop mounts,
the reader's view in the shape of scripts/btrfs_trees.kernel_view, and a
readable comparison."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

from repo_paths import REPO
sys.path.insert(0, str(REPO / "scripts"))
import btrfs_trees  # noqa: E402,F401

from kernel_view_support import view_differences  # noqa: E402
from rescue.fs.base import FileSystem  # noqa: E402

FIELDS = ("kind", "mode", "uid", "gid", "size", "mtime_ns", "ctime_ns", "nlink", "target", "rdev", "xattrs",
          "sha256")


def why_no_kernel() -> str | None:
    """Why differential tests against the kernel cannot run here (None: they can)."""
    if os.geteuid() != 0:
        return "needs root (loop mounts)"
    for tool in ("mkfs.btrfs", "btrfs", "losetup", "setfacl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if "btrfs" not in Path("/proc/filesystems").read_text():
        subprocess.run(["modprobe", "btrfs"], capture_output=True)
        if "btrfs" not in Path("/proc/filesystems").read_text():
            return "the kernel has no btrfs"
    return None


def mkfs(image: Path, size: str = "400M", *args: str, devices: list[Path] = ()) -> Path:
    for path in [image, *devices]:
        path.unlink(missing_ok=True)
        subprocess.run(["truncate", "-s", size, str(path)], check=True)
    subprocess.run(["mkfs.btrfs", "-q", "-f", *args, str(image), *map(str, devices)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return image


@contextlib.contextmanager
def loop_devices(images: list[Path]) -> Iterator[list[str]]:
    devs = []
    try:
        for image in images:
            devs.append(subprocess.run(["losetup", "-f", "--show", str(image)], check=True, capture_output=True,
                                       text=True).stdout.strip())
        yield devs
    finally:
        for dev in devs:
            subprocess.run(["losetup", "-d", dev], capture_output=True)


@contextlib.contextmanager
def mounted(image: Path, mnt: Path, options: str = "", extra: list[Path] = ()) -> Iterator[Path]:
    """`image` (and the `extra` devices of the same filesystem) loop-mounted at `mnt`."""
    mnt.mkdir(parents=True, exist_ok=True)
    with loop_devices([image, *extra]) as devs:
        if len(devs) > 1:
            subprocess.run(["btrfs", "device", "scan", *devs], check=True, capture_output=True)
        opts = ",".join(o for o in (options, f"device={devs[1]}" if len(devs) > 1 else "") if o)
        cmd = ["mount", "-t", "btrfs"] + (["-o", opts] if opts else []) + [devs[0], str(mnt)]
        subprocess.run(cmd, check=True)
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
            if len(devs) > 1:
                subprocess.run(["btrfs", "device", "scan", "--forget"], capture_output=True)


def reader_view(fs: FileSystem, top: str = "/", with_data: bool = True) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for e in fs.walk(top):
        digest = None
        if e.kind == "file" and with_data:
            h = hashlib.sha256()
            for chunk in fs.read_chunks(e):
                h.update(chunk)
            digest = h.hexdigest()
        rel = "/" + e.path[len(top):].lstrip("/") if top != "/" else e.path
        out[rel] = (e.kind, e.mode, e.uid, e.gid, e.size, e.mtime_ns, e.ctime_ns, e.nlink, e.link_target,
                    e.rdev, fs.xattrs(e), digest)
    return out


def reader_links(fs: FileSystem) -> set[frozenset[str]]:
    groups: dict[int, set[str]] = {}
    for e in fs.walk("/"):
        if e.kind != "dir" and e.kind != "symlink":
            groups.setdefault(e.inode, set()).add(e.path)
    return {frozenset(g) for g in groups.values() if len(g) > 1}


def differences(expected: dict[str, tuple], got: dict[str, tuple], limit: int = 20,
                skip: dict[str, set[str]] | None = None) -> list[str]:
    return view_differences(FIELDS, expected, got, limit, skip)
