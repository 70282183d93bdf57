"""A disk head whose partition table The Sleuth Kit refuses (the download was cut
short, so partitions end past the image; GPT with 4 KiB logical sectors) still
shows its partitions, as sgdisk reads them from the whole disk, and reading files
says "truncated" in one line instead of "not a disk image". Found by
scripts/sweep-real-images on dissect.volume's gpt.bin, gpt_4k.bin and mbr.bin."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from repo_paths import REPO

REAL_IMAGES = Path(os.environ.get("RESCUE_REAL_IMAGES", REPO.parent / "shared" / "real-images"))


def rescue(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rescue", *args, "--backend", "tsk"], capture_output=True,
                          text=True, timeout=60, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))


def sgdisk_partitions(device: Path) -> list[tuple[str, int, int]]:
    """(number, first byte, size in bytes) as sgdisk -p prints them."""
    out = subprocess.run(["sgdisk", "-p", str(device)], capture_output=True, text=True, check=True).stdout
    sector = int(re.search(r"[Ss]ector size \(logical(?:/physical)?\): (\d+)", out).group(1))
    rows = re.findall(r"^\s+(\d+)\s+(\d+)\s+(\d+)\s", out, re.M)
    return [(n, int(a) * sector, (int(b) - int(a) + 1) * sector) for n, a, b in rows]


def our_partitions(image: Path) -> tuple[str, list[tuple[str, int, int]]]:
    proc = rescue("inspect", "--json", str(image))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    return data["partition_table"], [(v["id"], v["start"], v["size"]) for v in data["volumes"]]


@pytest.mark.skipif(not shutil.which("sgdisk"), reason="sgdisk (gdisk) is not installed")
def test_a_gpt_disk_cut_short_after_its_table_shows_the_partitions_sgdisk_sees(tmp_path):
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["sgdisk", "-n", "1:2048:+8M", "-t", "1:ef00", "-n", "2:0:0", "-t", "2:8300", str(disk)],
                   check=True, capture_output=True)
    reference = sgdisk_partitions(disk)
    with open(disk, "r+b") as f:
        f.truncate(32 << 10)      # only the protective MBR, the GPT header and entries arrived
    kind, ours = our_partitions(disk)
    assert kind == "gpt" and ours == reference
    proc = rescue("ls", str(disk))
    lines = [x for x in proc.stderr.splitlines() if x.strip() and not x.startswith("warning:")]
    assert proc.returncode == 2 and len(lines) == 1 and "truncated" in lines[0] and str(disk) in lines[0]


@pytest.mark.skipif(not shutil.which("sfdisk"), reason="sfdisk is not installed")
def test_an_mbr_sector_alone_shows_its_primaries_as_sfdisk_does(tmp_path):
    disk = tmp_path / "mbr.img"
    with open(disk, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["sfdisk", "-q", str(disk)], input="2048,8192,83\n,,7\n", text=True, check=True,
                   capture_output=True)
    table = json.loads(subprocess.run(["sfdisk", "-J", str(disk)], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]
    reference = [(p["node"][len(str(disk)):], p["start"] * 512, p["size"] * 512) for p in table["partitions"]]
    with open(disk, "r+b") as f:
        f.truncate(512)
    kind, ours = our_partitions(disk)
    assert kind == "mbr" and ours == reference
    assert "truncated" in rescue("extract", str(disk), "-o", str(tmp_path / "x.tar")).stderr


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("sgdisk") or not shutil.which("losetup"),
                    reason="needs root, sgdisk and losetup (a loop device with 4 KiB sectors is the reference)")
@pytest.mark.skipif(not (REAL_IMAGES / "INDEX.tsv").exists(), reason=f"{REAL_IMAGES} is absent")
def test_a_gpt_with_4k_sectors_is_read_like_sgdisk_on_a_4k_loop_device(tmp_path):
    head = REAL_IMAGES / "dissect.volume" / "gpt_4k.bin"     # 32 KiB of a 4 KiB-sector disk
    kind, ours = our_partitions(head)
    image = tmp_path / "gpt_4k.img"
    shutil.copyfile(head, image)
    with open(image, "r+b") as f:      # the loop device needs the whole disk the table describes
        f.truncate(4192 * 4096)
    loop = subprocess.run(["losetup", "--find", "--show", "--read-only", "--sector-size", "4096", str(image)],
                          capture_output=True, text=True)
    if loop.returncode != 0:
        pytest.skip(f"losetup: {loop.stderr.strip()}")
    try:
        reference = sgdisk_partitions(Path(loop.stdout.strip()))
    finally:
        subprocess.run(["losetup", "-d", loop.stdout.strip()], check=True)
    assert kind == "gpt" and ours == reference and len(ours) == 3
