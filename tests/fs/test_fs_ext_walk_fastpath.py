"""The ext walk's one-unpack inode fields (ExtInodeReader.walk_fields) and its
one-piece file map (single_run, kept in Entry.native) agree with the full
parse and the full extent / block map, on images made by mkfs.ext4 (extents,
block maps, 128- and 256-byte inodes, inline data) and on inode tables filled
with random bytes."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from rescue.fs.base import FILE
from rescue.fs.ext import ExtFileSystem
from rescue.fs.ext_inode import ExtInodeReader
from rescue.source import FileSource

pytestmark = pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="mkfs.ext4 (e2fsprogs) is not installed")

VARIANTS = {
    "ext4": [],
    "ext4-128": ["-I", "128"],
    "ext3-blockmap": ["-O", "^extent,^64bit,^flex_bg", "-t", "ext3"],
    "ext4-inline": ["-O", "inline_data"],
}


def _tree(root: Path) -> None:
    rng = random.Random(7)
    for i, size in enumerate([0, 1, 59, 60, 61, 100, 1023, 1024, 1025, 4096, 12 * 1024, 12 * 1024 + 1, 50_000,
                              200_000]):
        (root / f"f{i:02d}").write_bytes(rng.randbytes(size))
    with open(root / "sparse", "wb") as f:
        f.seek(300_000)
        f.write(b"tail")
    os.symlink("f01", root / "short-link")
    os.symlink("x" * 200, root / "long-link")
    (root / "d").mkdir()
    (root / "d" / "inner").write_bytes(b"inner\n")


def _image(tmp_path: Path, name: str) -> Path:
    src = tmp_path / f"{name}-tree"
    src.mkdir()
    _tree(src)
    image = tmp_path / f"{name}.img"
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "1024", *VARIANTS[name], "-d", str(src), str(image)],
                   check=True, capture_output=True)
    return image


def _compare_inode(reader: ExtInodeReader, ino: int) -> bool:
    """True when walk_fields answered (and agreed), False when it left the inode to the full parse."""
    try:
        fields = reader.walk_fields(ino)
    except Exception:
        fields = "raised"
    try:
        parsed = reader.parsed(ino)
    except Exception:
        assert fields in (None, "raised"), ino   # the full parse rejects it: the walk must not accept it
        return False
    if fields is None:
        return False
    assert fields != "raised", ino
    mode, uid, gid, size, atime_ns, mtime_ns, ctime_ns, links, flags, has_xattrs, raw = fields
    inode = parsed[1]
    times = reader.times_of(parsed)
    assert (mode, uid, gid, size, links, flags) == (
        inode.i_mode, inode.i_uid | (inode.l_i_uid_high << 16), inode.i_gid | (inode.l_i_gid_high << 16),
        reader.size_of(inode), inode.i_links_count, inode.i_flags), ino
    assert (atime_ns, mtime_ns, ctime_ns) == (times.atime_ns, times.mtime_ns, times.ctime_ns), ino
    assert raw == parsed[0]
    if not has_xattrs:
        assert reader.xattrs(ino) == {}, ino
    where = reader.single_run(raw, flags, size)
    if where is not None:
        bs = reader.block_size
        assert reader.mapped_runs(ino, size, metadata=False) == [(0, where // bs, -(-size // bs), False)], ino
    return True


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_walk_fields_and_single_run_equal_the_full_parse(tmp_path, name):
    image = _image(tmp_path, name)
    reader = ExtInodeReader(FileSource(str(image)))
    answered = sum(_compare_inode(reader, ino) for ino in range(1, reader.inodes_count + 1))
    assert answered > 20 or reader.inode_size < 144
    # Through the filesystem: a walked file's runs with and without the note kept from the walk
    fs = ExtFileSystem(FileSource(str(image)))
    files = [e for e in fs.walk("/") if e.kind == FILE]
    assert any(e.native is not None for e in files)
    for entry in files:
        kept = fs.file_runs(entry)
        entry.native = None
        fs._last_runs = None
        assert fs.file_runs(entry) == kept, entry.path
        assert b"".join(fs.read_chunks(entry)) == (image.parent / f"{name}-tree" / entry.path.lstrip("/")).read_bytes()


@pytest.mark.parametrize("seed", range(4))
def test_walk_fields_on_random_inodes(tmp_path, seed):
    """Inode tables of random bytes: whatever walk_fields accepts, the full parse reads the same."""
    image = _image(tmp_path, "ext4")
    reader = ExtInodeReader(FileSource(str(image)))
    rng = random.Random(seed)
    data = bytearray(image.read_bytes())
    table = reader.inode_offset(1)
    span = reader.inodes_per_group * reader.inode_size
    data[table:table + span] = rng.randbytes(span)
    for i in range(0, span, reader.inode_size):   # some with a plausible i_extra_isize, as real inodes have
        if rng.random() < 0.5:
            data[table + i + 128:table + i + 130] = rng.choice([16, 28, 32, 0, 2, 200]).to_bytes(2, "little")
    image.write_bytes(bytes(data))
    reader = ExtInodeReader(FileSource(str(image)))
    answered = sum(_compare_inode(reader, ino) for ino in range(1, reader.inodes_per_group + 1))
    assert answered > 0
