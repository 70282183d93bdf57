"""Containers recognised but not read (rescue/disk/unsupported.py): one clear
line naming the format and how to convert it, not "not a disk image"."""

from __future__ import annotations

import gzip
import shutil
import subprocess

import pytest

from common_support import REAL_IMAGES, rescue


def _one_line(res) -> str:
    err = res.stderr.decode()
    assert res.returncode == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_apple_asif_is_named(tmp_path):
    src = REAL_IMAGES / "dissect.hypervisor" / "asif_basic.asif.gz"
    if not src.exists():
        pytest.skip(f"{src} is absent")
    image = tmp_path / "basic.asif"
    image.write_bytes(gzip.decompress(src.read_bytes()))
    for command in ("inspect", "ls"):
        err = _one_line(rescue(command, str(image)))
        assert "Apple sparse image (ASIF" in err and "not a disk image" not in err, err


def test_qed_made_by_qemu_img_is_named(tmp_path):
    if shutil.which("qemu-img") is None:
        pytest.skip("needs qemu-img")
    image = tmp_path / "disk.qed"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qed", str(image), "8M"], check=True)
    err = _one_line(rescue("extract", str(image), "--path", "/etc", "-o", str(tmp_path / "x.tar")))
    assert "QEMU Enhanced Disk (QED)" in err and "qemu-img convert -O raw" in err, err
    assert not (tmp_path / "x.tar").exists()


def test_ewf_head_is_named(tmp_path):
    image = tmp_path / "case.E01"
    image.write_bytes(b"EVF\x09\x0d\x0a\xff\x00" + bytes(4096))   # the EWF signature, as ewfacquire writes it
    err = _one_line(rescue("inspect", "--json", str(image)))
    assert "EnCase/EWF forensic image" in err, err
