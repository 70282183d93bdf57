"""scripts/sweep-real-images keeps working: on two small real images it runs every
command, compares convert with qemu-img, and classifies a malformed image as a
clean error. Skipped when ../shared/real-images is absent."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from repo_paths import REPO

REAL_IMAGES = Path(os.environ.get("RESCUE_REAL_IMAGES", REPO.parent / "shared" / "real-images"))


@pytest.mark.skipif(not (REAL_IMAGES / "INDEX.tsv").exists(), reason=f"{REAL_IMAGES} is absent")
def test_sweep_runs_every_command_and_compares_convert_with_qemu_img():
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "sweep-real-images"), "--images", str(REAL_IMAGES),
                           "--only", "qemu/parallels-v1", "--only", "qemu/fake.parallels", "--no-mutations",
                           "--json", "-j", "2", "--timeout", "30"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    runs = json.loads(proc.stdout)["runs"]
    by = {(r["image"], r["command"]): r for r in runs}
    assert {c for i, c in by if i == "qemu/parallels-v1.bz2"} == {"inspect", "ls", "extract", "convert"}
    assert by[("qemu/parallels-v1.bz2", "inspect")]["verdict"] == "ok"
    if shutil.which("qemu-img"):
        assert by[("qemu/parallels-v1.bz2", "convert")]["extra"]["qemu_img"] == "same"
    fake = [r for r in runs if r["image"] == "qemu/fake.parallels.bz2"]
    assert fake and all(r["verdict"] == "error" and r["code"] == 2 for r in fake)
