"""The shared read path (rescue/disk/mapping.py) keeps the contract `rescue
convert` copies by: file_extents() names file bytes equal to what read()
returns, across the files of a multi-extent disk too, and is None wherever a
byte is not stored verbatim (zeros, a parent's bytes, compressed data). Checked
on table-mapped (qcow2) and block-mapped (VMDK, VHD) formats alike."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from disk_support import images, small  # noqa: F401 (fixtures)
from disk_support import open_path

STEP = 300_000    # odd-sized ranges, so pieces start and end inside clusters


def _copy_like_convert(disk, pos: int, n: int) -> bytes | None:
    located = disk.file_extents(pos, n)
    if located is None:
        return None
    assert [off for off, *_ in located] == [pos + sum(m for _, m, _, _ in located[:i])
                                            for i in range(len(located))], "pieces do not tile the range"
    assert sum(m for _, m, _, _ in located) == n
    return b"".join(os.pread(fd, m, host) for _, m, fd, host in located)


def _split_flat_vmdk(small: Path, tmp_path: Path, cut: int) -> Path:
    """The base disk as a descriptor over two flat files, split at sector `cut`."""
    base = (small / "vmdk_base.raw").read_bytes()
    (tmp_path / "a-flat.vmdk").write_bytes(base[:cut * 512])
    (tmp_path / "b-flat.vmdk").write_bytes(base[cut * 512:])
    (tmp_path / "two.vmdk").write_text(
        '# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\n'
        f'RW {cut} FLAT "a-flat.vmdk" 0\nRW {len(base) // 512 - cut} FLAT "b-flat.vmdk" 0\n')
    return tmp_path / "two.vmdk"


def test_file_extents_span_the_files_of_a_split_flat_vmdk(small, tmp_path):
    cut = 2049
    disk = open_path(_split_flat_vmdk(small, tmp_path, cut))
    edge = cut * 512
    located = disk.file_extents(edge - 1000, 3000)
    assert [(off, n, host) for off, n, _, host in located] == [(edge - 1000, 1000, edge - 1000),
                                                               (edge, 2000, 0)]
    assert located[0][2] != located[1][2]          # two files, two descriptors
    for pos in range(0, disk.size, STEP):
        n = min(STEP, disk.size - pos)
        assert _copy_like_convert(disk, pos, n) == disk.read(pos, n)
    disk.close()


@pytest.mark.parametrize("name", ["vhd_fixed.vhd", "vhd_dynamic.vhd", "vhdx_dynamic.vhdx",
                                  "vmdk_sparse.vmdk"])
def test_data_runs_are_kernel_copyable_and_holes_are_not(small, name):
    """In an image without parents or compression every data run is stored
    verbatim: its bytes can be copied from the file; a hole cannot."""
    disk = open_path(small / name)
    for r in disk.runs(0, disk.size):
        for pos in range(r.offset, r.offset + r.length, STEP):
            n = min(STEP, r.offset + r.length - pos)
            got = _copy_like_convert(disk, pos, n)
            if r.kind == "zero":
                assert got is None, f"hole at {pos}+{n} has file extents"
            else:
                assert got == disk.read(pos, n), f"{pos}+{n}"
    disk.close()


def test_no_file_extents_for_compressed_or_parent_data(images):
    zlib = open_path(images.path("zlib.qcow2"))
    data = next(r for r in zlib.runs(0, zlib.size) if r.kind == "data")
    assert zlib.file_extents(data.offset, min(data.length, 4096)) is None
    top = open_path(images.path("chain-top.qcow2"))
    backing = next(p for p in top.pieces(0, top.size) if p.kind == "backing")
    assert top.file_extents(backing.offset, min(backing.length, 4096)) is None
    zlib.close()
    top.close()
