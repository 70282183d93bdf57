"""A volume no reader can open is named as such: never "no such file or
directory" for the paths on it, never The Sleuth Kit's "Possible encryption
detected (High entropy)" guess; `inspect` shows used/free of every volume a
reader opens. Real disks: GPT by sgdisk, an ext4 root by
mkfs.ext4 -d whose fstab mounts /var from an XFS partition (mkfs.xfs), read
with --backend tsk (TSK has no XFS); a partition of random bytes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from repo_paths import REPO

MiB = 1 << 20
pytestmark = pytest.mark.skipif(any(shutil.which(t) is None for t in ("sgdisk", "mkfs.ext4", "mkfs.xfs")),
                                reason="sgdisk, mkfs.ext4 and mkfs.xfs are needed")


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def rescue(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rescue", *args], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="200"))


@pytest.fixture(scope="module")
def disk(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("unreadable")
    var_uuid = str(uuid.uuid4())
    root = base / "root"
    (root / "etc").mkdir(parents=True)
    (root / "var" / "lib").mkdir(parents=True)   # the (empty) mountpoint underneath
    (root / "etc" / "os-release").write_text('ID=rocky\nPRETTY_NAME="Rocky Linux 9.3"\n')
    (root / "etc" / "fstab").write_text(f"UUID={var_uuid} /var xfs defaults 0 0\n")
    root_img, var_img = base / "root.img", base / "var.img"
    for img, size in ((root_img, 16 * MiB), (var_img, 300 * MiB)):
        with open(img, "wb") as f:
            f.truncate(size)
    _run("mkfs.ext4", "-q", "-F", "-d", str(root), str(root_img))
    _run("mkfs.xfs", "-q", "-f", "-m", f"uuid={var_uuid}", str(var_img))
    out = base / "server.img"
    with open(out, "wb") as f:
        f.truncate(340 * MiB)
    _run("sgdisk", "-o", "-n", "1:2048:+16M", "-t", "1:8300", "-n", "2:0:+300M", "-t", "2:8300",
         "-n", "3:0:+4M", "-t", "3:8300", str(out))
    _run("dd", f"if={root_img}", f"of={out}", "bs=1M", "seek=1", "conv=notrunc,sparse", "status=none")
    _run("dd", f"if={var_img}", f"of={out}", "bs=1M", "seek=17", "conv=notrunc,sparse", "status=none")
    with open(out, "r+b") as f:   # partition 3: random bytes (what TSK calls "high entropy")
        f.seek(317 * MiB)
        f.write(os.urandom(4 * MiB))
    return out


def test_a_path_on_a_volume_no_reader_opens_says_so(disk, tmp_path):
    res = rescue("extract", str(disk), "--backend", "tsk", "--path", "/var/lib", "-o", str(tmp_path / "x.tar"))
    lines = [line for line in res.stderr.splitlines() if line.startswith("rescue:")]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "volume 2 holds xfs, which no reader here can open" in lines[0], lines
    assert "no such file" not in res.stderr and "Traceback" not in res.stderr


def test_extracting_everything_counts_the_unreadable_mount_as_skipped(disk, tmp_path):
    res = rescue("extract", str(disk), "--backend", "tsk", "--path", "/", "-o", str(tmp_path / "x.tar"), "--json")
    assert res.returncode == 1, res.stderr
    skipped = json.loads(res.stdout)["skipped"]
    assert [s["path"] for s in skipped] == ["/var"], skipped
    assert "holds xfs, which no reader here can open" in skipped[0]["reason"]


def test_random_bytes_are_unrecognised_content_not_encryption(disk):
    res = rescue("inspect", str(disk), "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    rows = {v["id"]: v for v in data["volumes"]}
    assert rows["2"]["filesystem"] == "xfs" and rows["2"].get("backend") == "xfs"   # read natively by default
    # used and free as the reader counts them, for XFS as for ext4 (the probe knows ext's only)
    for vid in ("1", "2"):
        details = rows[vid]["details"]
        assert details["used"] > 0 and details["free"] > 0 and details["used"] + details["free"] <= rows[vid]["size"]
    assert "encryption" not in res.stdout.lower() and "entropy" not in res.stdout.lower()
    # asked of The Sleuth Kit alone, the random partition is what it is
    with pytest.raises(Exception) as raised:
        from rescue.fs.tsk import TskFileSystem
        from rescue.source.base import FileSource, Window
        TskFileSystem(Window(FileSource(str(disk)), 317 * MiB, 4 * MiB))
    assert "unrecognised or unsupported filesystem content" in str(raised.value)
