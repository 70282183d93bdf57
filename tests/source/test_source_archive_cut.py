""".tar.zst and .zip snapshots cut short (an interrupted download, issue 14),
made by the real tools (GNU tar --zstd, zstd, pzstd, Info-ZIP zip to a file
and to a pipe, stored, bsdtar) from an ext4 image of a known tree, cut at
several points. Without --partial: one line saying the archive is truncated,
where the file ends, and pointing at --partial. With --partial: every file of
the image that lies before the cut comes out equal to the original tree's,
every other one is named as skipped (never zero-filled), and a cut that only
loses a zip's central directory loses nothing. The cut archive's tables are
never cached, so a plain open afterwards still refuses."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from archive_cut_support import ext4_image, random_tree, run_cached, skipped_paths

TOOLS = ("mkfs.ext4", "tar", "zstd", "pzstd", "zip", "bsdtar")


def _make(kind: str, image: Path, out: Path) -> Path:
    cwd = image.parent
    name = image.name
    if kind == "tar-zstd":        # GNU tar piping to zstd: one frame, no size stated
        subprocess.run(["tar", "--zstd", "-cf", str(out), name], cwd=cwd, check=True)
    elif kind == "zstd-file":     # zstd of a tar file: one frame stating its size
        subprocess.run(["tar", "-cf", str(out) + ".tar", name], cwd=cwd, check=True)
        subprocess.run(["zstd", "-q", "-1", "--rm", str(out) + ".tar", "-o", str(out)], check=True)
    elif kind == "pzstd":         # 2 MiB frames, each behind a skippable frame
        subprocess.run(["tar", "-cf", str(out) + ".tar", name], cwd=cwd, check=True)
        subprocess.run(["pzstd", "-q", "-1", "-p", "2", str(out) + ".tar", "-o", str(out)], check=True)
        os.unlink(str(out) + ".tar")
    elif kind == "zip":           # sizes in the local header
        subprocess.run(["zip", "-q", "-1", str(out), name], cwd=cwd, check=True)
    elif kind == "zip-pipe":      # written to a pipe: sizes in data descriptors after the data
        with open(out, "wb") as f:
            zipper = subprocess.Popen(["zip", "-q", "-1", "-", name], cwd=cwd, stdout=subprocess.PIPE)
            subprocess.run(["cat"], stdin=zipper.stdout, stdout=f, check=True)
            assert zipper.wait() == 0
    elif kind == "zip-stored":
        subprocess.run(["zip", "-q", "-0", str(out), name], cwd=cwd, check=True)
    elif kind == "bsdtar-zip":    # libarchive: deflate with data descriptors
        subprocess.run(["bsdtar", "--format", "zip", "-cf", str(out), name], cwd=cwd, check=True)
    return out


KINDS = {"tar-zstd": ".tar.zst", "zstd-file": ".tar.zst", "pzstd": ".tar.zst", "zip": ".zip",
         "zip-pipe": ".zip", "zip-stored": ".zip", "bsdtar-zip": ".zip"}


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, dict[str, bytes], dict[str, Path]]:
    for tool in TOOLS:
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} (apt: e2fsprogs tar zstd zip libarchive-tools)")
    base = tmp_path_factory.mktemp("cut-archives")
    files = random_tree(base / "tree", seed=14, per_dir=8, largest=200_000)
    image = ext4_image(base / "tree", base / "server.img", 12 << 20)
    archives = {kind: _make(kind, image, base / f"whole-{kind}{suffix}") for kind, suffix in KINDS.items()}
    return base, files, archives


def _cut(whole: Path, at: int, dest: Path) -> Path:
    with open(whole, "rb") as f:
        dest.write_bytes(f.read(at))
    return dest


def _named(name: str, skipped: set[str]) -> bool:
    """The file, or a directory above it (an unreadable directory is one line), is named."""
    parts = name.split("/")
    return any("/".join(parts[:i]) in skipped for i in range(1, len(parts) + 1))


@pytest.mark.parametrize("kind", list(KINDS))
def test_whole_archive_gives_the_tree(made, kind, tmp_path):
    _, files, archives = made
    out = tmp_path / "out"
    code, text = run_cached("extract", str(archives[kind]), "-o", f"{out}/", cache=tmp_path / "cache")
    assert code == 0, text
    for name, data in files.items():
        assert (out / name).read_bytes() == data, name


@pytest.mark.parametrize("fraction", [0.4, 0.8])
@pytest.mark.parametrize("kind", list(KINDS))
def test_cut_archive_refused_in_one_line_then_partial_rescues_what_lies_before(made, kind, fraction, tmp_path):
    base, files, archives = made
    whole = archives[kind]
    at = int(whole.stat().st_size * fraction)
    cut = _cut(whole, at, tmp_path / f"cut{KINDS[kind]}")
    cache = tmp_path / "cache"

    out = tmp_path / "out"
    code, text = run_cached("extract", "--partial", str(cut), "-o", f"{out}/", cache=cache)
    assert "internal error" not in text and "Traceback" not in text, text
    assert "truncated" in text and f"ends at byte {at}" in text, text
    skipped = skipped_paths(text)
    kept = {name for name in files if (out / name).exists()}
    for name in kept:
        assert (out / name).read_bytes() == files[name], f"{name} differs from the original tree's"
    assert not kept & skipped, kept & skipped
    lost = set(files) - kept
    unnamed = {name for name in lost if not _named(name, skipped)}
    assert not unnamed, f"neither rescued nor named as skipped (nor a directory above them): {unnamed}\n{text}"
    if kind != "zip-stored":   # random file data: the compressed archive is mostly file data
        assert lost, "a cut at this point loses files"
    if fraction >= 0.8:
        assert len(kept) >= len(files) // 2, (len(kept), text)
    assert code == (1 if skipped else 0), text

    # the --partial run cached nothing: a plain open refuses, in one line
    code, text = run_cached("ls", str(cut), "/", cache=cache)
    lines = [line for line in text.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, text
    assert "truncated" in lines[0] and "--partial" in lines[0] and f"ends at byte {at}" in lines[0], lines[0]


@pytest.mark.parametrize("kind", list(KINDS))
def test_cut_in_the_last_bytes(made, kind, tmp_path):
    """A zip that lost only (part of) its central directory loses no file; a
    zstd stream that lost its last bytes (checksum, last block) is refused
    the same way and with --partial gives the files before its end."""
    _, files, archives = made
    whole = archives[kind]
    at = whole.stat().st_size - (30 if kind.endswith("zip") else 3)
    cut = _cut(whole, at, tmp_path / f"tail{KINDS[kind]}")
    cache = tmp_path / "cache"
    code, text = run_cached("ls", str(cut), "/", cache=cache)
    assert code == 2 and len(text.strip().splitlines()) == 1 and "--partial" in text, text
    out = tmp_path / "out"
    code, text = run_cached("extract", "--partial", str(cut), "-o", f"{out}/", cache=cache)
    assert "internal error" not in text and "Traceback" not in text, text
    kept = {name for name in files if (out / name).exists()}
    for name in kept:
        assert (out / name).read_bytes() == files[name], name
    if kind.endswith("zip"):
        assert code == 0 and kept == set(files), text
        assert "central directory" in text, text
    else:
        skipped = skipped_paths(text)
        assert code in (0, 1) and all(_named(name, skipped) for name in set(files) - kept), text


def test_pzstd_cut_between_frames(made, tmp_path):
    """pzstd puts a skippable frame holding the next frame's size before each
    frame: a cut inside it, or right after it, is a cut stream too (refused;
    --partial keeps the whole frames). A cut exactly before it leaves a valid
    zstd stream: the tar inside then says it is truncated."""
    from rescue.errors import SourceError
    from rescue.source.base import BytesSource
    from rescue.source.codecs.zstd import ZstdSource
    _, _, archives = made
    data = archives["pzstd"].read_bytes()
    frames = ZstdSource(BytesSource(data, name="whole"))._frames
    assert len(frames) >= 3, frames
    start, _, out, _ = frames[2]
    header = start - 12   # 8-byte skippable frame header + the 4-byte size
    for at, where in ((header + 2, "magic number"), (header + 9, "skippable frame"), (start, "pzstd header")):
        with pytest.raises(SourceError) as exc:
            ZstdSource(BytesSource(data[:at], name="cut"))
        assert "truncated" in str(exc.value) and where in str(exc.value) and f"ends at byte {at}" in str(exc.value)
        assert "--partial" in str(exc.value.hint)
        kept = ZstdSource(BytesSource(data[:at], name="cut"), partial=True)
        assert kept.size == out and kept.truncated and any("--partial" in n for n in kept.notes)
    cut = _cut(archives["pzstd"], header, tmp_path / "boundary.tar.zst")
    code, text = run_cached("ls", str(cut), "/", cache=tmp_path / "cache")
    assert code == 2 and len(text.strip().splitlines()) == 1, text
    assert "tar archive is truncated" in text and "--partial" in text, text


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.7])
def test_cut_tree_archive_with_partial_rescues_the_files_before_and_exits_1(made, fraction, tmp_path):
    """A .tar.zst of a server's files (read as a filesystem of its own): with
    --partial the files before the cut come out whole, and the listing says
    the archive is cut short (files after the cut cannot be named: their
    headers are lost), so the exit code is 1 even when the cut falls between
    two members."""
    base, files, _ = made
    tree = tmp_path / "tree"
    shutil.copytree(base / "tree", tree)
    (tree / "etc" / "os-release").write_bytes(b"ID=debian\n")   # what marks a server's root
    whole = tmp_path / "tree.tar.zst"
    subprocess.run(["tar", "--zstd", "-cf", str(whole), "-C", str(tree), "./etc", "./srv", "./home"], check=True)
    cut = _cut(whole, int(whole.stat().st_size * fraction), tmp_path / "cut.tar.zst")
    out = tmp_path / "out"
    code, text = run_cached("extract", "--partial", str(cut), "-o", f"{out}/", cache=tmp_path / "cache")
    assert code == 1, text
    assert "internal error" not in text and "zstd stream is truncated" in text, text
    assert "partly readable" in text, text
    kept = {name for name in files if (out / name).exists()}
    assert 0 < len(kept) < len(files), text
    for name in kept:
        assert (out / name).read_bytes() == files[name], name


def test_zip_with_a_damaged_central_directory_is_damage_not_a_cut(made, tmp_path):
    """The end record is there (the file is whole) but the central directory it
    points at is not: that is damage, said so, not a cut to --partial over."""
    _, _, archives = made
    data = bytearray(archives["zip"].read_bytes())
    at = data.rfind(b"PK\x01\x02")
    data[at:at + 4] = b"XXXX"
    bad = tmp_path / "bad.zip"
    bad.write_bytes(bytes(data))
    code, text = run_cached("ls", str(bad), "/", cache=tmp_path / "cache")
    assert code == 2 and len(text.strip().splitlines()) == 1, text
    assert "damaged" in text and "truncated" not in text, text
