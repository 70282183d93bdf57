"""A server installed on btrfs, as Ubuntu and Fedora lay it out: a GPT disk with
an EFI FAT partition, /boot on ext4, and a btrfs whose subvolumes ('@' and
'@home', or 'root' and 'home') /etc/fstab mounts by UUID with subvol= (or
subvolid=). `rescue extract --path /home/alice --path /etc` must equal GNU tar
of the kernel's mounts of the same subvolumes; `inspect` finds the OS inside
the subvolume. Needs root, sgdisk, mkfs.* and loop devices."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from repo_paths import REPO
from btrfs_support import why_no_kernel

RESCUE = REPO / ".venv" / "bin" / "rescue"


def _why_not() -> str | None:
    why = why_no_kernel()
    if why is None:
        for tool in ("sgdisk", "sfdisk", "mkfs.vfat", "mkfs.ext4", "blkid"):
            if shutil.which(tool) is None:
                return f"{tool} is not installed"
    return why


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=f"btrfs guest: {_why_not()}")

LAYOUTS = {
    # name: (root subvolume, home subvolume, how fstab names /home)
    "ubuntu": ("@", "@home", "subvol=@home"),
    "fedora": ("root", "home", "subvolid"),
}


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


class Partitions:
    """Loop devices over the partitions of a disk image (by offset: containers
    often have no udev to make /dev/loopNpM nodes)."""

    def __init__(self, disk: Path, read_only: bool = False) -> None:
        table = json.loads(_run("sfdisk", "--json", str(disk)))["partitiontable"]
        self.devs = {}
        for i, part in enumerate(table["partitions"], 1):
            cmd = ["losetup", "-f", "--show", "-o", str(part["start"] * 512), "--sizelimit", str(part["size"] * 512)]
            self.devs[i] = _run(*cmd, *(["-r"] if read_only else []), str(disk)).strip()

    def __getitem__(self, number: int) -> str:
        return self.devs[number]

    def close(self) -> None:
        for dev in self.devs.values():
            subprocess.run(["losetup", "-d", dev], capture_output=True)


def _build(disk: Path, mnt: Path, layout: str) -> None:
    root_sv, home_sv, home_how = LAYOUTS[layout]
    subprocess.run(["truncate", "-s", "400M", str(disk)], check=True)
    _run("sgdisk", "-n1:1M:+16M", "-t1:ef00", "-n2:0:+48M", "-t2:8300", "-n3:0:0", "-t3:8300", str(disk))
    parts = Partitions(disk)
    try:
        _run("mkfs.vfat", parts[1])
        _run("mkfs.ext4", "-q", parts[2])
        _run("mkfs.btrfs", "-q", "-f", parts[3])
        uuid = _run("blkid", "-s", "UUID", "-o", "value", parts[3]).strip()
        boot_uuid = _run("blkid", "-s", "UUID", "-o", "value", parts[2]).strip()
        mnt.mkdir(parents=True, exist_ok=True)
        _run("mount", "-o", "compress=zstd", parts[3], str(mnt))
        try:
            _run("btrfs", "subvolume", "create", str(mnt / root_sv))
            _run("btrfs", "subvolume", "create", str(mnt / home_sv))
            home_id = _run("btrfs", "subvolume", "show", str(mnt / home_sv))
            home_id = next(line.split()[-1] for line in home_id.splitlines() if "Subvolume ID" in line)
            home_opt = home_how if home_how != "subvolid" else f"subvolid={home_id}"
            r = mnt / root_sv
            for d in ("etc/ssh", "home", "boot", "var/www/html", "usr/lib"):
                (r / d).mkdir(parents=True)
            (r / "etc" / "os-release").write_text(f'ID={layout}\nNAME="{layout.title()} Linux"\n')
            (r / "etc" / "fstab").write_text(
                f"UUID={uuid} / btrfs defaults,subvol={root_sv},compress=zstd:1 0 0\n"
                f"UUID={uuid} /home btrfs defaults,{home_opt} 0 0\n"
                f"UUID={boot_uuid} /boot ext4 defaults 0 2\n"
                "/swapfile none swap sw 0 0\n")
            (r / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/bash\n")
            (r / "etc" / "group").write_text("root:x:0:\nalice:x:1000:\n")
            (r / "etc" / "ssh" / "sshd_config").write_text("PermitRootLogin no\n" * 50)
            os.chmod(r / "etc" / "ssh" / "sshd_config", 0o600)
            os.symlink("/usr/lib/os-release", r / "etc" / "os-release-link")
            (r / "var" / "www" / "html" / "index.html").write_text("<h1>hi</h1>\n")
            h = mnt / home_sv / "alice"
            (h / ".ssh").mkdir(parents=True)
            (h / ".ssh" / "authorized_keys").write_text("ssh-ed25519 AAAA alice\n")
            (h / "photos").mkdir()
            (h / "photos" / "big.bin").write_bytes(os.urandom(700_000))
            (h / "notes.txt").write_text("remember the milk\n" * 1000)
            os.setxattr(h / "notes.txt", "user.tag", b"important")
            subprocess.run(["setfacl", "-m", "u:1001:r", str(h / "notes.txt")], check=True)
            for p in [h, *h.rglob("*")]:
                os.chown(p, 1000, 1000, follow_symlinks=False)
        finally:
            _run("umount", str(mnt))
        _run("mount", parts[2], str(mnt))
        try:
            (mnt / "vmlinuz").write_bytes(b"kernel" * 1000)
        finally:
            _run("umount", str(mnt))
    finally:
        parts.close()


def _members(path: Path) -> dict:
    out = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            xattrs = {k: v for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.user.")}
            out[m.name.rstrip("/")] = (m.type, m.mode, m.uid, m.gid, int(float(m.pax_headers.get("mtime", m.mtime))),
                                       m.linkname, tf.extractfile(m).read() if m.isfile() else None, xattrs)
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_extract_home_and_etc_equals_the_mounted_system(tmp_path, layout):
    disk, mnt = tmp_path / "disk.img", tmp_path / "mnt"
    _build(disk, mnt, layout)
    root_sv, home_sv, _how = LAYOUTS[layout]
    out = tmp_path / "rescue.tar"
    res = subprocess.run([str(RESCUE), "extract", str(disk), "--path", "/home/alice", "--path", "/etc",
                          "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    inspect = subprocess.run([str(RESCUE), "inspect", str(disk), "--json"], capture_output=True, text=True,
                             timeout=300)
    assert inspect.returncode == 0, inspect.stderr
    info = json.loads(inspect.stdout)
    assert info["root_volume"] == "3" and info["os"]["id"] == layout
    volume = next(v for v in info["volumes"] if v["id"] == "3")
    assert volume["backend"] == "btrfs" and {s["path"] for s in volume["subvolumes"]} == {root_sv, home_sv}
    mounts = {m["mountpoint"]: m["status"] for m in info["mounts"]}
    assert mounts["/"] == mounts["/home"] == mounts["/boot"] == "mounted"
    gnu = tmp_path / "gnu.tar"
    parts = Partitions(disk, read_only=True)
    try:
        _run("mount", "-o", f"ro,subvol={root_sv}", parts[3], str(mnt))
        _run("mount", "-o", f"ro,subvol={home_sv}", parts[3], str(mnt / "home"))
        try:
            subprocess.run(["tar", "--xattrs", "--xattrs-include=user.*", "--numeric-owner", "-cf", str(gnu),
                            "-C", str(mnt), "home/alice", "etc"], check=True, capture_output=True)
        finally:
            _run("umount", str(mnt / "home"))
            _run("umount", str(mnt))
    finally:
        parts.close()
    ours, theirs = _members(out), _members(gnu)
    assert set(ours) == set(theirs) and "home/alice/notes.txt" in ours and "etc/fstab" in ours
    assert {n: v for n, v in ours.items() if theirs[n] != v} == {}
    # --volume 3:<subvolume>: one subvolume on its own, as `mount -o subvol=` shows it
    alone = tmp_path / "home.tar"
    res = subprocess.run([str(RESCUE), "extract", str(disk), "--volume", f"3:{home_sv}", "--path", "/alice",
                          "-o", str(alone)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    home = {"home/" + n: v for n, v in _members(alone).items()}
    assert home == {n: v for n, v in theirs.items() if n.startswith("home/alice")}
    res = subprocess.run([str(RESCUE), "extract", str(disk), "--volume", "3:nope", "--path", "/", "-o",
                          str(tmp_path / "x.tar")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "no subvolume 'nope'" in res.stderr and "Traceback" not in res.stderr


def test_a_btrfs_over_two_disks_reads_with_disk(tmp_path):
    """raid0 data over two disk images: `--disk` brings the second device; without
    it the files striped onto it are skipped with the missing device named."""
    from btrfs_support import mkfs, mounted

    a, b = tmp_path / "a.img", tmp_path / "b.img"
    mkfs(a, "300M", "-d", "raid0", "-m", "raid1", devices=[b])
    with mounted(a, tmp_path / "mnt", "compress=zstd", extra=[b]) as mnt:
        (mnt / "etc").mkdir()
        (mnt / "etc" / "os-release").write_text("ID=fedora\n")
        (mnt / "data").mkdir()
        for i in range(4):
            (mnt / "data" / f"blob{i}").write_bytes(os.urandom(300_000 + i))
    with mounted(a, tmp_path / "mnt", "ro", extra=[b]) as mnt:
        want = {f"data/{p.name}": p.read_bytes() for p in (mnt / "data").iterdir()}
    out = tmp_path / "out.tar"
    res = subprocess.run([str(RESCUE), "extract", str(a), "--disk", str(b), "--path", "/data", "-o", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    with tarfile.open(out) as tf:
        got = {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}
    assert got == want
    res = subprocess.run([str(RESCUE), "extract", str(a), "--path", "/data", "-o", str(tmp_path / "one.tar")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode in (1, 2) and "is missing: add its disk with --disk" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_opensuse_layout_default_subvolume_root_and_subvol_paths(tmp_path):
    """openSUSE: / is the default subvolume (a snapper snapshot under @), fstab
    mounts it without subvol= and names the rest by path from the top level
    (subvol=/@/home)."""
    disk, mnt = tmp_path / "disk.img", tmp_path / "mnt"
    subprocess.run(["truncate", "-s", "300M", str(disk)], check=True)
    _run("sgdisk", "-n1:1M:+8M", "-t1:ef02", "-n2:0:0", "-t2:8300", str(disk))
    parts = Partitions(disk)
    try:
        _run("mkfs.btrfs", "-q", "-f", parts[2])
        uuid = _run("blkid", "-s", "UUID", "-o", "value", parts[2]).strip()
        mnt.mkdir()
        _run("mount", parts[2], str(mnt))
        try:
            for sv in ("@", "@/home", "@/.snapshots"):
                _run("btrfs", "subvolume", "create", str(mnt / sv))
            (mnt / "@" / ".snapshots" / "1").mkdir()
            root = mnt / "@" / ".snapshots" / "1" / "snapshot"
            _run("btrfs", "subvolume", "create", str(root))
            (root / "etc").mkdir()
            (root / "home").mkdir()
            (root / "etc" / "os-release").write_text('ID="opensuse-leap"\n')
            (root / "etc" / "fstab").write_text(f"UUID={uuid} / btrfs defaults 0 0\n"
                                                f"UUID={uuid} /home btrfs subvol=/@/home 0 0\n")
            (mnt / "@" / "home" / "alice").mkdir()
            (mnt / "@" / "home" / "alice" / "thesis.tex").write_text("\\documentclass{article}\n" * 500)
            sid = _run("btrfs", "subvolume", "show", str(root))
            sid = next(line.split()[-1] for line in sid.splitlines() if "Subvolume ID" in line)
            _run("btrfs", "subvolume", "set-default", sid, str(mnt))
        finally:
            _run("umount", str(mnt))
    finally:
        parts.close()
    out = tmp_path / "rescue.tar"
    res = subprocess.run([str(RESCUE), "extract", str(disk), "--path", "/home/alice", "--path", "/etc",
                          "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    gnu = tmp_path / "gnu.tar"
    parts = Partitions(disk, read_only=True)
    try:
        _run("mount", "-o", "ro", parts[2], str(mnt))
        _run("mount", "-o", "ro,subvol=/@/home", parts[2], str(mnt / "home"))
        try:
            subprocess.run(["tar", "--numeric-owner", "-cf", str(gnu), "-C", str(mnt), "home/alice", "etc"],
                           check=True, capture_output=True)
        finally:
            _run("umount", str(mnt / "home"))
            _run("umount", str(mnt))
    finally:
        parts.close()
    ours, theirs = _members(out), _members(gnu)
    assert "home/alice/thesis.tex" in ours and ours == theirs
