"""What the XFS walk keeps in an Entry (the file's extent records in
`native`, attributes that lie in the inode in `xattrs`) gives exactly what
reading the inode again gives, on every committed fixture (every fork form)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import zstandard

import xfs_support as S
from common_support import zstd_decompress
from rescue.fs.base import DIR, FILE, FileReadError
from rescue.fs.xfs import XfsFileSystem
from rescue.source.base import FileSource

FIX = S.REPO / "fixtures" / "xfs"
MANIFEST = json.loads(zstandard.ZstdDecompressor().decompress((FIX / "MANIFEST.json.zst").read_bytes(),
                                                              max_output_size=64 << 20))
NAMES = sorted(n for n in MANIFEST if "volume" not in MANIFEST[n])


def _walk(fs: XfsFileSystem, path: str = "/"):
    for entry in fs.listdir(path):
        yield entry
        if entry.kind == DIR:
            yield from _walk(fs, entry.path)


def _fresh(entry):
    """The same entry as a caller that kept nothing would hand in."""
    bare = copy.copy(entry)
    bare.native = None
    bare.xattrs = None
    return bare


def _answer(fn, entry):
    try:
        return fn(entry)
    except FileReadError as exc:
        return ("error", str(exc))


@pytest.mark.parametrize("name", NAMES)
def test_walk_notes_equal_a_fresh_read(tmp_path, name):
    image: Path = zstd_decompress(FIX / f"{name}.img.zst", tmp_path / f"{name}.img")
    fs = XfsFileSystem(FileSource(image))
    files = noted = with_xattrs = 0
    for entry in _walk(fs):
        if entry.xattrs is not None:
            with_xattrs += bool(entry.xattrs)
            assert fs.xattrs(entry) == fs.xattrs(_fresh(entry)), entry.path
        if entry.kind != FILE:
            continue
        files += 1
        noted += entry.native is not None
        assert _answer(fs.file_runs, entry) == _answer(fs.file_runs, _fresh(entry)), entry.path
    assert files and noted   # the fixtures hold files whose map lies in the inode
    fs.close()
