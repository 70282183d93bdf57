"""Damaged and wrong files end in one clear line (or a warning), never an
"internal error": regressions found by scripts/sweep-real-images.

Uses ../shared/real-images (skipped when absent; RESCUE_REAL_IMAGES points
elsewhere) with deterministic damage applied in the test."""

from __future__ import annotations

import bz2
import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest

from repo_paths import REPO
from rescue.errors import VolumeError
from rescue.guest import Snapshot, SnapshotOptions

REAL_IMAGES = Path(os.environ.get("RESCUE_REAL_IMAGES", REPO.parent / "shared" / "real-images"))
needs_real = pytest.mark.skipif(not (REAL_IMAGES / "INDEX.tsv").exists(), reason=f"{REAL_IMAGES} is absent")


def rescue(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "rescue", *args], capture_output=True, text=True, timeout=60,
                          env=env, cwd=REPO)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [x for x in proc.stderr.splitlines() if x.strip() and not x.startswith("warning:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.fixture
def dmg_with_damaged_first_chunk(tmp_path) -> Path:
    """qemu's simple-dmg with its first zlib chunk (sector 0 onwards) overwritten."""
    data = bytearray(bz2.open(REAL_IMAGES / "qemu" / "simple-dmg.dmg.bz2").read())
    first_chunk = 5270          # from the image's mish table; a zlib stream starts there
    assert data[first_chunk] == 0x78, "the fixture changed: find the first chunk again"
    data[first_chunk:first_chunk + 64] = b"\xff" * 64
    path = tmp_path / "damaged.dmg"
    path.write_bytes(bytes(data))
    return path


@needs_real
def test_a_dmg_whose_first_block_is_damaged_inspects_with_a_warning(dmg_with_damaged_first_chunk):
    proc = rescue("inspect", str(dmg_with_damaged_first_chunk), "--backend", "tsk")
    assert proc.returncode == 0, proc.stderr
    assert "internal error" not in proc.stderr and "damaged" in proc.stderr
    with Snapshot(str(dmg_with_damaged_first_chunk), SnapshotOptions(backend="tsk")) as snap:
        data = snap.inspect()
    assert data["format"] == "dmg" and any("damaged" in w for w in data["warnings"])


@needs_real
@pytest.mark.parametrize("command", [["ls"], ["extract", "--path", "/", "-o", "{tmp}/x.tar"]])
def test_reading_files_from_a_dmg_with_a_damaged_first_block_is_one_clear_error(dmg_with_damaged_first_chunk,
                                                                                tmp_path, command):
    args = [a.replace("{tmp}", str(tmp_path)) for a in command]
    line = one_error_line(rescue(args[0], str(dmg_with_damaged_first_chunk), *args[1:], "--backend", "tsk"))
    assert str(dmg_with_damaged_first_chunk) in line


def test_python_callers_of_snapshot_inspect_are_told_a_text_file_is_not_a_disk(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("this is not a disk\n" * 100)
    with Snapshot(str(notes), SnapshotOptions(backend="tsk")) as snap:
        with pytest.raises(VolumeError, match="not a disk image") as caught:
            snap.inspect()
    assert caught.value.file == str(notes)


def test_a_blank_disk_with_a_boot_signature_is_still_a_disk(tmp_path):
    disk = tmp_path / "blank.img"
    disk.write_bytes(bytes(510) + b"\x55\xaa" + bytes(1 << 20))
    with Snapshot(str(disk), SnapshotOptions(backend="tsk")) as snap:
        assert snap.inspect()["boot_sector"] is True


@needs_real
def test_listing_an_unreadable_root_directory_is_one_clear_error(tmp_path):
    """e2fsprogs f_badroot: the root inode is a regular file, so / cannot be listed
    (FileReadError from the fs layer, not a RescueError)."""
    image = tmp_path / "f_badroot.img"
    image.write_bytes(gzip.open(REAL_IMAGES / "e2fsprogs" / "f_badroot.gz").read())
    line = one_error_line(rescue("ls", str(image), "/", "--backend", "tsk"))
    assert str(image) in line and "cannot list /" in line
    proc = rescue("extract", str(image), "--path", "/", "-o", str(tmp_path / "x.tar"), "--backend", "tsk")
    assert proc.returncode == 1 and "skipped: /" in proc.stderr and "internal error" not in proc.stderr


@needs_real
def test_a_libtsk_message_with_a_line_break_still_makes_one_error_line(tmp_path):
    """dfvfs ext2.vmdk cut at half (read with --partial: the cut container is
    otherwise refused up front): TSK's reason for / ends in a newline."""
    data = (REAL_IMAGES / "dfvfs" / "ext2.vmdk").read_bytes()
    image = tmp_path / "ext2-half.vmdk"
    image.write_bytes(data[:(len(data) // 2) & ~511])
    line = one_error_line(rescue("ls", str(image), "/", "--backend", "tsk", "--partial"))
    assert "cannot list /" in line and line.rstrip().endswith(")")


def test_one_line_joins_the_lines_of_a_quoted_library_message():
    from rescue.errors import FilesystemError
    exc = FilesystemError("cannot list /: contents: 2\n", file="x.img", hint="look\nthere")
    assert exc.one_line() == "x.img: fs: cannot list /: contents: 2 (hint: look there)"
