"""qcow2 (and QCOW v1): our reader against qemu-img, byte for byte, on images
made by qemu-img itself, on real images from other projects, and on damaged
or hostile ones."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from repo_paths import REAL_IMAGES
from disk_support import (LARGE, OWN_EXPECTED, QEMU_IMG, SAME_AS_BASE, RealImages, assert_reads_like,
                          assert_like_qemu_img, assert_refused_or_warned, open_path, real_images,
                          time_limit)
from disk_support import images, no_big_leftovers, real  # noqa: F401 (fixtures)
from rescue.disk import DiskOptions, open_disk
from rescue.disk import qcow2
from rescue.extract.convert import convert
from rescue.disk.mapping import COMPRESSED, DATA
from rescue.errors import DamagedRange, DiskFormatError, RescueError, TargetError, UnsupportedFeature
from rescue.source.base import FileSource

CLUSTER = 65536
pytestmark = pytest.mark.usefixtures("no_big_leftovers")


# -- every variant qemu-img writes -------------------------------------------

@pytest.mark.parametrize("name", SAME_AS_BASE + OWN_EXPECTED + LARGE)
def test_every_qemu_img_variant_reads_exactly_like_qemu_img(images, name):
    disk = open_path(images.path(name))
    assert disk.info.format == "qcow2"
    ref = images.reference(name)
    assert_reads_like(disk, ref, seed=len(name), grain=disk.info.cluster_size)
    disk.close()


def test_info_describes_the_container(images):
    zstd = open_path(images.path("zstd.qcow2")).info
    assert (zstd.compression, zstd.subformat, zstd.cluster_size) == ("zstd", "compat=1.1", CLUSTER)
    assert open_path(images.path("v2.qcow2")).info.subformat == "compat=0.10"
    assert open_path(images.path("cs512.qcow2")).info.cluster_size == 512
    assert open_path(images.path("extl2.qcow2")).info.details["extended_l2"] is True
    top2 = open_path(images.path("chain-top2.qcow2")).info
    assert [Path(p).name for p in top2.backing_chain] == ["chain-top.qcow2", "chain-base.qcow2"]
    assert top2.virtual_size == 4196352
    assert top2.to_json()["format"] == "qcow2"


def test_extended_l2_overlay_mixes_subclusters_with_backing_data(images):
    disk = open_path(images.path("chain-extl2.qcow2"))
    kinds = {(p.length < disk.info.cluster_size, p.kind) for p in disk.pieces(0, disk.size)}
    # Sub-cluster data, zero and backing pieces all occur: the test image does
    # exercise the subcluster bitmaps.
    assert {(True, "data"), (True, "zero")} <= kinds and any(k == "backing" for _, k in kinds)


def test_internal_snapshots_are_listed_and_selectable(images):
    path = images.path("snap.qcow2")
    disk = open_path(path)
    assert [s["name"] for s in disk.info.snapshots] == ["before", "after"]
    ids = [s["id"] for s in disk.info.snapshots]
    before_ref = images.reference("snap.qcow2", internal_snapshot="before")
    for wanted in ("before", ids[0]):
        snap = open_path(path, internal_snapshot=wanted)
        assert snap.info.details["snapshot"].startswith(ids[0])
        assert_reads_like(snap, before_ref, seed=3, reads=50)
    # The active state differs from "before" (written after the snapshot).
    assert disk.read(4096, 4096) != snap.read(4096, 4096)
    with pytest.raises(DiskFormatError, match="before"):
        open_path(path, internal_snapshot="nope")


def test_backing_chain_inside_an_archive(images, tmp_path):
    """Parents are found next to the image wherever it lives: here, as
    members of the same .tar.gz (the provider's download)."""
    import tarfile
    from rescue.source import open_source

    archive = tmp_path / "snapshot.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("chain-top2.qcow2", "chain-top.qcow2", "chain-base.qcow2"):
            tar.add(images.path(name), arcname=name)
    disk = open_disk(open_source(str(archive), member="chain-top2.qcow2"), DiskOptions())
    assert len(disk.info.backing_chain) == 2
    assert_reads_like(disk, images.reference("chain-top2.qcow2"), seed=17, reads=60)
    disk.close()


# -- convert -------------------------------------------------------------------

@pytest.mark.parametrize("kernel_copy", [True, False], ids=["copy_file_range", "pread-pwrite"])
def test_convert_writes_qemu_img_bytes_as_a_sparse_file(images, tmp_path, monkeypatch, kernel_copy):
    from rescue.extract import convert as convert_module
    monkeypatch.setattr(convert_module, "_kernel_copy_works", kernel_copy)
    disk = open_path(images.path("chain-top2.qcow2"))
    out = tmp_path / "disk.raw"
    seen = []
    stats = convert(disk, out, progress=lambda done, total: seen.append((done, total)))
    assert out.read_bytes() == images.reference("chain-top2.qcow2").read_bytes()
    assert not (tmp_path / "disk.raw.part").exists()
    assert seen[-1] == (disk.size, disk.size)
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))
    assert stats.written + stats.holes == disk.size and not stats.damaged
    assert out.stat().st_blocks * 512 < disk.size // 2   # holes stayed holes
    with pytest.raises(TargetError, match="exists"):
        convert(disk, out)
    convert(disk, out, force=True)
    assert out.read_bytes() == images.reference("chain-top2.qcow2").read_bytes()


@pytest.mark.skipif(not QEMU_IMG, reason="qemu-img is not installed")
def test_convert_of_a_mostly_empty_large_disk_is_sparse(tmp_path):
    img = tmp_path / "big.qcow2"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", str(img), "256M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x42 100M 3M", str(img)],
                   check=True, capture_output=True)
    ref = tmp_path / "ref.raw"
    subprocess.run([QEMU_IMG, "convert", "-O", "raw", str(img), str(ref)], check=True)
    out = tmp_path / "out.raw"
    stats = convert(open_path(img), out)
    assert stats.written == 3 << 20
    assert out.stat().st_size == 256 << 20
    assert out.stat().st_blocks * 512 <= 4 << 20
    with open(out, "rb") as a, open(ref, "rb") as b:
        while True:
            x, y = a.read(32 << 20), b.read(32 << 20)
            assert x == y
            if not x:
                break


# -- real images from other projects ------------------------------------------

@pytest.mark.parametrize("row", real_images((".qcow2", ".qcow")))
def test_real_qcow_images(real, tmp_path, row):
    if row["malformed"] == "no":
        path = real.together(row)
        if not qcow2.detect(FileSource(path)):
            pytest.skip("not a qcow image (a data file belonging to one)")
        assert_like_qemu_img(path, tmp_path, seed=7)
    else:
        # Alone in a folder: what makes them "edge" (a missing backing file or
        # data file) must be a clear error, never a crash or a hang.
        assert_refused_or_warned(RealImages.alone(row, tmp_path))
        if row["malformed"] == "edge":  # with its siblings it must read like qemu-img
            assert_like_qemu_img(real.together(row), tmp_path, seed=7)


# -- damaged and hostile images ------------------------------------------------

def _header(path: Path):
    return qcow2.Header.parse(path.read_bytes()[:512])


def _write_header(path: Path, **changes) -> None:
    h = _header(path)
    h.update(changes)
    raw = qcow2.Header.build(h)
    with open(path, "r+b") as f:
        f.write(raw)


def make_qcow2(path: Path, size: int, backing: str | None = None, cluster_bits: int = 16) -> Path:
    """A minimal, valid, empty qcow2 v3 built from our own Struct."""
    cs = 1 << cluster_bits
    l1_size = -(-size // (cs * (cs // 8)))
    name = (backing or "").encode()
    header = qcow2.Header.build(dict(
        version=3, backing_file_offset=512 if backing else 0, backing_file_size=len(name),
        cluster_bits=cluster_bits, size=size, crypt_method=0, l1_size=l1_size,
        l1_table_offset=cs, refcount_table_offset=2 * cs, refcount_table_clusters=1,
        nb_snapshots=0, snapshots_offset=0, incompatible_features=0, compatible_features=0,
        autoclear_features=0, refcount_order=4, header_length=104, compression_type=None))
    image = bytearray(3 * cs)
    image[:len(header)] = header
    image[512:512 + len(name)] = name
    path.write_bytes(bytes(image))
    return path


def test_missing_backing_file_names_it_and_backing_option_overrides(images, tmp_path):
    lonely = tmp_path / "chain-top.qcow2"
    shutil.copy(images.path("chain-top.qcow2"), lonely)
    with pytest.raises(DiskFormatError, match="chain-base.qcow2") as err:
        open_path(lonely)
    assert "--backing" in err.value.one_line()
    disk = open_path(lonely, backing=str(images.path("chain-base.qcow2")))
    assert_reads_like(disk, images.reference("chain-top.qcow2"), seed=5, reads=50)


def test_backing_chain_loop_is_an_error(tmp_path):
    make_qcow2(tmp_path / "a.qcow2", 1 << 20, backing="b.qcow2")
    make_qcow2(tmp_path / "b.qcow2", 1 << 20, backing="a.qcow2")
    with time_limit(10), pytest.raises(DiskFormatError, match="loop"):
        open_path(tmp_path / "a.qcow2")
    make_qcow2(tmp_path / "self.qcow2", 1 << 20, backing="self.qcow2")
    with time_limit(10), pytest.raises(DiskFormatError, match="loop"):
        open_path(tmp_path / "self.qcow2")


def test_backing_chain_length_is_limited(tmp_path):
    make_qcow2(tmp_path / "c0.qcow2", 1 << 20)
    for i in range(1, 5):
        make_qcow2(tmp_path / f"c{i}.qcow2", 1 << 20, backing=f"c{i - 1}.qcow2")
    disk = open_path(tmp_path / "c4.qcow2")
    assert len(disk.info.backing_chain) == 4 and disk.read(0, 1 << 20) == bytes(1 << 20)
    with pytest.raises(DiskFormatError, match="longer than 3"):
        open_path(tmp_path / "c4.qcow2", max_chain=3)


@pytest.mark.parametrize("field,value,match", [
    ("size", 1 << 63, "size"),
    ("size", 1 << 50, "l1_size"),                 # L1 table too small for it
    ("l1_size", 0xFFFFFFFF, "l1_size"),
    ("l1_table_offset", 1 << 40, "l1_table_offset"),
    ("l1_table_offset", 12345, "l1_table_offset"),
    ("cluster_bits", 30, "cluster_bits"),
    ("cluster_bits", 8, "cluster_bits"),
    ("version", 4, "version"),
    ("header_length", 7, "header_length"),
    ("refcount_order", 9, "refcount_order"),
    ("backing_file_offset", 1 << 40, "backing_file_offset"),
    ("backing_file_size", 1 << 20, "backing_file_size"),
    ("nb_snapshots", 1 << 30, "nb_snapshots"),
])
def test_absurd_header_fields_name_the_field(images, tmp_path, field, value, match):
    path = tmp_path / "bad.qcow2"
    shutil.copy(images.path("v3.qcow2"), path)
    changes = {field: value}
    if field == "backing_file_size":
        changes["backing_file_offset"] = 512
    if field == "version":
        changes = {"version": 4, "incompatible_features": 0, "compatible_features": 0,
                   "autoclear_features": 0, "refcount_order": 4, "header_length": 104,
                   "compression_type": None}
    _write_header(path, **changes)
    with time_limit(10), pytest.raises(DiskFormatError, match=match) as err:
        open_path(path)
    assert str(path) in err.value.one_line()


@pytest.mark.parametrize("method,name", [(1, "AES"), (2, "LUKS")])
def test_encrypted_images_are_refused_clearly(images, tmp_path, method, name):
    path = tmp_path / "enc.qcow2"
    shutil.copy(images.path("v3.qcow2"), path)
    _write_header(path, crypt_method=method)
    with pytest.raises(UnsupportedFeature, match=f"encrypted qcow2 \\({name}\\)"):
        open_path(path)


def test_unknown_incompatible_feature_is_refused(images, tmp_path):
    path = tmp_path / "future.qcow2"
    shutil.copy(images.path("v3.qcow2"), path)
    _write_header(path, incompatible_features=1 << 20)
    with pytest.raises(UnsupportedFeature, match="0x100000"):
        open_path(path)


def test_dirty_and_corrupt_bits_warn_but_still_read(images, tmp_path):
    path = tmp_path / "dirty.qcow2"
    shutil.copy(images.path("v3.qcow2"), path)
    _write_header(path, incompatible_features=qcow2.INCOMPAT_DIRTY | qcow2.INCOMPAT_CORRUPT)
    disk = open_path(path)
    assert any("dirty" in w for w in disk.info.warnings)
    assert any("corrupt" in w for w in disk.info.warnings)
    assert_reads_like(disk, images.reference("v3.qcow2"), seed=9, reads=20)


@pytest.mark.parametrize("keep", [40, 72, 200, CLUSTER + 8, 3 * CLUSTER, 6 * CLUSTER, 9 * CLUSTER])
def test_truncated_images_fail_clearly_or_read_damaged_ranges(images, tmp_path, keep):
    path = tmp_path / "cut.qcow2"
    path.write_bytes(images.path("v3.qcow2").read_bytes()[:keep])
    with time_limit(20):
        try:
            disk = open_path(path)
        except DiskFormatError as exc:
            assert str(path) in exc.one_line()
            return
        ref = images.reference("v3.qcow2").read_bytes()
        damaged = 0
        for off in range(0, disk.size, CLUSTER):
            try:
                assert disk.read(off, CLUSTER) == ref[off:off + CLUSTER]
            except DamagedRange:
                damaged += 1
        assert damaged, "a truncated image read without any damaged range"


def _first(disk, kind):
    starts, extents = disk._table(0)
    return next(e for e in extents if e.kind == kind)


def test_l2_entry_past_the_end_damages_that_cluster_only(images, tmp_path):
    path = tmp_path / "l2.qcow2"
    shutil.copy(images.path("v3.qcow2"), path)
    disk = open_path(path)
    ext = _first(disk, DATA)
    l2_offset = disk.l1[0] & qcow2.OFFSET_MASK
    index = ext.start // CLUSTER
    disk.close()
    with open(path, "r+b") as f:
        f.seek(l2_offset + 8 * index)
        f.write(((1 << 40) | qcow2.COPIED).to_bytes(8, "big"))
    disk = open_path(path)
    ref = images.reference("v3.qcow2").read_bytes()
    with pytest.raises(DamagedRange, match="past the end"):
        disk.read(ext.start, 10)
    after = ext.start + CLUSTER
    assert disk.read(after, 3 * CLUSTER) == ref[after:after + 3 * CLUSTER]
    assert disk.read(0, ext.start) == ref[:ext.start]


def test_l1_entry_past_the_end_damages_that_table_only(images, tmp_path):
    path = tmp_path / "l1.qcow2"
    shutil.copy(images.path("cs512.qcow2"), path)   # small clusters: many L2 tables
    disk = open_path(path)
    l1_offset, span = _header(path).l1_table_offset, disk.span
    disk.close()
    with open(path, "r+b") as f:
        f.seek(l1_offset + 8)
        f.write(((1 << 45) | qcow2.COPIED).to_bytes(8, "big"))
    disk = open_path(path)
    ref = images.reference("cs512.qcow2").read_bytes()
    with pytest.raises(DamagedRange, match="L2 table 1"):
        disk.read(span, 1)
    assert disk.read(0, span) == ref[:span]
    assert disk.read(2 * span, 5000) == ref[2 * span:2 * span + 5000]


@pytest.mark.parametrize("name", ["zlib.qcow2", "zstd.qcow2"])
def test_corrupt_compressed_cluster_damages_that_range_only(images, tmp_path, name):
    path = tmp_path / name
    shutil.copy(images.path(name), path)
    disk = open_path(path)
    ext = _first(disk, COMPRESSED)
    offset, size = ext.host
    disk.close()
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * min(size, 64))
    disk = open_path(path)
    ref = images.reference(name).read_bytes()
    with pytest.raises(DamagedRange, match="decompress"):
        disk.read(ext.start + 100, 10)
    rest = ext.start + CLUSTER
    assert disk.read(rest, disk.size - rest) == ref[rest:]
    assert disk.read(0, ext.start) == ref[:ext.start]
    # convert keeps everything else and reports the damaged range.
    out = tmp_path / "out.raw"
    stats = convert(disk, out)
    assert stats.partial and stats.damaged[0][0] == ext.start
    data = out.read_bytes()
    assert data[:ext.start] == ref[:ext.start] and data[rest:] == ref[rest:]
    assert data[ext.start:rest] == bytes(CLUSTER)


def test_qcow_version_1_reads(tmp_path):
    path = REAL_IMAGES / "sleuthkit/img_image.qcow"
    if not path.exists():
        pytest.skip("../shared/real-images is absent")
    disk = open_path(path)
    assert disk.info.format == "qcow" and disk.info.subformat == "qcow v1"
    if not QEMU_IMG:
        pytest.skip("qemu-img is not installed (the reference)")
    assert_like_qemu_img(path, tmp_path, seed=7)


# -- through the whole stack and the command line -------------------------------

def _rescue(*args):
    """The CLI in-process (Typer's runner): exit code, stdout and stderr bytes."""
    from typer.testing import CliRunner
    from rescue.cli import app

    result = CliRunner().invoke(app, list(args))
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout_bytes,
                                       result.stderr_bytes or b"")


@pytest.mark.parametrize("name", ["zstd.qcow2", "chain-extl2.qcow2", "cs512.qcow2", "dynamic.vdi"])
def test_files_come_out_of_every_container_like_out_of_raw(images, name):
    path = images.path(name)
    done = _rescue("cat", str(path), "/etc/hostname")
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == b"rescue-fixture\n"
    notes = _rescue("cat", str(path), "/home/ann/notes.txt").stdout
    assert notes == "".join(f"line {i} of ann's notes\n" for i in range(3000)).encode()


def test_rescue_convert_command(images, tmp_path):
    out = tmp_path / "disk.raw"
    done = _rescue("convert", str(images.path("chain-top.qcow2")), "-o", str(out))
    assert done.returncode == 0, done.stderr.decode()
    assert out.read_bytes() == images.reference("chain-top.qcow2").read_bytes()
    again = _rescue("convert", str(images.path("chain-top.qcow2")), "-o", str(out))
    assert again.returncode == 2 and b"--force" in again.stderr and b"Traceback" not in again.stderr
    lonely = tmp_path / "chain-top.qcow2"
    shutil.copy(images.path("chain-top.qcow2"), lonely)
    missing = _rescue("convert", str(lonely), "-o", str(tmp_path / "x.raw"))
    assert missing.returncode == 2 and b"chain-base.qcow2" in missing.stderr
    assert not (tmp_path / "x.raw").exists() and not (tmp_path / "x.raw.part").exists()


def test_rescue_convert_reports_damage_with_exit_code_1(images, tmp_path):
    path = tmp_path / "bad.qcow2"
    shutil.copy(images.path("zlib.qcow2"), path)
    disk = open_path(path)
    offset, size = _first(disk, COMPRESSED).host
    disk.close()
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * 32)
    done = _rescue("convert", str(path), "-o", str(tmp_path / "out.raw"), "--json")
    assert done.returncode == 1, done.stderr.decode()
    assert b'"damaged"' in done.stdout and b"decompress" in done.stdout


def test_backing_option_on_an_image_without_parent_is_a_warning(images):
    disk = open_path(images.path("v3.qcow2"), backing="/nonexistent.qcow2")
    assert disk.backing is None and "ignored" in disk.info.warnings[0]


def test_backing_name_right_after_a_v2_header_is_not_an_extension(images, tmp_path):
    """Old qemu wrote the backing file name at offset 72, where version 2
    header extensions would start; qemu stops looking for extensions there."""
    top = tmp_path / "old.qcow2"
    make_qcow2(top, 4195840, backing="chain-base.qcow2")
    shutil.copy(images.path("chain-base.qcow2"), tmp_path / "chain-base.qcow2")
    _write_header(top, version=2, backing_file_offset=72, incompatible_features=None,
                  compatible_features=None, autoclear_features=None, refcount_order=None,
                  header_length=None, compression_type=None)
    with open(top, "r+b") as f:
        f.seek(72)
        f.write(b"chain-base.qcow2")
    disk = open_path(top)
    assert disk.info.subformat == "compat=0.10" and not disk.info.warnings
    assert_reads_like(disk, images.reference("chain-base.qcow2"), seed=23, reads=30)


def test_a_broken_header_extension_is_a_warning(images, tmp_path):
    path = tmp_path / "ext.qcow2"
    shutil.copy(images.path("v3.qcow2"), path)
    with open(path, "r+b") as f:
        f.seek(_header(path).header_length)
        f.write(qcow2.HeaderExtension.build(dict(type=0x12345678, length=8, data=bytes(8)))[:8]
                .replace(b"\x00\x00\x00\x08", b"\x7f\xff\xff\xff"))
    disk = open_path(path)
    assert any("extension 0x12345678" in w for w in disk.info.warnings)
    assert_reads_like(disk, images.reference("v3.qcow2"), seed=29, reads=20)


def test_absurd_snapshot_disk_size_is_refused(images, tmp_path):
    path = tmp_path / "snap.qcow2"
    shutil.copy(images.path("snap.qcow2"), path)
    entry = _header(path).snapshots_offset
    with open(path, "r+b") as f:  # extra data: vm_state_size_large, then disk_size
        f.seek(entry + 48)
        f.write((1 << 61).to_bytes(8, "big"))
    assert open_path(path).info.snapshots[0]["disk_size"] == 1 << 61  # listing still works
    with pytest.raises(DiskFormatError, match="size"):
        open_path(path, internal_snapshot="before")


def test_failed_convert_leaves_no_output_behind(images, tmp_path):
    disk = open_path(images.path("v3.qcow2"))
    with pytest.raises(TargetError, match="cannot create"):
        convert(disk, tmp_path / "no-such-dir" / "disk.raw")
    disk.source.close()  # the snapshot vanishes under us: reads fail with EBADF
    out = tmp_path / "disk.raw"
    with pytest.raises(OSError):
        convert(disk, out)
    assert not out.exists() and not (tmp_path / "disk.raw.part").exists()


def test_reading_and_converting_never_modifies_the_images(images, tmp_path):
    import hashlib

    names = ["chain-top2.qcow2", "chain-top.qcow2", "chain-base.qcow2", "zstd.qcow2", "dynamic.vdi"]
    before = {n: hashlib.sha256(images.path(n).read_bytes()).hexdigest() for n in names}
    stamps = {n: images.path(n).stat().st_mtime_ns for n in names}
    for n in ("chain-top2.qcow2", "zstd.qcow2", "dynamic.vdi"):
        disk = open_path(images.path(n))
        convert(disk, tmp_path / f"{n}.raw")
        disk.close()
    assert {n: hashlib.sha256(images.path(n).read_bytes()).hexdigest() for n in names} == before
    assert {n: images.path(n).stat().st_mtime_ns for n in names} == stamps


@pytest.mark.parametrize("name", ["v3.qcow2", "extl2.qcow2", "zstd.qcow2", "chain-top.qcow2",
                                  "snap.qcow2", "dynamic.vdi"])
def test_randomly_damaged_images_fail_cleanly(images, tmp_path, name):
    """Flip bytes in the metadata (header, tables): a clear error or damaged
    ranges, never another exception, a hang or unbounded memory."""
    import random

    original = images.path(name).read_bytes()
    shutil.copy(images.path("chain-base.qcow2"), tmp_path / "chain-base.qcow2")
    rnd = random.Random(name)
    path = tmp_path / name
    meta = min(len(original), 5 * CLUSTER if name.endswith(".qcow2") else 8192)
    for _ in range(40):
        data = bytearray(original)
        for _ in range(rnd.randrange(1, 6)):
            data[rnd.randrange(meta)] = rnd.randrange(256)
        path.write_bytes(bytes(data))
        with time_limit(20):
            try:
                disk = open_path(path)
            except RescueError:
                continue
            for off in range(0, disk.size, 1 << 20):
                try:
                    disk.read(off, 1 << 20)
                except DamagedRange:
                    pass
            list(disk.runs(0, disk.size))
            disk.close()
