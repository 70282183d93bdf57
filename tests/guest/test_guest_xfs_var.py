"""A CentOS-style server: ext4 root, /var on its own XFS partition named by
UUID in /etc/fstab. `rescue extract --path /var/lib/docker/volumes` must find
the volumes on the XFS partition (read through libguestfs, chosen by itself).

Built with the real tools (sgdisk, mkfs.ext4 -d, mkfs.xfs, a loop mount to
fill the XFS); one libguestfs appliance start, so this is the slow one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import uuid

import pytest

from rescue.fs.guestfs import guestfs_unavailable

ROOT = os.geteuid() == 0
MiB = 1 << 20

pytestmark = [
    pytest.mark.skipif(not ROOT, reason="filling an XFS image needs a loop mount (root)"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in ("mkfs.xfs", "sgdisk", "mkfs.ext4")),
                       reason="mkfs.xfs, sgdisk and mkfs.ext4 are needed"),
]


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def server_disk(tmp_path_factory):
    why = guestfs_unavailable()
    if why:
        pytest.skip(f"libguestfs backend unavailable: {why}")
    base = tmp_path_factory.mktemp("xfsvar")
    var_uuid = str(uuid.uuid4())
    root_tree = base / "root"
    (root_tree / "etc").mkdir(parents=True)
    (root_tree / "var").mkdir()
    (root_tree / "etc" / "os-release").write_text('ID=rocky\nPRETTY_NAME="Rocky Linux 9.3 (Blue Onyx)"\n')
    (root_tree / "etc" / "fstab").write_text(
        f"UUID={var_uuid} /var xfs defaults 0 0\n/dev/mapper/rl-swap none swap defaults 0 0\n")
    root_img, var_img = base / "root.img", base / "var.img"
    for img, size in ((root_img, 16 * MiB), (var_img, 320 * MiB)):
        with open(img, "wb") as f:
            f.truncate(size)
    _run("mkfs.ext4", "-q", "-F", "-d", str(root_tree), str(root_img))
    _run("mkfs.xfs", "-q", "-f", "-m", f"uuid={var_uuid}", str(var_img))
    expected = {}
    mnt = base / "mnt"
    mnt.mkdir()
    _run("mount", "-o", "loop", str(var_img), str(mnt))
    try:
        vol = mnt / "lib" / "docker" / "volumes" / "app_db" / "_data"
        vol.mkdir(parents=True)
        for name, data in (("PG_VERSION", b"16\n"), ("base.dat", os.urandom(300_000))):
            (vol / name).write_bytes(data)
            expected[f"var/lib/docker/volumes/app_db/_data/{name}"] = hashlib.sha256(data).hexdigest()
        os.chown(vol / "PG_VERSION", 999, 999)
        os.symlink("PG_VERSION", vol / "version-link")
    finally:
        _run("umount", str(mnt))
    disk = base / "server.img"
    with open(disk, "wb") as f:
        f.truncate(340 * MiB)
    _run("sgdisk", "-o", "-n", "1:2048:+16M", "-t", "1:8300", "-n", "2:0:+320M", "-t", "2:8300", str(disk))
    _run("dd", f"if={root_img}", f"of={disk}", "bs=1M", "seek=1", "conv=notrunc,sparse", "status=none")
    _run("dd", f"if={var_img}", f"of={disk}", "bs=1M", "seek=17", "conv=notrunc,sparse", "status=none")
    return disk, expected


def test_extracts_docker_volumes_from_a_separate_xfs_var(server_disk, tmp_path):
    disk, expected = server_disk
    out = tmp_path / "vols.tar"
    before = hashlib.sha256(disk.read_bytes()).hexdigest()
    proc = subprocess.run([sys.executable, "-m", "rescue", "extract", str(disk),
                           "--path", "/var/lib/docker/volumes", "-o", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    with tarfile.open(out) as tf:
        got = {m.name: hashlib.sha256(tf.extractfile(m).read()).hexdigest() for m in tf.getmembers() if m.isfile()}
        link = tf.getmember("var/lib/docker/volumes/app_db/_data/version-link")
        owner = tf.getmember("var/lib/docker/volumes/app_db/_data/PG_VERSION")
    assert got == expected
    assert link.issym() and link.linkname == "PG_VERSION"
    assert (owner.uid, owner.gid) == (999, 999)
    assert hashlib.sha256(disk.read_bytes()).hexdigest() == before   # read-only
