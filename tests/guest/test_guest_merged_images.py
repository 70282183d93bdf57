"""The guest as one tree, end to end on real disk images (sgdisk, mkfs.ext4 -d,
and the LVM fixture written by the kernel): /var/lib/docker/volumes is rescued
whether /var lives on the root filesystem, its own partition, or its own LV."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import pytest

from repo_paths import REPO
from rescue.fs.tsk import TskFileSystem
from rescue.guest import open_snapshot
from rescue.guest.merged import build_mount_table
from rescue.volume import discover

FIX = REPO / "fixtures" / "lvm"
MiB = 1 << 20

VOLUME_FILES = {
    "lib/docker/volumes/db/_data/pg_hba.conf": b"host all all 0.0.0.0/0 md5\n",
    "lib/docker/volumes/db/_data/base/1/1259": bytes(range(256)) * 40,
    "lib/docker/volumes/web/_data/index.html": b"<h1>still here</h1>\n",
}


def _need(*tools: str) -> None:
    for tool in tools:
        if not shutil.which(tool):
            pytest.skip(f"{tool} not installed")


def _write_tree(base: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = base / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def _mkext4(img: Path, size: int, files: dict[str, bytes], fs_uuid: str, dirs: tuple[str, ...] = ()) -> Path:
    tree = img.with_suffix(".tree")
    tree.mkdir()
    _write_tree(tree, files)
    for d in dirs:
        (tree / d).mkdir(parents=True, exist_ok=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "1024", "-U", fs_uuid, "-E", "root_owner=0:0",
                    "-d", str(tree), str(img), str(size // 1024) + "k"], check=True, capture_output=True)
    return img


def _gpt(disk: Path, parts: list[tuple[Path, str, str]]) -> None:
    """A GPT disk with the given partition images (image, type code, partition GUID)."""
    total = 2 * MiB + sum((p.stat().st_size + MiB - 1) // MiB * MiB for p, _, _ in parts)
    with open(disk, "wb") as f:
        f.truncate(total)
    args = ["sgdisk", "-Z"]
    for i, (img, code, guid) in enumerate(parts, 1):
        args += [f"-n{i}:0:+{img.stat().st_size // 1024}K", f"-t{i}:{code}", f"-u{i}:{guid}"]
    subprocess.run(args + [str(disk)], check=True, capture_output=True)
    out = subprocess.run(["sfdisk", "--json", str(disk)], check=True, capture_output=True, text=True).stdout
    table = json.loads(out)["partitiontable"]
    with open(disk, "r+b") as f:
        for (img, _, _), part in zip(parts, table["partitions"]):
            f.seek(part["start"] * 512)
            f.write(img.read_bytes())


def _root_files(fstab: str) -> dict[str, bytes]:
    return {"etc/fstab": fstab.encode(), "etc/os-release": b'ID=debian\nPRETTY_NAME="Debian 12"\n',
            "etc/hostname": b"web1\n"}


@pytest.fixture(scope="session")
def layouts(tmp_path_factory) -> dict[str, Path]:
    _need("sgdisk", "sfdisk", "mkfs.ext4")
    base = tmp_path_factory.mktemp("layouts")
    out: dict[str, Path] = {}
    root_uuid = str(uuid.uuid4())
    # 1. /var on the root filesystem.
    d = base / "onroot"
    d.mkdir()
    files = _root_files(f"UUID={root_uuid} / ext4 errors=remount-ro 0 1\n/swapfile none swap sw 0 0\n"
                        "proc /proc proc defaults 0 0\n")
    files.update({f"var/{k}": v for k, v in VOLUME_FILES.items()})
    _gpt(d / "disk.img", [(_mkext4(d / "root.ext4", 6 * MiB, files, root_uuid), "8300", str(uuid.uuid4()))])
    out["onroot"] = d / "disk.img"
    # 2. /var on its own partition (found by PARTUUID); the root's /var holds a stale copy.
    d = base / "varpart"
    d.mkdir()
    var_guid = str(uuid.uuid4())
    files = _root_files(f"UUID={root_uuid} / ext4 defaults 0 1\nPARTUUID={var_guid} /var ext4 defaults 0 2\n")
    files["var/lib/docker/volumes/STALE"] = b"the root's copy, hidden by the mount\n"
    _gpt(d / "disk.img", [(_mkext4(d / "root.ext4", 3 * MiB, files, root_uuid), "8300", str(uuid.uuid4())),
                          (_mkext4(d / "var.ext4", 4 * MiB, VOLUME_FILES, str(uuid.uuid4())), "8300", var_guid)])
    out["varpart"] = d / "disk.img"
    # 3. /boot partition + LVM: / and /var on LVs (the kernel-written fixture PV),
    #    / by UUID=, /var by its /dev/mapper name, /boot by PARTUUID.
    d = base / "varlv"
    d.mkdir()
    boot_guid = str(uuid.uuid4())
    pv = d / "pv.img"
    with gzip.open(FIX / "single.img.gz") as f:
        pv.write_bytes(f.read())
    expected = json.loads((FIX / "expected.json").read_text())
    pe_start = int(expected["report"][1]["report"][0]["pv"][0]["pe_start"].rstrip("B"))
    where = {}
    for row in expected["report"][0]["report"][0]["lv"]:
        if row["vg_name"] == "fixvg" and row["lv_name"] in ("root", "data"):
            extent = int(row["lv_size"].rstrip("B")) // int(row["seg_size_pe"])
            first = int(row["seg_pe_ranges"].split(":")[1].split("-")[0])
            where[row["lv_name"]] = (pe_start + first * extent, int(row["lv_size"].rstrip("B")))
    files = _root_files(f"UUID={root_uuid} / ext4 defaults 0 1\n/dev/mapper/fixvg-data /var ext4 defaults 0 2\n"
                        f"PARTUUID={boot_guid} /boot ext4 defaults 0 2\n/dev/mapper/fixvg-thin /srv ext4 defaults 0 2\n")
    root_img = _mkext4(d / "root.ext4", where["root"][1], files, root_uuid, dirs=("var", "boot", "srv"))
    var_img = _mkext4(d / "var.ext4", where["data"][1], VOLUME_FILES, str(uuid.uuid4()))
    with open(pv, "r+b") as f:   # at the extents `lvs` reported, not where our reader says
        for name, img in (("root", root_img), ("data", var_img)):
            f.seek(where[name][0])
            f.write(img.read_bytes())
    boot = _mkext4(d / "boot.ext4", 2 * MiB, {"vmlinuz-6.1": b"kernel"}, str(uuid.uuid4()))
    _gpt(d / "disk.img", [(boot, "8300", boot_guid), (pv, "8E00", str(uuid.uuid4()))])
    out["varlv"] = d / "disk.img"
    return out


def _volumes_tree(fs) -> dict[str, bytes]:
    got = {}
    for e in fs.walk("/var/lib/docker/volumes"):
        if e.kind == "file":
            got["var/" + e.path.split("/var/", 1)[1]] = b"".join(fs.read_chunks(e))
    return got


WANT = {f"var/{k}": v for k, v in VOLUME_FILES.items()}


@pytest.mark.parametrize("layout", ["onroot", "varpart", "varlv"])
def test_docker_volumes_are_found_wherever_var_lives(layouts, layout):
    snap = open_snapshot(str(layouts[layout]))
    fs = snap.filesystem()
    assert _volumes_tree(fs) == WANT
    assert fs.read_file("/etc/hostname") == b"web1\n"
    rows = {r["mountpoint"]: r for r in snap.mounts}
    assert rows["/"]["status"] == "mounted"
    if layout == "varpart":
        assert rows["/var"]["status"] == "mounted" and rows["/var"]["volume"] == "2"
    if layout == "varlv":
        assert rows["/var"]["volume"] == "fixvg/data" and rows["/var"]["status"] == "mounted"
        assert rows["/boot"]["volume"] == "1"
        assert fs.read_file("/boot/vmlinuz-6.1") == b"kernel"
        assert rows["/srv"]["volume"] == "fixvg/thin" and rows["/srv"]["status"].startswith("failed:")
        assert "thin" in rows["/srv"]["status"]


def test_merged_tree_over_tsk_filesystems(layouts):
    """The pieces without the guest layer: discover, TSK, build_mount_table."""
    from rescue.source import FileSource

    vmap = discover(FileSource(layouts["varlv"]))
    root_vol = vmap.find("fixvg/root")
    root = TskFileSystem(root_vol.source)
    rows, tree = build_mount_table(root, vmap.volumes, lambda v: TskFileSystem(v.source))
    assert {r.mountpoint: r.status for r in rows}["/var"] == "mounted"
    listing = {e.name: e for e in tree.listdir("/var")}
    assert set(listing) == {"lib", "lost+found"}
    assert listing["lib"].dev != tree.stat("/etc").dev
    keys = [(e.dev, e.inode) for e in tree.walk("/")]
    assert len(keys) == len(set(keys))
    assert _volumes_tree(tree) == WANT


def test_stale_files_under_a_mountpoint_stay_hidden(layouts):
    fs = open_snapshot(str(layouts["varpart"])).filesystem()
    names = {e.name for e in fs.listdir("/var/lib/docker/volumes")}
    assert names == {"db", "web"}


def test_volume_option_still_reads_one_filesystem(layouts):
    from rescue.guest import SnapshotOptions

    fs = open_snapshot(str(layouts["varpart"]), SnapshotOptions(volume="1")).filesystem()
    assert {e.name for e in fs.listdir("/var/lib/docker/volumes")} == {"STALE"}


@pytest.mark.parametrize("layout", ["onroot", "varpart", "varlv"])
def test_cli_extracts_docker_volumes(layouts, layout, tmp_path):
    out = tmp_path / "out.tar"
    run = subprocess.run([sys.executable, "-m", "rescue", "extract", str(layouts[layout]),
                          "--path", "/var/lib/docker/volumes", "-o", str(out)],
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    got = {}
    with tarfile.open(out) as tar:
        for m in tar.getmembers():
            if m.isfile():
                got[m.name.lstrip("./")] = tar.extractfile(m).read()
    assert got == WANT
