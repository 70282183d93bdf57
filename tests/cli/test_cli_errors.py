"""A person in trouble gets one line naming the file, and the right exit code."""

from __future__ import annotations

import os
import subprocess
import sys

from repo_paths import REPO

ROOT = str(REPO)
SAMPLE = os.path.join(ROOT, "fixtures", "sample-vps.disk")


def rescue(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rescue", *args], capture_output=True, text=True, timeout=120)


def test_a_file_that_is_not_a_disk_image_is_one_clear_error(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("this is not a disk\n" * 100)
    proc = rescue("inspect", str(notes))
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(notes) in lines[0] and "not a disk image" in lines[0]
    assert "Traceback" not in proc.stderr


def test_an_empty_mbr_still_inspects(tmp_path):
    disk = tmp_path / "blank.img"
    disk.write_bytes(bytes(510) + b"\x55\xaa" + bytes(1 << 20))
    assert rescue("inspect", str(disk)).returncode == 0


def test_a_missing_guest_path_names_the_snapshot_and_exits_2(tmp_path):
    proc = rescue("extract", SAMPLE, "--path", "/var/lib/nothing-here", "-o", str(tmp_path / "x.tar"))
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and SAMPLE in lines[0] and "/var/lib/nothing-here" in lines[0]
    assert not (tmp_path / "x.tar").exists() and not (tmp_path / "x.tar.part").exists()


def test_a_tar_is_not_written_to_a_terminal():
    # stdout is a pipe here, so the guard must not trigger: the tar arrives
    proc = subprocess.run([sys.executable, "-m", "rescue", "extract", SAMPLE, "--path", "/etc/hostname", "-o", "-"],
                          capture_output=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout[257:262] == b"ustar"
