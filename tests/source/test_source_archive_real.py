"""Compressed real images from other projects (../shared/real-images): every
.gz/.xz/.bz2 there reads through our source exactly as the CLI decompressor
(`gzip -dc`, `xz -dc`, `bzip2 -dc`) writes it."""

from __future__ import annotations

import hashlib
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from repo_paths import REAL_IMAGES
from rescue.errors import SourceError
from rescue.source import open_source

REAL = REAL_IMAGES
TOOLS = {".gz": "gzip", ".xz": "xz", ".bz2": "bzip2"}
MAX_DECOMPRESSED = 32 << 20  # keep the whole run in seconds
PER_GROUP = 2                # images per (project, compression): the unit run samples


def _images() -> list[Path]:
    if not REAL.is_dir():
        return []
    groups: dict[tuple, list[Path]] = {}
    for p in sorted(REAL.rglob("*")):
        if p.suffix in TOOLS and p.is_file():
            groups.setdefault((p.parent, p.suffix, ".tar" in p.suffixes), []).append(p)
    return [p for group in groups.values()
            for p in sorted(group, key=lambda q: q.stat().st_size)[:PER_GROUP]]


def _reference(tool: str, path: Path) -> bytes | None:
    """What the decompressor writes (None when it rejects the file); skips big ones."""
    proc = subprocess.Popen([tool, "-dc", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    data = proc.stdout.read(MAX_DECOMPRESSED + 1)
    if len(data) > MAX_DECOMPRESSED:
        proc.kill()
        proc.wait()
        pytest.skip(f"decompresses to more than {MAX_DECOMPRESSED} bytes")
    return data if proc.wait() == 0 else None


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("RESCUE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.skipif(not REAL.is_dir(), reason=f"{REAL} is absent")
@pytest.mark.parametrize("path", _images(), ids=lambda p: str(p.relative_to(REAL)))
def test_real_compressed_image_matches_the_decompressor(path: Path):
    tool = TOOLS[path.suffix]
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")
    want = _reference(tool, path)
    if want is None:
        # The reference tool rejects it too: we must fail with a clear error, not crash.
        with pytest.raises(SourceError):
            open_source(path).close()
        return
    source = open_source(path)
    try:
        if "::" in source.name:  # a compressed tar: compare the member we chose with GNU tar's
            member = source.name.rsplit("::", 1)[1]
            want = subprocess.run(["tar", "-xOf", str(path), member], stdout=subprocess.PIPE,
                                  check=True).stdout
        assert source.size == len(want)
        rng = random.Random(len(want))
        for _ in range(10):
            offset = rng.randrange(0, max(len(want), 1))
            assert source.read(offset, 8192) == want[offset:offset + 8192]
        got = source.read(0, len(want))
        assert hashlib.sha256(got).digest() == hashlib.sha256(want).digest()
    finally:
        source.close()
