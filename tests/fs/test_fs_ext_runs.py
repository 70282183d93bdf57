"""ExtFileSystem.file_runs against the kernel's own map of each file (FIEMAP,
as `filefrag -v` prints it) on images filled through a real loop mount:
preallocated (unwritten) extents, holes, extents past EOF (fallocate -n), block
maps with holes (ext3), inline data, fast and slow symlinks; every byte read
equals what the kernel reads."""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from rescue.fs import open_filesystem
from rescue.fs.base import FILE, SYMLINK
from rescue.fs.ext import ExtFileSystem
from rescue.source.base import DATA, UNWRITTEN, ZERO, FileSource

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
pytestmark = [
    pytest.mark.skipif(not IS_ROOT, reason="filling an image through a loop mount needs root"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in ("mkfs.ext4", "filefrag", "fallocate")),
                       reason="mkfs.ext4, filefrag and fallocate (e2fsprogs, util-linux) are needed"),
]
_EXTENT = re.compile(r"^\s*\d+:\s+(\d+)\.\.\s*(\d+):\s+(\d+)\.\.\s*(\d+):\s+(\d+):\s*(?:\d+:)?\s*(.*)$")


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def kernel_map(path: Path, size: int) -> tuple[int, list[tuple[int, int, str, int]]]:
    """(block size, [(offset, length, kind, where)]) of the file's extents below
    its size, neighbours of one kind that continue each other joined."""
    out = run("filefrag", "-v", str(path))
    bs = int(re.search(r"blocks? of (\d+) bytes", out).group(1))
    runs: list[tuple[int, int, str, int]] = []
    for line in out.splitlines():
        m = _EXTENT.match(line)
        if not m:
            continue
        lstart, _, pstart, _, length, flags = m.groups()
        offset, length = int(lstart) * bs, int(length) * bs
        if offset >= size:
            continue
        length = min(length, size - offset)
        kind = UNWRITTEN if "unwritten" in flags else DATA
        runs.append((offset, length, kind, int(pstart) * bs))
    return bs, _joined(runs)


def _joined(runs):
    out = []
    for off, length, kind, where in sorted(runs):
        if out and out[-1][2] == kind and out[-1][0] + out[-1][1] == off and \
                (kind == UNWRITTEN or out[-1][3] + out[-1][1] == where):
            out[-1] = (out[-1][0], out[-1][1] + length, kind, out[-1][3])
        else:
            out.append((off, length, kind, where))
    return out


def our_map(fs: ExtFileSystem, entry) -> list[tuple[int, int, str, int]]:
    runs = fs.file_runs(entry)
    assert sum(r.length for r in runs) == entry.size and all(a.offset + a.length == b.offset
                                                              for a, b in zip(runs, runs[1:])), runs
    # UNWRITTEN runs have no `where` of ours; the kernel names their blocks: compare places of DATA only
    got = [(r.offset, r.length, r.kind, r.where if r.kind == DATA else None) for r in runs if r.kind != ZERO]
    return got


def preallocate(path: Path, offset: int, length: int, keep_size: bool = False) -> None:
    """fallocate(2); on a block-mapped file (ext3 has no unwritten extents:
    EOPNOTSUPP) zeros are written instead, as posix_fallocate does."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "r+b") as f:
        mode = 1 if keep_size else 0   # FALLOC_FL_KEEP_SIZE
        if libc.fallocate(f.fileno(), mode, ctypes.c_long(offset), ctypes.c_long(length)) == 0:
            return
        if ctypes.get_errno() != errno.EOPNOTSUPP:
            raise OSError(ctypes.get_errno(), f"fallocate {path}")
        if not keep_size:
            f.seek(offset)
            f.write(bytes(length))


def fill(mnt: Path) -> None:
    (mnt / "prealloc").touch()
    preallocate(mnt / "prealloc", 0, 1 << 20)                                 # all unwritten
    with open(mnt / "mixed", "wb") as f:
        f.write(os.urandom(1 << 20))
    preallocate(mnt / "mixed", 1 << 20, 512 << 10)                            # unwritten tail
    with open(mnt / "mixed", "r+b") as f:                                     # data inside it
        f.seek(1200 << 10)
        f.write(os.urandom(8 << 10))
    preallocate(mnt / "mixed", 2 << 20, 256 << 10, keep_size=True)            # past EOF
    with open(mnt / "sparse", "wb") as f:                                     # holes between data
        for off in (0, 300 << 10, 5 << 20):
            f.seek(off)
            f.write(os.urandom(5000))
    with open(mnt / "frag", "wb") as f:                                       # many small extents
        for i in range(64):
            f.seek(i * (64 << 10))
            f.write(os.urandom(4096))
            f.flush()
            os.fsync(f.fileno())
    (mnt / "tiny").write_bytes(b"inline or one block\n")
    (mnt / "empty").touch()
    os.symlink("t" * 40, mnt / "fast-link")
    os.symlink("/" + "d/" * 200 + "end", mnt / "slow-link")
    os.setxattr(mnt / "tiny", "user.k", b"v" * 100)
    os.symlink("x" * 30, mnt / "fast-link-with-xattr")
    os.setxattr(mnt / "fast-link-with-xattr", "trusted.big", os.urandom(700), follow_symlinks=False)


IMAGES = {
    "ext4": ["mkfs.ext4", "-q", "-F", "-b", "1024"],
    "ext4_inline": ["mkfs.ext4", "-q", "-F", "-I", "256", "-O", "inline_data"],
    "ext3_blockmap": ["mkfs.ext3", "-q", "-F", "-b", "1024"],
}


@pytest.fixture(scope="module", params=list(IMAGES))
def image(request, tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp(request.param)
    img, mnt = base / "fs.img", base / "mnt"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    run(*IMAGES[request.param], str(img))
    run("mount", "-o", "loop", str(img), str(mnt))
    try:
        fill(mnt)
    finally:
        run("umount", str(mnt))
    run("mount", "-o", "ro,loop", str(img), str(mnt))
    yield img, mnt
    run("umount", str(mnt))


def test_file_runs_are_the_kernels_extents_and_read_the_kernels_bytes(image):
    img, mnt = image
    fs = open_filesystem(FileSource(str(img)))
    assert isinstance(fs, ExtFileSystem)
    compared = 0
    kinds = set()
    for entry in fs.walk("/"):
        real = mnt / entry.path.lstrip("/")
        if entry.kind == SYMLINK:
            assert entry.link_target == os.readlink(real), entry.path
            continue
        if entry.kind != FILE or entry.name == "lost+found":
            continue
        with open(real, "rb") as f:
            want = f.read()
        assert b"".join(fs.read_chunks(entry)) == want, entry.path
        assert fs.read_range(entry, 1000, 70000) == want[1000:71000], entry.path
        inline = fs._ext.inode(entry.inode).i_flags & 0x10000000
        if inline:   # one DATA run the inode itself holds: no place on the volume
            assert [(r.kind, r.where) for r in fs.file_runs(entry)] == ([(DATA, None)] if entry.size else [])
            kinds.add("inline")
            continue
        _, kernel = kernel_map(real, entry.size)
        got = our_map(fs, entry)
        assert [(o, n, k) for o, n, k, _ in got] == [(o, n, k) for o, n, k, _ in kernel], entry.path
        assert [w for *_, k, w in got if k == DATA] == [w for *_, k, w in kernel if k == DATA], entry.path
        kinds.update(k for _, _, k, _ in got)
        compared += 1
    assert compared >= 5 and DATA in kinds
    if "blockmap" not in img.parent.name:
        assert UNWRITTEN in kinds   # preallocated extents seen as such (ext3 block maps have none)
    if "inline" in img.parent.name:
        assert "inline" in kinds


def test_unwritten_ranges_are_holes_in_the_sparse_map(image):
    img, _ = image
    fs = ExtFileSystem(FileSource(str(img)))
    prealloc = fs.stat("/prealloc")
    if "blockmap" in img.parent.name:
        return   # ext3 has no unwritten extents: fallocate wrote zeros there
    assert fs.data_ranges(prealloc) == [] and {r.kind for r in fs.file_runs(prealloc)} == {UNWRITTEN}
    mixed = fs.stat("/mixed")
    assert fs.data_ranges(mixed) == [(0, 1 << 20), (1200 << 10, 8 << 10)]
