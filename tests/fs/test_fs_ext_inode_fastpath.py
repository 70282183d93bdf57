"""The struct fast path of the ext inode reader agrees with its construct declaration."""

from __future__ import annotations

import os

import pytest

import repo_paths
from rescue.fs import ext_inode
from rescue.source import FileSource

FIXTURES = str(repo_paths.FIXTURES / "fs")


@pytest.mark.parametrize("image", ["ext2.img", "ext3.img"])
def test_fast_inode_parse_equals_the_declared_struct(image):
    reader = ext_inode.ExtInodeReader(FileSource(os.path.join(FIXTURES, image)))
    for ino in range(1, min(reader.inodes_count, 256) + 1):
        raw = reader.raw_inode(ino)
        declared, fast = ext_inode.Inode.parse(raw), ext_inode._fast_inode(raw)
        for name in ext_inode._INODE_NAMES:
            want = list(getattr(declared, name)) if name == "i_block" else getattr(declared, name)
            got = list(getattr(fast, name)) if name == "i_block" else getattr(fast, name)
            assert got == want, (image, ino, name)
