"""Volume probing names what it finds as blkid does, for the filesystems only
libguestfs can read too (so a person is told "f2fs", not "unrecognised")."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from rescue.source.base import FileSource
from rescue.volume.probe import probe

MKFS = {
    "f2fs": ["mkfs.f2fs", "-q", "-l", "data-f2fs"],
    "jfs": ["mkfs.jfs", "-q", "-L", "data-jfs"],
    "reiserfs": ["mkreiserfs", "-q", "-l", "data-reis"],
}


def _blkid(path: str) -> dict[str, str]:
    out = subprocess.run(["blkid", "-p", "-o", "export", path], capture_output=True, text=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@pytest.mark.parametrize("kind", sorted(MKFS))
def test_probe_names_type_label_and_uuid_as_blkid_does(kind, tmp_path):
    tool = MKFS[kind][0]
    if not shutil.which(tool) or not shutil.which("blkid"):
        pytest.skip(f"{tool} or blkid is not installed")
    image = tmp_path / f"{kind}.img"
    with open(image, "wb") as f:
        f.truncate(100 << 20)
    subprocess.run(MKFS[kind] + [str(image)], check=True, capture_output=True)
    expected = _blkid(str(image))
    found = probe(FileSource(str(image)))
    assert (found.type, found.label, found.uuid) == (expected["TYPE"], expected.get("LABEL"), expected.get("UUID"))


def test_random_bytes_are_not_taken_for_a_filesystem(tmp_path):
    image = tmp_path / "noise.img"
    image.write_bytes(bytes((i * 7919) % 251 for i in range(1 << 17)))
    assert probe(FileSource(str(image))).type is None
