"""A file unreadable from its first byte is skipped without a tar member, so an
inode claiming 4 GiB does not turn a 2 MiB image into gigabytes of zero padding.
Found by scripts/sweep-real-images on e2fsprogs' f_bad_inode_csum (inodes 100
and 101: every field 0xff). Skipped when ../shared/real-images is absent."""

from __future__ import annotations

import gzip
import os
import resource
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from repo_paths import REPO

REAL_IMAGES = Path(os.environ.get("RESCUE_REAL_IMAGES", REPO.parent / "shared" / "real-images"))
OUTPUT_LIMIT = 64 << 20


def _limit_output() -> None:   # a regression must fail here, not fill the disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (OUTPUT_LIMIT, OUTPUT_LIMIT))


@pytest.mark.skipif(not (REAL_IMAGES / "INDEX.tsv").exists(), reason=f"{REAL_IMAGES} is absent")
def test_files_unreadable_from_the_start_are_skipped_without_padding_the_tarball(tmp_path):
    image = tmp_path / "f_bad_inode_csum.img"
    image.write_bytes(gzip.open(REAL_IMAGES / "e2fsprogs" / "f_bad_inode_csum.gz").read())
    out = tmp_path / "x.tar"
    proc = subprocess.run([sys.executable, "-m", "rescue", "extract", str(image), "--path", "/", "-o", str(out),
                           "--backend", "tsk"], capture_output=True, text=True, timeout=60, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), preexec_fn=_limit_output)
    assert proc.returncode == 1, proc.stderr[-1000:]
    skipped = {line.split(":")[1].strip() for line in proc.stderr.splitlines() if line.startswith("skipped:")}
    assert {"/100", "/101"} <= skipped
    assert out.stat().st_size < image.stat().st_size
    with tarfile.open(out) as tar:
        names = set(tar.getnames())
    assert "100" not in names and "101" not in names and "1" in names
