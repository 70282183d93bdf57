"""Hostile images (fixtures/hostile/, crafted with debugfs and a dirent patcher by
scripts/make-fixtures): whatever the names and links inside say, nothing is
written outside the target, links are stored and never followed, privileges are
not handed out, damaged files are skipped and reported, broken images give one
clear line and exit code 2.

names.img holds (all in /): 'a/b/c/d', '../../../esc' and 'n\\0l' (names patched
into dirents, hard links to payload.txt "ESCAPED"), a second '..' entry pointing
at payload.txt, '...', symlinks shadow -> /etc/shadow, up -> ../../../../../../../..
/tmp/rescue-hostile-sentinel/up-written, abs-sentinel -> the sentinel, 'trap' ->
the sentinel AND a directory also named 'trap' holding 'evil' (same for 'rtrap'
with a relative escape), device nodes sda (b 8,0) and mem (c 1,1), a FIFO,
suid-root (04755, uid 0) and sgid (02755).
sizes.img: absurd (i_size 2^60, no blocks), pastend (first extent at block
0x7ffffff0 of a 2048-block fs), zz-after.txt (20000 bytes, must be rescued).
"""

from __future__ import annotations

import hashlib
import os
import resource
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from repo_paths import REPO
from common_support import (HOSTILE, IS_ROOT, SAMPLE, T, assert_one_line_error, dir_view, explain, rescue,
                                tar_view)

SENTINEL = Path(T.HOSTILE_SENTINEL)
NAMES = HOSTILE / "names.img"
SIZES = HOSTILE / "sizes.img"
PAYLOAD = b"ESCAPED\n"


def _limit_memory_and_output() -> None:
    # 1.5 GiB of address space: a reader that allocates a file's claimed size dies here;
    # 16 MiB of output: one that streams 2^60 zeros gets SIGXFSZ instead of filling the disk.
    resource.setrlimit(resource.RLIMIT_AS, (1536 << 20, 1536 << 20))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))


def _snapshot_of(path: Path) -> dict[str, tuple]:
    """Names, kinds and content hashes under `path` (to prove nothing appeared there)."""
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = os.path.join(root, name)
            st = os.lstat(p)
            digest = None
            if stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(Path(p).read_bytes()).hexdigest()
            out[os.path.relpath(p, path)] = (stat.S_IFMT(st.st_mode), digest)
    return out


@pytest.fixture
def sentinel():
    """The directory the hostile symlinks point at: must stay empty."""
    if SENTINEL.is_symlink() or (SENTINEL.exists() and not SENTINEL.is_dir()):
        pytest.skip(f"{SENTINEL} exists and is not a directory")
    SENTINEL.mkdir(exist_ok=True)
    before = _snapshot_of(SENTINEL)
    shadow = hashlib.sha256(Path("/etc/shadow").read_bytes()).hexdigest() if os.access("/etc/shadow", os.R_OK) else None
    yield SENTINEL
    assert _snapshot_of(SENTINEL) == before, f"something was written into {SENTINEL}"
    if shadow:
        assert hashlib.sha256(Path("/etc/shadow").read_bytes()).hexdigest() == shadow


def _extract_to_dir(image: Path, parent: Path, *extra: str):
    """Extract into parent/out/ inside an otherwise empty parent; return (result, out)."""
    parent.mkdir(parents=True, exist_ok=True)
    assert os.listdir(parent) == []
    out = parent / "out"
    res = rescue("extract", str(image), "--path", "/", "-o", f"{out}/", *extra, timeout=60)
    assert b"Traceback" not in res.stderr, explain(res)
    assert os.listdir(parent) == ["out"], f"written beside the target: {os.listdir(parent)}"
    return res, out


def _payload_copies(out: Path) -> list[str]:
    found = []
    for root, _dirs, files in os.walk(out):
        for name in files:
            p = os.path.join(root, name)
            if not os.path.islink(p) and os.path.isfile(p) and Path(p).read_bytes() == PAYLOAD:
                found.append(os.path.relpath(p, out))
    return found


def test_crafted_names_and_links_never_escape_a_directory_target(tmp_path, sentinel):
    res, out = _extract_to_dir(NAMES, tmp_path / "work")
    assert res.returncode in (0, 1), explain(res)
    assert (out / "ok.txt").read_bytes() == b"this file must be rescued\n"
    # Every real path under out/ resolves inside out/ (names with '/', '..', NUL included).
    for root, dirs, files in os.walk(out):
        for name in dirs + files:
            p = Path(root, name)
            assert os.path.commonpath([os.path.realpath(p.parent), os.path.realpath(out)]) == os.path.realpath(out), p
            assert "\0" not in name
    assert not (tmp_path / "esc").exists() and not Path("/tmp/esc").exists()
    # The payload reached through crafted names lands inside the target or is reported.
    copies = _payload_copies(out)
    assert "payload.txt" in copies


@pytest.mark.parametrize("kind", ["dir", "tar"])
def test_names_with_slashes_are_skipped_and_reported(tmp_path, sentinel, kind):
    """README: names with '/', NUL, '.' or '..' are skipped and reported; the report
    shows a NUL as \\x00 (a raw control byte would garble the terminal)."""
    out = tmp_path / ("out/" if kind == "dir" else "h.tar")
    res = rescue("extract", str(NAMES), "--path", "/", "-o", str(out) + ("/" if kind == "dir" else ""))
    assert res.returncode == 1, explain(res)
    assert b"\0" not in res.stderr, res.stderr
    err = res.stderr.decode(errors="replace")
    assert "a/b/c/d" in err and "../../../esc" in err and "skipped: /n\\x00l: unsafe name" in err, err
    names = set(dir_view(out).recs if kind == "dir" else tar_view(out).recs)
    assert not {"d", "esc", "a/b/c/d", "esc"} & names, sorted(names)


def test_symlinks_are_created_as_symlinks_and_never_followed(tmp_path, sentinel):
    res, out = _extract_to_dir(NAMES, tmp_path / "work")
    want = {"shadow": "/etc/shadow", "abs-sentinel": str(SENTINEL), "trap": str(SENTINEL),
            "up": f"../../../../../../../..{SENTINEL}/up-written", "rtrap": f"../../../../../../../..{SENTINEL}"}
    for name, target in want.items():
        st = os.lstat(out / name)
        assert stat.S_ISLNK(st.st_mode), f"{name} is not a symlink"
        assert os.readlink(out / name) == target
    assert not (SENTINEL / "evil").exists() and not (SENTINEL / "up-written").exists()


def test_a_directory_hidden_behind_a_symlink_of_the_same_name_is_reported(tmp_path, sentinel):
    """'trap' is both a symlink to the sentinel and a directory holding 'evil': the
    directory cannot be written through the link; it must be reported (exit 1)."""
    res, out = _extract_to_dir(NAMES, tmp_path / "work")
    assert res.returncode == 1, explain(res)
    assert b"trap" in res.stderr


def test_tar_of_a_hostile_image_has_only_safe_member_names(tmp_path, sentinel):
    out = tmp_path / "h.tar"
    res = rescue("extract", str(NAMES), "--path", "/", "-o", str(out))
    assert res.returncode in (0, 1), explain(res)
    with tarfile.open(out) as tf:
        members = tf.getmembers()
    names = [m.name.rstrip("/") for m in members]
    assert len(names) == len(set(names)), "duplicate member names"
    links = {m.name for m in members if m.issym()}
    for name in names:
        parts = name.split("/")
        assert not name.startswith("/") and ".." not in parts and "\0" not in name, name
        # nothing is stored "inside" a symlink member (tar -x would follow the link)
        assert not any("/".join(parts[:i]) in links for i in range(1, len(parts))), name


def test_device_nodes_need_root_and_devices_flag(tmp_path, sentinel):
    res, out = _extract_to_dir(NAMES, tmp_path / "plain")
    kinds = {p: r.kind for p, r in dir_view(out).recs.items()}
    assert "char" not in kinds.values() and "block" not in kinds.values()
    assert b"device" in res.stderr.lower(), "skipped device nodes must be reported"
    if not IS_ROOT:
        return
    res, out = _extract_to_dir(NAMES, tmp_path / "devices", "--devices")
    recs = dir_view(out).recs
    assert (recs["sda"].kind, recs["sda"].rdev) == ("block", (8, 0))
    assert (recs["mem"].kind, recs["mem"].rdev) == ("char", (1, 1))


def test_setuid_is_dropped_in_a_directory_but_kept_in_a_tar(tmp_path, sentinel):
    res, out = _extract_to_dir(NAMES, tmp_path / "work")
    # as root it would be a setuid-root program; as a user, one running as that user
    assert os.lstat(out / "suid-root").st_mode & 0o6000 == 0
    assert os.lstat(out / "sgid").st_mode & 0o6000 == 0
    assert b"setuid" in res.stderr.lower()
    tar = tmp_path / "h.tar"
    assert rescue("extract", str(NAMES), "-o", str(tar)).returncode in (0, 1)
    recs = tar_view(tar).recs
    assert recs["suid-root"].mode == 0o4755 and recs["sgid"].mode == 0o2755


@pytest.mark.parametrize("kind", ["dir", "tar"])
def test_absurd_size_and_blocks_past_the_end_are_skipped_and_the_rest_rescued(tmp_path, kind, sentinel):
    out = tmp_path / ("out/" if kind == "dir" else "s.tar")
    res = rescue("extract", str(SIZES), "--path", "/", "-o", str(out) + ("/" if kind == "dir" else ""),
                 timeout=60)
    assert res.returncode == 1, explain(res)
    err = res.stderr.decode(errors="replace")
    assert "Traceback" not in err
    assert "absurd" in err and "pastend" in err, err
    view = dir_view(out) if kind == "dir" else tar_view(out)
    assert view.recs["zz-after.txt"].sha == hashlib.sha256(T.pattern(20000, "pastend")).hexdigest()
    assert view.recs["ok.txt"].kind == "file"
    for name in ("absurd", "pastend"):   # skipped, or at worst present but not absurdly large
        assert name not in view.recs or view.recs[name].size <= 1 << 20


def _limited(tmp_path: Path, *args: str) -> tuple[int, bytes, int]:
    """Run rescue with bounded memory and output; (exit code, stderr, bytes written)."""
    out = tmp_path / "stdout"
    pythonpath = [str(REPO), os.environ.get("PYTHONPATH")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in pythonpath if p))
    with open(out, "wb") as f:
        res = subprocess.run([sys.executable, "-m", "rescue", *args], stdout=f, stderr=subprocess.PIPE,
                             timeout=60, preexec_fn=_limit_memory_and_output, env=env)
    return res.returncode, res.stderr, out.stat().st_size


def test_absurd_size_is_skipped_by_extract_within_bounded_memory(tmp_path):
    code, err, _ = _limited(tmp_path, "extract", str(SIZES), "--path", "/absurd", "-o", str(tmp_path / "a.tar"))
    assert code in (1, 2) and b"Traceback" not in err and b"MemoryError" not in err, err[-2000:]
    assert b"absurd" in err


def test_cat_refuses_an_absurd_size_like_extract_does(tmp_path):
    code, err, written = _limited(tmp_path, "cat", str(SIZES), "/absurd")
    assert code in (1, 2), f"exit {code} after writing {written} bytes (negative = killed by a limit)"
    assert b"Traceback" not in err and written <= 1 << 20


def test_corrupt_superblock_is_one_clear_error(tmp_path):
    image = HOSTILE / "corrupt-superblock.img"
    for args in (["extract", str(image), "-o", str(tmp_path / "x.tar")], ["ls", str(image), "/"]):
        res = rescue(*args)
        assert_one_line_error(res)
    assert not (tmp_path / "x.tar").exists()


def test_truncated_filesystem_image_is_one_clear_error(tmp_path):
    res = rescue("extract", str(HOSTILE / "truncated.img"), "-o", str(tmp_path / "x.tar"))
    assert_one_line_error(res)


def test_truncated_disk_image_is_one_clear_error(tmp_path):
    cut = tmp_path / "cut.disk"
    with open(SAMPLE, "rb") as f:
        cut.write_bytes(f.read(8 << 20))     # GPT intact, root partition mostly gone
    res = rescue("extract", str(cut), "-o", str(tmp_path / "x.tar"))
    assert_one_line_error(res)


@pytest.mark.parametrize("image", ["truncated.img", "cut-sample"])
def test_truncated_images_never_crash_or_hang(tmp_path, image):
    """Whatever the policy (error or partial rescue), no traceback, bounded time,
    and every damaged file named on stderr."""
    path = HOSTILE / image
    if image == "cut-sample":
        path = tmp_path / "cut.disk"
        with open(SAMPLE, "rb") as f:
            path.write_bytes(f.read(8 << 20))
    for args in (["inspect", str(path)], ["extract", str(path), "-o", str(tmp_path / "x.tar")]):
        res = rescue(*args, timeout=60)
        assert res.returncode in (0, 1, 2), explain(res)
        assert b"Traceback" not in res.stderr, explain(res)
    if res.returncode == 1:
        assert b"skipped" in res.stderr


def test_partial_rescues_what_a_truncated_image_still_holds(tmp_path):
    """The hint of the truncated-image error: --partial rescues the rest, reports the
    lost files and exits 1."""
    out = tmp_path / "x.tar"
    res = rescue("extract", str(HOSTILE / "truncated.img"), "--partial", "-o", str(out))
    assert res.returncode == 1, explain(res)
    assert b"Traceback" not in res.stderr and b"skipped" in res.stderr
    recs = tar_view(out).recs
    assert recs and all(r.kind in ("file", "dir", "symlink") for r in recs.values())
