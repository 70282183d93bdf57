"""Snapshots cut short (an interrupted download): a known tree in an ext4
image, the CLI run with a cache of the test's own, and what it names as
skipped. Shared by the .gz, .zst/.zip and .xz/.bz2 cut-archive tests."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

from common_support import rescue


def random_tree(root: Path, seed: int, per_dir: int, largest: int) -> dict[str, bytes]:
    """Files of random bytes (they compress barely, so a cut at N% of the
    archive falls near N% of the image) in a few directories."""
    rng = random.Random(seed)
    files = {}
    for d in ("etc", "srv/www", "srv/db", "home/ann"):
        for i in range(per_dir):
            files[f"{d}/f{i:02d}.bin"] = rng.randbytes(rng.randrange(20_000, largest))
    files["etc/hostname"] = b"cut-short\n"
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def ext4_image(tree: Path, image: Path, size: int) -> Path:
    """`tree` made into a bare ext4 filesystem of `size` bytes by mkfs.ext4 -d."""
    with open(image, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image)], check=True)
    return image


def run_cached(*args: str, cache: Path, timeout: float = 60) -> tuple[int, str]:
    """(exit code, stderr) of the CLI with `cache` as its cache directory."""
    res = rescue(*args, timeout=timeout, env={"XDG_CACHE_HOME": str(cache)})
    return res.returncode, res.stderr.decode(errors="replace")


def skipped_paths(text: str) -> set[str]:
    """The paths of the `skipped: PATH: why` lines, without their leading '/'."""
    return {line[len("skipped: "):].split(": ")[0].lstrip("/")
            for line in text.splitlines() if line.startswith("skipped: ")}
