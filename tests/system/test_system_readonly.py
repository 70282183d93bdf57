"""The snapshot is never opened for writing, by any command.

Two proofs: every CLI call in the foundation tests hashes its snapshot before and
after (common_support.rescue); and here, as root, every command runs against
the fixtures through a read-only bind mount, where opening a file for writing
fails with EROFS (root ignores file modes, not a read-only mount)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from common_support import FIXTURES, IS_ROOT, SAMPLE, T, explain, rescue, sha256_file


@pytest.fixture(scope="module")
def readonly_fixtures(tmp_path_factory):
    if not IS_ROOT:
        pytest.skip("a read-only bind mount needs root (the hash checks still run everywhere)")
    mnt = tmp_path_factory.mktemp("ro-fixtures")
    subprocess.run(["mount", "--bind", str(FIXTURES), str(mnt)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(mnt)], check=True)
        probe = mnt / "sample-vps.disk"
        with pytest.raises(OSError):
            open(probe, "r+b").close()      # the mount really refuses writers
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


COMMANDS = [
    ("inspect", ["inspect", "{img}"]),
    ("inspect-json", ["inspect", "--json", "{img}"]),
    ("ls", ["ls", "-l", "{img}", T.V]),
    ("cat", ["cat", "{img}", "/etc/fstab"]),
    ("extract-tar", ["extract", "{img}", "--path", T.V, "-o", "{out}/v.tar.zst"]),
    ("extract-dir", ["extract", "{img}", "--path", "/etc", "-o", "{out}/restore/"]),
    ("extract-stdout", ["extract", "{img}", "--path", "/etc", "-o", "-"]),
    ("dry-run", ["extract", "{img}", "--path", "/", "--dry-run", "--list", "-o", "{out}/x.tar"]),
]


@pytest.mark.parametrize("name, args", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_every_command_works_on_a_read_only_snapshot(readonly_fixtures, tmp_path, name, args):
    img = readonly_fixtures / "sample-vps.disk"
    res = rescue(*[a.format(img=img, out=tmp_path) for a in args], snapshot=img)
    assert res.returncode == 0, explain(res)


@pytest.mark.parametrize("image", ["fs/ntfs.img", "fs/mbr.img", "fs/gpt.img", "hostile/sizes.img",
                                   "hostile/truncated.img"])
def test_other_fixtures_are_read_through_a_read_only_mount_too(readonly_fixtures, tmp_path, image):
    img = readonly_fixtures / image
    for args in (["inspect", str(img)], ["extract", str(img), "--volume", "1" if "mbr" in image or "gpt" in image
                                         else "whole", "-o", f"{tmp_path}/out/"]):
        res = rescue(*args, snapshot=img)
        assert res.returncode in (0, 1, 2) and b"Traceback" not in res.stderr, explain(res)
        assert b"Read-only file system" not in res.stderr and b"EROFS" not in res.stderr, explain(res)
        if "truncated" not in image:
            assert res.returncode in (0, 1), explain(res)


def test_the_sample_is_unchanged_after_a_full_extract(tmp_path):
    before = sha256_file(SAMPLE)
    st = SAMPLE.stat()
    res = rescue("extract", str(SAMPLE), "-o", f"{tmp_path}/all/", check_readonly=False)
    assert res.returncode in (0, 1), explain(res)
    assert sha256_file(SAMPLE) == before
    assert SAMPLE.stat().st_mtime_ns == st.st_mtime_ns
    shutil.rmtree(tmp_path / "all")
