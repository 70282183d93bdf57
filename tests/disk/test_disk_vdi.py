"""VirtualBox VDI: our reader against qemu-img on images qemu-img made, on a
hand-built image with blocks stored out of order, on real VDIs from other
projects, and on damaged ones."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from disk_support import (QEMU_IMG, RealImages, assert_like_qemu_img, assert_reads_like,
                          assert_refused_or_warned, open_path, qemu_reference, real_images, time_limit)
from disk_support import images, no_big_leftovers, real  # noqa: F401 (fixtures)
from rescue.disk import vdi
from rescue.disk.base import RawDisk
from rescue.extract.convert import convert
from rescue.errors import DamagedRange, DiskFormatError, UnsupportedFeature

MiB = 1 << 20
FREE, ZERO = vdi.BLOCK_FREE, vdi.BLOCK_ZERO
pytestmark = pytest.mark.usefixtures("no_big_leftovers")


def make_vdi(path: Path, bmap: list[int], *, disk_size: int | None = None, **changes) -> bytes:
    """A VDI of 1 MiB blocks built from our own Structs; block i of the data
    area holds the byte 0x40+i. `changes` override header fields only.
    Returns the disk it must read as."""
    block_size = MiB
    stored = [e for e in bmap if e < ZERO]
    data_offset = MiB
    fields = dict(
        header_size=400, image_type=1, image_flags=0, description=bytes(256),
        offset_bmap=512, offset_data=data_offset, cylinders=0, heads=0, sectors=0,
        sector_size=512, unused=0, disk_size=disk_size or len(bmap) * block_size,
        block_size=block_size, block_extra=0, blocks_in_image=len(bmap),
        blocks_allocated=len(stored), uuid_image=os.urandom(16), uuid_last_snap=bytes(16),
        uuid_link=bytes(16), uuid_parent=bytes(16))
    fields.update(changes)
    image = bytearray(data_offset + len(stored) * block_size)
    pre = vdi.PreHeader.build(dict(text=b"<<< Oracle VM VirtualBox Disk Image >>>\n".ljust(64, b"\0"),
                                   version=changes.pop("version", vdi.VERSION_1_1)))
    head = pre + vdi.Header.build(fields)
    image[:len(head)] = head
    for i, e in enumerate(bmap):
        image[512 + 4 * i:516 + 4 * i] = e.to_bytes(4, "little")
    for e in stored:
        at = data_offset + e * block_size
        image[at:at + block_size] = bytes([0x40 + e]) * block_size
    path.write_bytes(bytes(image))
    expect = b"".join(bytes([0x40 + e]) * block_size if e < ZERO else bytes(block_size) for e in bmap)
    return expect[:fields["disk_size"]]


@pytest.mark.parametrize("name,kind", [("dynamic.vdi", "dynamic"), ("static.vdi", "static")])
def test_qemu_img_vdis_read_exactly_like_qemu_img(images, name, kind):
    disk = open_path(images.path(name))
    assert (disk.info.format, disk.info.subformat, disk.info.cluster_size) == ("vdi", kind, MiB)
    ref = images.reference(name)
    assert_reads_like(disk, ref, seed=11, grain=MiB)


def test_out_of_order_free_and_zero_blocks(tmp_path):
    path = tmp_path / "hand.vdi"
    expect = make_vdi(path, [2, FREE, 0, ZERO, 1, FREE, 3], disk_size=6 * MiB + 4096)
    disk = open_path(path)
    assert disk.read(0, disk.size) == expect
    assert disk.read(MiB - 10, 20) == expect[MiB - 10:MiB + 10]
    assert [tuple(r[:3]) for r in disk.runs(0, disk.size)] == [
        (0, MiB, "data"), (MiB, MiB, "zero"), (2 * MiB, MiB, "data"), (3 * MiB, MiB, "zero"),
        (4 * MiB, MiB, "data"), (5 * MiB, MiB, "zero"), (6 * MiB, 4096, "data")]
    if QEMU_IMG:  # qemu-img agrees with what we built
        ref = tmp_path / "ref.raw"
        subprocess.run([QEMU_IMG, "convert", "-O", "raw", str(path), str(ref)], check=True)
        assert ref.read_bytes() == expect


def test_runs_of_a_mostly_free_vdi_and_sparse_convert(tmp_path):
    path = tmp_path / "sparse.vdi"
    bmap = [FREE] * 40
    bmap[7], bmap[30] = 0, 1
    expect = make_vdi(path, bmap)
    disk = open_path(path)
    runs = [(r.offset // MiB, r.length // MiB, r.kind) for r in disk.runs(0, disk.size)]
    assert runs == [(0, 7, "zero"), (7, 1, "data"), (8, 22, "zero"), (30, 1, "data"), (31, 9, "zero")]
    out = tmp_path / "out.raw"
    seen = []
    stats = convert(disk, out, progress=lambda d, t: seen.append(d))
    assert out.read_bytes() == expect
    assert stats.written == 2 * MiB and seen[-1] == 40 * MiB
    assert out.stat().st_blocks * 512 <= 3 * MiB


def test_convert_of_qemu_img_vdi_equals_qemu_img(images, tmp_path):
    out = tmp_path / "disk.raw"
    convert(open_path(images.path("dynamic.vdi")), out)
    assert out.read_bytes() == images.reference("dynamic.vdi").read_bytes()


@pytest.mark.parametrize("row", real_images((".vdi",)))
def test_real_vdi_images(real, tmp_path, row):
    if row["malformed"] == "no":
        assert_like_qemu_img(real.together(row), tmp_path, seed=13)
    else:
        assert_refused_or_warned(RealImages.alone(row, tmp_path))


def _uuid(path: Path) -> bytes:
    return vdi.Header.parse(path.read_bytes()[72:72 + vdi.Header.sizeof()]).uuid_image


def test_differencing_vdi_reads_its_own_blocks_over_the_parent(images, tmp_path):
    base = tmp_path / "vm" / "base.vdi"
    base.parent.mkdir()
    shutil.copy(images.path("dynamic.vdi"), base)
    parent = images.reference("dynamic.vdi").read_bytes()
    size = len(parent)
    bmap = [FREE, 0, ZERO, FREE, 1]            # 5 blocks: the last one is partial
    own = make_vdi(tmp_path / "diff.vdi", bmap, disk_size=size, image_type=4, uuid_link=_uuid(base))
    expect = b"".join(own[i * MiB:(i + 1) * MiB] if e != FREE else parent[i * MiB:(i + 1) * MiB]
                      for i, e in enumerate(bmap))
    # Next to the parent, and in the Snapshots/ folder below it, as VirtualBox keeps them.
    snapdir = base.parent / "Snapshots"
    snapdir.mkdir()
    for where in (base.parent / "child.vdi", snapdir / "{0f1e2d3c}.vdi"):
        shutil.copy(tmp_path / "diff.vdi", where)
        disk = open_path(where)
        assert disk.info.subformat == "differencing" and disk.info.backing_chain == [str(base)]
        assert disk.read(0, size) == expect
        assert disk.read(MiB - 7, 3 * MiB) == expect[MiB - 7:4 * MiB - 7]
        assert [tuple(r[:3]) for r in disk.runs(0, size)] == [
            (0, 2 * MiB, "data"), (2 * MiB, MiB, "zero"), (3 * MiB, size - 3 * MiB, "data")]
        where.unlink()
    # Alone: a clear error naming the parent's UUID; --backing supplies it.
    with pytest.raises(DiskFormatError, match="parent image with UUID") as err:
        open_path(tmp_path / "diff.vdi")
    assert "--backing" in err.value.one_line()
    assert open_path(tmp_path / "diff.vdi", backing=str(base)).read(0, size) == expect
    other = tmp_path / "other.vdi"
    make_vdi(other, [0])
    assert "not the parent" in open_path(tmp_path / "diff.vdi", backing=str(other)).info.warnings[0]


def test_differencing_vdis_naming_each_other_are_a_loop(tmp_path):
    a, b = os.urandom(16), os.urandom(16)
    make_vdi(tmp_path / "a.vdi", [FREE], image_type=4, uuid_image=a, uuid_link=b)
    make_vdi(tmp_path / "b.vdi", [FREE], image_type=4, uuid_image=b, uuid_link=a)
    with time_limit(10), pytest.raises(DiskFormatError, match="loop"):
        open_path(tmp_path / "a.vdi")


def test_undo_vdi_is_refused_clearly(tmp_path):
    make_vdi(tmp_path / "undo.vdi", [0], image_type=3)
    with pytest.raises(UnsupportedFeature, match="undo"):
        open_path(tmp_path / "undo.vdi")


def test_real_virtualbox_snapshot_vdi_reads_over_its_parent(real, tmp_path):
    rows = {r.values[0]["file"]: r.values[0] for r in real_images((".vdi",)) if r.values[0]}
    row = rows.get("bwlehrpool/image-default_snapshot.vdi")
    if row is None or not QEMU_IMG:
        pytest.skip("needs ../shared/real-images and qemu-img")
    child = real.together(row)
    disk = open_path(child)
    assert Path(disk.info.backing_chain[0]).name == "image-default.vdi"
    assert disk.header.blocks_allocated == 0  # an empty snapshot: it reads as its parent
    ref = qemu_reference(child.parent / "image-default.vdi", out=tmp_path / "parent.raw")
    assert_reads_like(disk, ref, seed=19, grain=MiB, reads=50)


@pytest.mark.parametrize("changes,match", [
    ({"block_size": 3000}, "block_size"),
    ({"block_size": 1 << 31}, "block_size"),
    ({"blocks_in_image": 1 << 30}, "blocks_in_image"),
    ({"blocks_in_image": 1 << 20}, "offset_bmap"),          # map runs past the end of the file
    ({"disk_size": 1 << 60}, "disk_size"),
    ({"offset_bmap": 1 << 31}, "offset_bmap"),
    ({"image_type": 9}, "image_type"),
    ({"version": 0x00010000}, "version 1.0"),
])
def test_bad_headers_name_the_field(tmp_path, changes, match):
    path = tmp_path / "bad.vdi"
    make_vdi(path, [0, FREE, 1], **changes)
    with time_limit(10), pytest.raises(DiskFormatError, match=match) as err:
        open_path(path)
    assert str(path) in err.value.one_line()


def test_block_past_the_end_damages_that_block_only(tmp_path):
    path = tmp_path / "past.vdi"
    expect = make_vdi(path, [0, 1, 2])
    with open(path, "r+b") as f:  # block 1 now points far past the end
        f.seek(512 + 4)
        f.write((5000).to_bytes(4, "little"))
    disk = open_path(path)
    with pytest.raises(DamagedRange, match="past the end"):
        disk.read(MiB + 5, 10)
    assert disk.read(0, MiB) == expect[:MiB]
    assert disk.read(2 * MiB, MiB) == expect[2 * MiB:]
    out = tmp_path / "out.raw"
    stats = convert(disk, out)
    assert [(o, n) for o, n, _ in stats.damaged] == [(MiB, MiB)]
    assert out.read_bytes() == expect[:MiB] + bytes(MiB) + expect[2 * MiB:]


@pytest.mark.parametrize("keep", [10, 70, 300, 600, MiB + 100])
def test_truncated_vdi_fails_clearly_or_damages_ranges(tmp_path, keep):
    path = tmp_path / "cut.vdi"
    make_vdi(path, [0, 1, FREE, 2])
    with open(path, "r+b") as f:
        f.truncate(keep)
    with time_limit(10):
        try:
            disk = open_path(path)
        except DiskFormatError as exc:
            assert str(path) in exc.one_line()
            return
        if isinstance(disk, RawDisk):  # the signature itself is cut off
            assert keep < 68
            return
        with pytest.raises(DamagedRange):
            disk.read(MiB, 10)
        assert disk.read(2 * MiB, MiB) == bytes(MiB)


def test_qcow2_only_options_are_not_silently_applied(tmp_path):
    path = tmp_path / "plain.vdi"
    make_vdi(path, [0])
    with pytest.raises(DiskFormatError, match="no internal snapshots"):
        open_path(path, internal_snapshot="before")
    assert "ignored" in open_path(path, backing="/nonexistent").info.warnings[0]
