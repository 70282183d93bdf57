"""Damaged XFS images: never a traceback or a hang; a clear one-line error when
nothing can be opened, otherwise a partial rescue with the damaged entries skipped.

Bytes are flipped only where the reader reads metadata (superblock, inodes,
directory, btree, attribute and symlink blocks: recorded while walking the
intact image), with many seeds. 200 seeds run here; for 1 000:

    XFS_FUZZ_SEEDS=1000 .venv/bin/pytest -q tests/fs/test_fs_xfs_damaged.py
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import pytest

import xfs_support as S
from common_support import zstd_decompress
from rescue.errors import FilesystemError, GuestPathError, RescueError
from rescue.fs.base import FileReadError
from rescue.fs.xfs import XfsFileSystem
from rescue.source.base import FileSource

FIX = S.REPO / "fixtures" / "xfs"
SEEDS = int(os.environ.get("XFS_FUZZ_SEEDS", "200"))
PER_SEED_SECONDS = 20


class MemSource:
    """An image in memory with some bytes replaced (the fixture file is never written)."""

    def __init__(self, data: bytes, patches: dict[int, int] | None = None, size: int | None = None,
                 record: list | None = None) -> None:
        self.data, self.patches = data, patches or {}
        self.size = len(data) if size is None else size
        self.name = "damaged.img"
        self.record = record

    def read(self, offset: int, length: int) -> bytes:
        if self.record is not None:
            self.record.append((offset, length))
        out = bytearray(self.data[offset:min(offset + length, self.size)])
        for pos, value in self.patches.items():
            if offset <= pos < offset + len(out):
                out[pos - offset] = value
        return bytes(out)

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, bytes]:
    tmp = tmp_path_factory.mktemp("xfsdmg")
    return {n: zstd_decompress(FIX / f"{n}.img.zst", tmp / f"{n}.img").read_bytes() for n in ("v5", "b1k", "v4")}


def rescue_all(fs: XfsFileSystem) -> tuple[int, int]:
    """Walk like extract does: every readable entry, its runs and xattrs; damage skipped."""
    ok = skipped = 0
    stack = ["/"]
    while stack:
        path = stack.pop()
        try:
            entries = fs.listdir(path)
        except (FileReadError, GuestPathError):
            skipped += 1
            continue
        if fs.listing_damage(path):       # listed in part: extract reports it as skipped
            skipped += 1
        for e in entries:
            try:
                if e.kind == "file":
                    fs.file_runs(e)
                    fs.read_range(e, 0, 4096)
                fs.xattrs(e)
                ok += 1
            except FileReadError:
                skipped += 1
            if e.kind == "dir":
                stack.append(e.path)
    return ok, skipped


def _metadata_reads(data: bytes) -> list[tuple[int, int]]:
    """Where the reader reads metadata: everything it reads while walking, minus file data."""
    record: list = []
    fs = XfsFileSystem(MemSource(data, record=record))
    for e in fs.walk("/"):
        fs.xattrs(e)
        if e.kind == "file":
            fs.file_runs(e)
    return [(off, min(length, 8192)) for off, length in set(record)]


class _Hang(Exception):
    pass


def _alarm(_signum, _frame):
    raise _Hang()


@pytest.mark.parametrize("name", ["v5", "b1k", "v4"])
def test_flipped_metadata_bytes_never_crash_or_hang(images, name):
    data = images[name]
    regions = _metadata_reads(data)
    previous = signal.signal(signal.SIGALRM, _alarm)
    opened = partial = refused = 0
    try:
        for seed in range(SEEDS // 3 + 1):
            rnd = random.Random(seed)
            patches = {}
            for _ in range(rnd.choice((1, 2, 4, 16, 64))):
                off, length = rnd.choice(regions)
                pos = off + rnd.randrange(length)
                patches[pos] = rnd.choice((0, 0xFF, rnd.randrange(256), data[pos] ^ (1 << rnd.randrange(8))))
            signal.alarm(PER_SEED_SECONDS)
            try:
                fs = XfsFileSystem(MemSource(data, patches))
            except FilesystemError as exc:
                assert "\n" not in exc.one_line()
                refused += 1
                continue
            except _Hang:
                pytest.fail(f"seed {seed}: opening hung")
            try:
                ok, skipped = rescue_all(fs)
            except _Hang:
                pytest.fail(f"seed {seed}: walking hung")
            except RescueError:
                raise
            finally:
                signal.alarm(0)
            opened += 1
            partial += bool(skipped)
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert opened > 0 and partial > 0, (opened, partial, refused)


@pytest.mark.parametrize("cut", [512, 4096, 100_000, 1 << 20, 8 << 20, 32 << 20, (64 << 20) - 4096])
def test_truncated_image(images, cut):
    src = MemSource(images["v5"], size=cut)
    try:
        fs = XfsFileSystem(src)
    except FilesystemError as exc:
        assert "XFS" in str(exc) and "\n" not in exc.one_line()
        return
    ok, skipped = rescue_all(fs)
    assert ok + skipped > 0


@pytest.mark.parametrize("name", ["v5", "v4"])
def test_zeroed_ag_headers_do_not_matter(images, name, tmp_path):
    """AGF, AGI and AGFL of every AG zeroed: files are still all there (the reader
    needs only the superblock, inodes and forks)."""
    data = bytearray(images[name])
    fs = XfsFileSystem(MemSource(bytes(data)))
    sb = fs.sb
    for ag in range(sb.agcount):
        base = ag * sb.agblocks * sb.block_size
        sect = 512 if name == "v4" else 512
        start = base + (sect if ag == 0 else 0)      # keep the primary superblock
        data[start:base + 4 * sect] = bytes(base + 4 * sect - start)
    img = tmp_path / "zeroed.img"
    img.write_bytes(data)
    before = S.reader_view(XfsFileSystem(MemSource(images[name])))
    after = S.reader_view(XfsFileSystem(FileSource(img)))
    assert S.differences(before, after) == []


def test_zeroed_superblock_is_one_clear_error(images):
    data = bytearray(images["v5"])
    data[:512] = bytes(512)
    assert not XfsFileSystem.detect(MemSource(bytes(data)))
    data[:4] = b"XFSB"
    with pytest.raises(FilesystemError) as err:
        XfsFileSystem(MemSource(bytes(data)))
    assert "XFS superblock" in err.value.one_line()


def test_crc_mismatch_skips_one_file_and_keeps_the_rest(images):
    data = images["v5"]
    fs = XfsFileSystem(MemSource(data))
    tiny = fs.stat("/files/tiny")
    pos = fs.reader.ino_location(tiny.inode) + 0x38 + 7      # the low byte of di_size
    damaged = XfsFileSystem(MemSource(data, {pos: data[pos] ^ 1}))
    with pytest.raises(FileReadError, match="CRC mismatch"):
        damaged.stat("/files/tiny")
    names = {e.name for e in damaged.listdir("/files")}
    assert "tiny" not in names and "random-1m" in names
    assert "CRC mismatch" in damaged.listing_damage("/files")
    ok, skipped = rescue_all(damaged)
    assert skipped == 1 and ok > 2000      # /files listed without it, reported as damage
