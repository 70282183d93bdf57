""".xz and .bz2 snapshots cut short (an interrupted download, issue 14): a raw
ext4 image and a tar of it, compressed by the real tools (GNU tar -J / -j, which
pipe through xz and bzip2: one xz block, one bzip2 stream; `xz -T2
--block-size`, whose blocks state their sizes; `bzip2` of the image), cut at
several points. Without --partial: one line saying the stream is truncated,
where the file ends, and pointing at --partial. With --partial: every file of
the image that comes out equals the original tree's, every other one is named
as skipped, and the cut stream's tables are not cached (a plain open still
refuses)."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest

from archive_cut_support import ext4_image, random_tree, run_cached, skipped_paths
from rescue.errors import SourceError
from rescue.source.base import BytesSource
from rescue.source.codecs import open_compressed

TOOLS = ("mkfs.ext4", "tar", "xz", "bzip2")


def _make(kind: str, image: Path, out: Path) -> Path:
    cwd, name = image.parent, image.name
    if kind == "tar-J":          # GNU tar piping to xz: one block, sizes not stated
        subprocess.run(["tar", "-cJf", str(out), name], cwd=cwd, check=True)
    elif kind == "tar-j":        # GNU tar piping to bzip2: one stream of 900 kB blocks
        subprocess.run(["tar", "-cjf", str(out), name], cwd=cwd, check=True)
    elif kind == "img-xz-T2":    # the image itself, multithreaded xz: 1 MiB blocks stating their sizes
        with open(out, "wb") as f:
            subprocess.run(["xz", "-T2", "--block-size=1MiB", "-1", "-c", str(image)], stdout=f, check=True)
    elif kind == "img-bz2":
        with open(out, "wb") as f:
            subprocess.run(["bzip2", "-1", "-c", str(image)], stdout=f, check=True)
    return out


KINDS = {"tar-J": ".tar.xz", "tar-j": ".tar.bz2", "img-xz-T2": ".img.xz", "img-bz2": ".img.bz2"}


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, dict[str, bytes], dict[str, Path]]:
    for tool in TOOLS:
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} (apt: e2fsprogs tar xz-utils bzip2)")
    base = tmp_path_factory.mktemp("cut-xz-bz2")
    files = random_tree(base / "tree", seed=15, per_dir=6, largest=160_000)
    image = ext4_image(base / "tree", base / "server.img", 8 << 20)
    archives = {kind: _make(kind, image, base / f"whole-{kind}{suffix}") for kind, suffix in KINDS.items()}
    return base, files, archives


def _named(name: str, skipped: set[str], text: str) -> bool:
    parts = name.split("/")
    return any("/".join(parts[:i]) in skipped for i in range(1, len(parts) + 1)) or \
        "directories (/" in text   # a tree listed on one line (several directories partly readable)


@pytest.mark.parametrize("kind", list(KINDS))
def test_whole_archive_gives_the_tree(made, kind, tmp_path):
    _, files, archives = made
    out = tmp_path / "out"
    code, text = run_cached("extract", str(archives[kind]), "-o", f"{out}/", cache=tmp_path / "cache", timeout=180)
    assert code == 0, text
    for name, data in files.items():
        assert (out / name).read_bytes() == data, name


@pytest.mark.parametrize("where", [0.3, 0.6, 0.9, -3])
@pytest.mark.parametrize("kind", list(KINDS))
def test_cut_refused_in_one_line_then_partial_rescues_what_lies_before(made, kind, where, tmp_path):
    _, files, archives = made
    whole = archives[kind]
    size = whole.stat().st_size
    at = size + where if where < 0 else int(size * where)
    cut = tmp_path / f"cut{KINDS[kind]}"
    cut.write_bytes(whole.read_bytes()[:at])
    cache = tmp_path / "cache"

    code, text = run_cached("ls", str(cut), "/", cache=cache, timeout=180)
    lines = [line for line in text.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, text
    assert "truncated" in lines[0] and "--partial" in lines[0] and f"ends at byte {at}" in lines[0], lines[0]

    out = tmp_path / "out"
    code, text = run_cached("extract", "--partial", str(cut), "-o", f"{out}/", cache=cache, timeout=180)
    assert "internal error" not in text and "Traceback" not in text, text
    assert "truncated" in text and f"ends at byte {at}" in text, text
    if "nothing before the cut can be decompressed" in text:   # bzip2: the cut is in the first block
        assert kind.endswith("j") or "bz2" in kind, text
        assert code == 2 and len(text.strip().splitlines()) == 1 and not out.exists(), text
        return
    skipped = skipped_paths(text)
    kept = {name for name in files if (out / name).exists()}
    for name in kept:
        assert (out / name).read_bytes() == files[name], f"{name} differs from the original tree's"
    lost = set(files) - kept
    unnamed = {name for name in lost if not _named(name, skipped, text)}
    assert not unnamed, f"neither rescued nor named as skipped: {unnamed}\n{text}"
    if where == 0.3:
        assert lost, text
    if where == -3 or where == 0.9:
        assert len(kept) >= len(files) // 2, (len(kept), text)
    assert code in (0, 1) and (code == 1) == bool(skipped), text

    # nothing of the cut stream was cached: a plain open still refuses
    code, text = run_cached("ls", str(cut), "/", cache=cache, timeout=180)
    assert code == 2 and "truncated" in text, text


@pytest.mark.parametrize("kind", list(KINDS))
def test_partial_bytes_equal_the_original_up_to_the_cut(made, kind, tmp_path):
    """Through the codec alone: the bytes read from a cut stream with partial
    are a prefix of the whole stream's, and reach close to the cut."""
    _, _, archives = made
    data = archives[kind].read_bytes()
    codec = "xz" if KINDS[kind].endswith(".xz") else "bzip2"
    full = open_compressed(BytesSource(data, name="whole"), codec)
    reference = full.read(0, full.size)
    for fraction in (0.05, 0.5, 0.97):
        cut = BytesSource(data[:int(len(data) * fraction)], name="cut")
        try:
            part = open_compressed(cut, codec, partial=True)
        except SourceError as exc:   # bzip2 -9: a cut inside the first 900 kB block (it decodes only whole)
            assert codec == "bzip2" and fraction < 0.1 and "nothing before the cut" in str(exc), exc
            continue
        assert part.truncated and any("--partial" in n for n in part.notes)
        assert 0 < part.size < full.size
        assert part.read(0, part.size) == reference[:part.size]
        # random access: a read in the middle equals the reference there
        mid = part.size // 2
        assert part.read(mid, 100_000) == reference[mid:mid + 100_000]


def test_bzip2_of_several_streams_cut_between_and_inside_them(tmp_path):
    """`cat a.bz2 b.bz2` (what pbzip2/lbzip2 write, stream after stream): a cut
    inside the second stream's magic keeps the first stream, a cut inside its
    data keeps the first stream and the second's whole blocks."""
    if shutil.which("bzip2") is None:
        pytest.skip("needs bzip2")
    rng = random.Random(3)
    parts = [rng.randbytes(300_000), rng.randbytes(300_000)]
    streams = []
    for i, part in enumerate(parts):
        (tmp_path / f"p{i}").write_bytes(part)
        streams.append(subprocess.run(["bzip2", "-1", "-c", str(tmp_path / f"p{i}")], capture_output=True,
                                      check=True).stdout)
    data, first = streams[0] + streams[1], len(streams[0])
    for at, least in ((first + 2, len(parts[0])), (first + len(streams[1]) - 5, len(parts[0]) + 200_000)):
        with pytest.raises(SourceError, match="truncated"):
            open_compressed(BytesSource(data[:at], name="cut"), "bzip2")
        kept = open_compressed(BytesSource(data[:at], name="cut"), "bzip2", partial=True)
        assert kept.truncated and kept.size >= least
        assert kept.read(0, kept.size) == (parts[0] + parts[1])[:kept.size]
