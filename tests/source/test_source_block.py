"""Block devices as a source: `losetup -r` of the bundled sample disk must read
exactly like the image file (inspect, ls, cat, extract), with the size taken from
the device, reads aligned to its logical sector, and clear lines for a device the
user may not read and for a filesystem mounted read-write underneath."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from repo_paths import REPO
from common_support import IS_ROOT, SAMPLE, assert_one_line_error, explain, loop_device, rescue, tar_view
from rescue.source import open_source
from rescue.source.block import BlockDeviceSource, is_block_device

pytestmark = pytest.mark.skipif(not IS_ROOT or not shutil.which("losetup"),
                                reason="needs root and losetup to attach loop devices")


def _inspect_json(spec: str) -> dict:
    res = rescue("inspect", spec, "--json")
    assert res.returncode == 0, explain(res)
    data = json.loads(res.stdout)
    data.pop("snapshot")
    return data


def test_loop_device_is_claimed_and_sized_from_the_device():
    with loop_device(SAMPLE, "-r") as dev:
        assert is_block_device(dev)
        assert not is_block_device(str(SAMPLE))
        src = open_source(dev)
        try:
            assert isinstance(src, BlockDeviceSource)
            assert src.size == SAMPLE.stat().st_size   # st_size of the device node is 0
            assert src.sector_size == 512
        finally:
            src.close()


def test_reads_are_widened_to_4k_logical_sectors():
    with loop_device(SAMPLE, "-r", "--sector-size", "4096") as dev:
        src = BlockDeviceSource(dev)
        try:
            assert src.sector_size == 4096
            data = SAMPLE.read_bytes()
            for offset, length in [(0, 1), (1000, 5000), (4095, 2), (12345, 70000), (len(data) - 3, 10)]:
                assert src.read(offset, length) == data[offset:offset + length], (offset, length)
        finally:
            src.close()


def test_inspect_ls_cat_extract_equal_the_image_file(tmp_path):
    with loop_device(SAMPLE, "-r") as dev:
        assert _inspect_json(dev) == _inspect_json(str(SAMPLE))
        for args in (("ls", "-l", "/etc"), ("ls", "--json", "/var/lib/docker/volumes"), ("cat", "/etc/fstab")):
            via_dev, via_file = rescue(args[0], dev, *args[1:]), rescue(args[0], str(SAMPLE), *args[1:])
            assert via_dev.returncode == 0, explain(via_dev)
            assert via_dev.stdout == via_file.stdout and via_dev.stdout
        out_dev, out_file = tmp_path / "dev.tar", tmp_path / "file.tar"
        for spec, out in ((dev, out_dev), (str(SAMPLE), out_file)):
            res = rescue("extract", spec, "--path", "/var/lib/docker/volumes", "--path", "/etc", "-o", str(out))
            assert res.returncode == 0, explain(res)
        got, want = tar_view(out_dev), tar_view(out_file)
        assert got.recs == want.recs and len(want.recs) > 20


def test_a_device_the_user_may_not_read_says_how_to_fix_it():
    if not shutil.which("setpriv"):
        pytest.skip("needs setpriv to drop privileges")
    with loop_device(SAMPLE, "-r") as dev:
        os.chmod(dev, 0o660)
        repo = REPO
        python = repo / ".venv" / "bin" / "python"
        res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                              str(python), "-m", "rescue", "inspect", dev],
                             capture_output=True, cwd="/", env=dict(os.environ, PYTHONPATH=str(repo), HOME="/tmp"))
        if b"Permission denied" in res.stderr and b"python" in res.stderr:
            pytest.skip("the unprivileged user cannot run the project's python")
        assert_one_line_error(res)
        assert b"permission denied" in res.stderr and b"disk group" in res.stderr, res.stderr


def test_a_filesystem_mounted_read_write_on_the_device_is_warned_about(tmp_path):
    # This kernel has no partition nodes for loop devices (no udev) and no device
    # mapper, so the device is a loop over partition 3's byte range.
    copy = tmp_path / "disk.img"
    shutil.copyfile(SAMPLE, copy)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with loop_device(copy, "-o", str(6291456), "--sizelimit", str(26 << 20)) as dev:
        if subprocess.run(["mount", "-t", "ext4", dev, str(mnt)], capture_output=True).returncode != 0:
            pytest.skip("cannot mount the loop device")
        try:
            src = BlockDeviceSource(dev)
            src.close()
            assert any(dev in n and "mounted read-write" in n for n in src.notes), src.notes
            res = rescue("extract", dev, "--path", "/etc", "--dry-run", check_readonly=False)
            assert res.returncode == 0, explain(res)
            assert b"mounted read-write" in res.stderr
            res = rescue("inspect", dev, "--json", check_readonly=False)
            assert any("mounted read-write" in w for w in json.loads(res.stdout)["warnings"]), explain(res)
        finally:
            subprocess.run(["umount", str(mnt)], check=False)
        subprocess.run(["mount", "-t", "ext4", "-o", "ro", dev, str(mnt)], check=True)
        try:
            src = BlockDeviceSource(dev)   # mounted read-only: nothing to say
            src.close()
            assert src.notes == []
        finally:
            subprocess.run(["umount", str(mnt)], check=False)
