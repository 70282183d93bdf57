"""Damaged btrfs images never cost more than the damaged part: flipped bytes in
tree blocks (with the checksum left wrong, and re-signed so the parsers see
the garbage) and in superblocks, truncated images, and the btrfs-progs fuzz
and fsck images (../shared/real-images/btrfs-progs) end in FilesystemError,
FileReadError or GuestPathError, never another exception, a hang or unbounded
memory. Seeds: SEEDS (200) over the committed fixtures; a failure names its seed."""

from __future__ import annotations

import lzma
import os
import random
import resource
import time
from pathlib import Path

import pytest

from repo_paths import REAL_IMAGES
from rescue.errors import RescueError
from rescue.fs.base import FileReadError
from rescue.fs.btrfs import BtrfsFileSystem
from rescue.fs.btrfs import structs as S
from rescue.fs.btrfs.checksum import checksummer
from rescue.source.base import FileSource
from test_fs_btrfs import Patched, images  # noqa: F401  (session fixture)

SEEDS = int(os.environ.get("RESCUE_BTRFS_SEEDS", "200"))   # the issue asks 1 000: set it for a longer run
REAL = REAL_IMAGES / "btrfs-progs"
SECONDS_PER_IMAGE = 20


def _tree_blocks(fs: BtrfsFileSystem) -> list[int]:
    """Logical addresses of every tree block reachable from the superblock."""
    vol = fs.vol
    roots = [(vol.sb.chunk_root, vol.sb.chunk_root_level), (vol.sb.root, vol.sb.root_level)]
    roots += [(info.bytenr, info.level) for info in fs.roots.values()]
    seen: list[int] = []
    stack = list(roots)
    while stack:
        bytenr, level = stack.pop()
        if bytenr in seen:
            continue
        node = vol.node(bytenr, level)
        seen.append(bytenr)
        if node.level:
            stack += [(ptr, node.level - 1) for ptr, _gen in node.ptrs]
    return seen


def _exercise(fs: BtrfsFileSystem, deadline: float) -> int:
    """Walk everything as `extract` does (skipping what raises FileReadError)."""
    done = 0
    stack = ["/"]
    visited = set()
    for sv in fs.info.details["subvolumes"][:3]:
        try:
            fs.subvolume(sv["id"]).listdir("/")
        except (RescueError, FileReadError):
            pass
    while stack:
        assert time.monotonic() < deadline, "took too long (a loop?)"
        path = stack.pop()
        try:
            listing = fs.listdir(path)
        except (RescueError, FileReadError):
            continue
        fs.listing_damage(path)
        for e in listing:
            done += 1
            try:
                fs.xattrs(e)
                if e.kind == "dir" and e.inode not in visited:
                    visited.add(e.inode)
                    stack.append(e.path)
                elif e.kind == "file":
                    fs.file_runs(e)
                    fs.read_range(e, 0, 8192)
                    fs.read_range(e, max(0, e.size - 5000), 5000)
                fs.stat(e.path)
            except (RescueError, FileReadError):
                pass
    return done


def _damage(rng: random.Random, fs: BtrfsFileSystem, blocks: list[int], resign: bool) -> dict[int, bytes]:
    vol = fs.vol
    patches: dict[int, bytes] = {}
    if rng.random() < 0.15:   # a superblock: the primary, sometimes the mirror too
        for offset in S.SUPER_MIRRORS[:1 + (rng.random() < 0.5)]:
            raw = bytearray(vol.source.read(offset, S.SUPER_INFO_SIZE))
            if len(raw) < S.SUPER_INFO_SIZE:
                continue
            for _ in range(rng.randint(1, 4)):
                raw[rng.randrange(0x20, 0xD00)] ^= rng.randrange(1, 256)
            if resign:
                raw[:32] = checksummer(vol.csum_type)(bytes(raw[0x20:])).ljust(32, b"\0")
            patches[offset] = bytes(raw)
        return patches
    for bytenr in rng.sample(blocks, min(len(blocks), rng.randint(1, 3))):
        (_n, copies), = vol.map(bytenr, vol.nodesize)
        raw = bytearray(vol.read_logical(bytenr, vol.nodesize))
        for _ in range(rng.randint(1, 8)):
            # mostly the header and item table, where the structure lives
            at = rng.randrange(32, 32 + 101 + 25 * 40) if rng.random() < 0.7 else rng.randrange(32, len(raw))
            at = min(at, len(raw) - 1)
            raw[at] ^= rng.randrange(1, 256)
        if resign:
            raw[:32] = checksummer(vol.csum_type)(bytes(raw[32:])).ljust(32, b"\0")
        for _devid, phys in copies:   # every copy, or DUP would just repair it
            patches[phys] = bytes(raw)
    return patches


@pytest.mark.parametrize("name,seeds", [("mixed-4k.img", range(0, SEEDS * 3 // 4)),
                                        ("subvols-xxhash.img", range(SEEDS * 3 // 4, SEEDS))])
def test_flipped_bytes_never_escape_as_tracebacks(images, name, seeds):  # noqa: F811
    source = FileSource(images[name])
    fs = BtrfsFileSystem(source)
    blocks = _tree_blocks(fs)
    assert len(blocks) > 10
    failures = []
    outcomes = {"opened": 0, "refused": 0}
    for seed in seeds:
        rng = random.Random(seed)
        patched = Patched(source, _damage(rng, fs, blocks, resign=seed % 2 == 0))
        start = time.monotonic()
        try:
            damaged = BtrfsFileSystem(patched)
        except RescueError as exc:
            assert "\n" not in str(exc)
            outcomes["refused"] += 1
            continue
        except Exception as exc:   # noqa: BLE001 - the point of the test
            failures.append(f"seed {seed}: open: {type(exc).__name__}: {exc}")
            continue
        outcomes["opened"] += 1
        try:
            _exercise(damaged, start + SECONDS_PER_IMAGE)
        except Exception as exc:   # noqa: BLE001
            failures.append(f"seed {seed}: {type(exc).__name__}: {exc}")
    assert failures == []
    assert outcomes["opened"] and outcomes["refused"], outcomes   # both paths were exercised
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 1_500_000   # KiB: bounded memory


def test_truncated_images_open_or_refuse_in_one_line(images):  # noqa: F811
    source = FileSource(images["subvols-xxhash.img"])
    for size in (0, 4096, 65536 + 100, 1 << 20, 8 << 20, 30 << 20, 70 << 20, 100 << 20):
        cut = Patched(source, size=size)
        try:
            fs = BtrfsFileSystem(cut)
        except RescueError as exc:
            assert "\n" not in str(exc)
            continue
        _exercise(fs, time.monotonic() + SECONDS_PER_IMAGE)


def _real_images() -> list[Path]:
    return sorted(REAL.rglob("*.raw.xz")) if REAL.is_dir() else []


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("btrfs-progs")


@pytest.mark.skipif(not _real_images(), reason=f"{REAL} is absent")
@pytest.mark.parametrize("xz", _real_images(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_btrfs_progs_images_open_or_refuse_cleanly(real_dir, xz):
    dst = real_dir / xz.name[:-3]
    with lzma.open(xz) as f, open(dst, "wb") as out:   # sparse: runs of zeros are skipped
        while block := f.read(1 << 20):
            if block.count(0) == len(block):
                out.seek(len(block), 1)
            else:
                out.write(block)
        out.truncate()
    try:
        try:
            fs = BtrfsFileSystem(FileSource(dst))
        except RescueError as exc:
            assert "\n" not in str(exc) and "Traceback" not in str(exc)
            return
        _exercise(fs, time.monotonic() + SECONDS_PER_IMAGE)
    finally:
        dst.unlink()   # some are 2 GiB (sparse)
