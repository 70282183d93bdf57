"""A .tar.gz snapshot cut short (an interrupted provider download, issue 14):
refused in one line that points at --partial; with --partial everything
decompressed before the cut is used: the disk is read as far as it goes, the
files stored there are rescued equal to the whole snapshot's, the rest listed
as skipped. The cut archive's index and member table are never cached, so a
later plain open still refuses."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from repo_paths import REPO
from archive_cut_support import run_cached

SAMPLE = REPO / "fixtures" / "sample-vps.disk"


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("cut-tgz")
    whole = base / "whole.tar.gz"
    with tarfile.open(whole, "w:gz", compresslevel=1) as tf:
        tf.add(SAMPLE, arcname="snapshot.disk")
    cut = base / "cut.tar.gz"
    data = whole.read_bytes()
    cut.write_bytes(data[:len(data) * 6 // 10])
    return whole, cut


def _members(tar: Path) -> dict[str, bytes]:
    with tarfile.open(tar) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}


def test_a_cut_tar_gz_is_refused_in_one_line_pointing_at_partial(snapshots, tmp_path):
    _, cut = snapshots
    code, text = run_cached("ls", str(cut), "/", cache=tmp_path / "cache")
    lines = [line for line in text.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, text
    assert "truncated" in lines[0] and "--partial" in lines[0], lines[0]


def test_partial_rescues_what_was_decompressed_before_the_cut(snapshots, tmp_path):
    whole, cut = snapshots
    cache = tmp_path / "cache"
    ref = tmp_path / "whole.tar"
    code, text = run_cached("extract", str(whole), "-o", str(ref), cache=cache)
    assert code == 0, text
    got = tmp_path / "cut.tar"
    code, text = run_cached("extract", "--partial", str(cut), "-o", str(got), cache=cache)
    assert code == 1 and "internal error" not in text, text
    assert "warning: gzip stream is truncated" in text and "cut short" in text
    skipped = {line.split(": ")[1].lstrip("/") for line in text.splitlines() if line.startswith("skipped: ")}
    want, have = _members(ref), _members(got)
    kept = [name for name in have if name not in skipped]
    assert len(kept) >= 10, kept   # the start of the disk holds most of the files
    for name in kept:
        assert have[name] == want[name], f"{name} differs from the whole snapshot's"
    # the partial open cached nothing: a plain open refuses again
    code, text = run_cached("ls", str(cut), "/", cache=cache)
    assert code == 2 and "--partial" in text, text
