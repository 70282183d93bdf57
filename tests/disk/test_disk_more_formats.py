"""Parallels (images and Parallels Desktop .hdd bundles), Bochs, cloop, Apple
DMG, Proxmox VMA and split raw sets: the user's story is "my provider or
hypervisor exported this, and rescue read it like a raw disk".

- Real images from qemu's iotests and dfvfs/dissect test data
  (../shared/real-images) open; where qemu-img reads the format (Parallels,
  Bochs, cloop, DMG) our bytes equal `qemu-img convert -O raw`, whole disk
  and at random unaligned offsets.
- Images made here by the real tools (`qemu-img convert -O parallels`,
  bximage, create_compressed_fs) from an ext4 disk made with mkfs.ext4 -d:
  same differential check, and `rescue extract` from the container equals
  `rescue extract` from the raw disk.
- VMA and DMG have no writer on Debian: tests/more_formats_writers.py builds
  them from the published layouts (see its docstring).
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import repo_paths
from disk_support import assert_reads_like, need, qemu_reference
from common_support import REAL_IMAGES, rescue
from more_formats_writers import (DMG_ADC, DMG_BZIP2, DMG_IGNORE, DMG_LZFSE, DMG_LZMA, DMG_RAW, DMG_ZERO,
                                  DMG_ZLIB, dmg_bytes, vma_bytes)
from rescue.disk import FORMATS, DiskOptions, open_disk
from rescue.disk import bochs, cloop, dmg, parallels, unsupported, vma
from rescue.errors import DamagedRange, DiskFormatError, RescueError, UnsupportedFeature
from rescue.source.base import BytesSource, FileSource
from rescue.source.open import open_source
from rescue.source.split import ConcatSource

QEMU = REAL_IMAGES / "qemu"
HDD = REAL_IMAGES / "dissect.hypervisor" / "hdd"
DFVFS = REAL_IMAGES / "dfvfs"
need_real = pytest.mark.skipif(not (REAL_IMAGES / "INDEX.tsv").exists(),
                               reason=f"{REAL_IMAGES} is absent (clone outside the workspace)")
MIB = 1 << 20


def sha_tree(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def no_traceback(res: subprocess.CompletedProcess) -> str:
    err = res.stderr.decode(errors="replace")
    assert "Traceback" not in err, err[-3000:]
    return err


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("more_formats")


@pytest.fixture(scope="session")
def samples(work) -> dict[str, Path]:
    if not QEMU.exists():
        pytest.skip(f"{QEMU} is absent")
    out = {}
    for name in ("parallels-v1", "parallels-v2", "parallels-with-bitmap", "empty.bochs",
                 "simple-pattern.cloop", "simple-dmg.dmg", "fake.parallels"):
        dst = work / name
        dst.write_bytes(bz2.decompress((QEMU / f"{name}.bz2").read_bytes()))
        out[name] = dst
    return out


@pytest.fixture(scope="session")
def ext4_raw(work) -> Path:
    """An 8 MiB ext4 disk with a small tree (and holes), made by mkfs.ext4 -d."""
    need("mkfs.ext4")
    tree = work / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("rescued\n")
    (tree / "var" / "lib" / "db").mkdir(parents=True)
    rng = random.Random(7)
    (tree / "var" / "lib" / "db" / "data.bin").write_bytes(rng.randbytes(900_000))
    (tree / "var" / "lib" / "db" / "small.txt").write_text("x" * 5000)
    os.symlink("../etc/hostname", tree / "var" / "link")
    raw = work / "ext4.raw"
    with open(raw, "wb") as f:
        f.truncate(8 * MIB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), "-L", "more", str(raw)], check=True,
                   capture_output=True)
    return raw


@pytest.fixture(scope="session")
def raw_extract(work, ext4_raw) -> dict[str, str]:
    out = work / "extract-raw"
    res = rescue("extract", str(ext4_raw), "--path", "/", "-o", f"{out}/")
    assert res.returncode == 0, res.stderr.decode()
    tree = sha_tree(out)
    assert "var/lib/db/data.bin" in tree
    return tree


@pytest.fixture(scope="session")
def made(work, ext4_raw) -> dict[str, Path]:
    """The ext4 disk in each container a Debian tool writes (skipping missing tools)."""
    out: dict[str, Path] = {}
    if shutil.which("qemu-img"):
        for name, opts in (("qemu.parallels", []), ("qemu-64k.parallels", ["-o", "cluster_size=64k"])):
            dst = work / name
            subprocess.run(["qemu-img", "convert", "-O", "parallels", *opts, str(ext4_raw), str(dst)],
                           check=True, capture_output=True)
            out[name] = dst
    if shutil.which("bximage"):
        dst = work / "bximage.bochs"
        subprocess.run(["bximage", "-q", "-func=convert", "-imgmode=growing", str(ext4_raw), str(dst)],
                       check=True, capture_output=True)
        out["bximage.bochs"] = dst
    if shutil.which("create_compressed_fs"):
        dst = work / "made.cloop"
        subprocess.run(["create_compressed_fs", "-q", "-B", "65536", str(ext4_raw), str(dst)],
                       check=True, capture_output=True)
        out["made.cloop"] = dst
    return out


@pytest.fixture(scope="session")
def bundles(work) -> Path:
    """The dissect.hypervisor .hdd bundles with their .hds storages gunzipped."""
    if not HDD.exists():
        pytest.skip(f"{HDD} is absent")
    import gzip
    root = work / "hdd"
    for bundle in HDD.iterdir():
        dst = root / bundle.name
        dst.mkdir(parents=True)
        for f in bundle.iterdir():
            if f.name.endswith(".hds.gz"):
                with gzip.open(f) as src, open(dst / f.name[:-3], "wb") as out:
                    shutil.copyfileobj(src, out)
            else:
                shutil.copyfile(f, dst / f.name)
    return root


# ---------------------------------------------------------------- committed fixtures (no tools needed)

FIXTURES = repo_paths.FIXTURES / "moreformats"
MANIFEST = json.loads((FIXTURES / "MANIFEST.json").read_text()) if (FIXTURES / "MANIFEST.json").exists() else {}


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_committed_fixtures_read_as_their_maker_says(name):
    """scripts/make-more-format-fixtures: each container (gzip'd, read in place
    through the archive layer) reads as qemu-img read it, or as the disk the
    writer was given; the ext4 inside lists through the CLI."""
    entry = MANIFEST[name]
    disk = open_disk(open_source(FIXTURES / f"{name}.gz"))
    assert disk.info.format == entry["format"]
    assert disk.size == entry["size"]
    assert hashlib.sha256(disk.read(0, disk.size)).hexdigest() == entry["sha256"]
    if "drive-virtio1" in entry:
        other = open_disk(open_source(FIXTURES / f"{name}.gz"), DiskOptions(internal_snapshot="drive-virtio1"))
        assert hashlib.sha256(other.read(0, other.size)).hexdigest() == entry["drive-virtio1"]["sha256"]
    code, out, err, escaped = _cli("ls", str(FIXTURES / f"{name}.gz"), "/etc")
    assert escaped is None and code == 0 and "hostname" in out, err


# ---------------------------------------------------------------- real images (qemu iotests)

@need_real
@pytest.mark.parametrize("name,fmt,subformat", [
    ("parallels-v1", "parallels", "expanding"),
    ("parallels-v2", "parallels", "expanding"),
    ("parallels-with-bitmap", "parallels", "expanding"),
    ("empty.bochs", "bochs", "growing"),
    ("simple-pattern.cloop", "cloop", "V2.0"),
    ("simple-dmg.dmg", "dmg", "UDIF"),
])
def test_qemu_sample_images_read_like_qemu_img(samples, name, fmt, subformat):
    disk = open_disk(FileSource(samples[name]))
    assert (disk.info.format, disk.info.subformat) == (fmt, subformat)
    assert_reads_like(disk, qemu_reference(samples[name]), seed=len(name))
    disk.close()


@need_real
def test_parallels_v1_and_v2_samples_hold_the_same_disk(samples):
    v1, v2 = (open_disk(FileSource(samples[n])) for n in ("parallels-v1", "parallels-v2"))
    assert v1.info.details["version"].startswith("v1") and v2.info.details["version"].startswith("v2")
    data = v1.read(0, v1.size)
    assert data == v2.read(0, v2.size) and data.count(0) < len(data)


@need_real
def test_parallels_dirty_bitmap_extension_is_listed_not_applied(samples):
    disk = open_disk(FileSource(samples["parallels-with-bitmap"]))
    ext = disk.info.details["format_extension"]
    assert ext["features"] == ["dirty-bitmap"] and "ignored" in ext["note"]
    assert disk.size == 64 << 30


@need_real
def test_hand_crafted_parallels_header_is_a_clear_error(samples):
    with pytest.raises(DiskFormatError, match=r"bat_entries=16.*nb_sectors=4096"):
        open_disk(FileSource(samples["fake.parallels"]))
    res = rescue("inspect", str(samples["fake.parallels"]))
    err = no_traceback(res)
    assert res.returncode == 2 and "Parallels header" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- images made by real tools

@pytest.mark.parametrize("name,fmt", [("qemu.parallels", "parallels"), ("qemu-64k.parallels", "parallels"),
                                      ("bximage.bochs", "bochs"), ("made.cloop", "cloop")])
def test_tool_made_images_read_like_qemu_img_and_extract_like_raw(made, work, raw_extract, name, fmt):
    if name not in made:
        pytest.skip(f"the tool that writes {name} is not installed")
    disk = open_disk(FileSource(made[name]))
    assert disk.info.format == fmt
    assert_reads_like(disk, qemu_reference(made[name]), seed=3)
    disk.close()
    out = work / f"extract-{name}"
    res = rescue("extract", str(made[name]), "--path", "/", "-o", f"{out}/")
    no_traceback(res)
    assert res.returncode == 0
    assert sha_tree(out) == raw_extract


def test_bochs_sector_bitmap_decides_what_is_stored(work):
    """A growing Bochs image whose extent has only some bitmap bits set: the
    clear sectors read as zeros even though bytes are stored there (qemu's rule)."""
    need("bximage")
    raw = work / "bits.raw"
    raw.write_bytes(random.Random(5).randbytes(MIB))
    img = work / "bits.bochs"
    subprocess.run(["bximage", "-q", "-func=convert", "-imgmode=growing", str(raw), str(img)],
                   check=True, capture_output=True)
    blob = bytearray(img.read_bytes())
    h = bochs.Header.parse(bytes(blob))
    first = int.from_bytes(blob[h.header:h.header + 4], "little")
    stride = -(-h.bitmap // 512) * 512 + h.extent
    bm = h.header + h.catalog * 4 + first * stride
    blob[bm] &= 0b11111010          # sectors 0 and 2 of that extent: "not written"
    img.write_bytes(bytes(blob))
    disk = open_disk(FileSource(img))
    assert_reads_like(disk, qemu_reference(img), seed=9)


# ---------------------------------------------------------------- Parallels Desktop bundles

@need_real
def test_plain_and_expanding_bundles_hold_mib_i_filled_with_byte_i(bundles):
    """INDEX.tsv: both bundles are 100 MiB, MiB #i filled with byte i."""
    want = b"".join(bytes([i]) * MIB for i in range(100))
    for name in ("plain.hdd", "expanding.hdd"):
        disk = open_disk(open_source(bundles / name))
        assert disk.info.format == "parallels" and disk.size == 100 * MIB
        assert disk.read(0, disk.size) == want, name
        disk.close()


@need_real
def test_bundle_opens_from_folder_stub_or_descriptor(bundles):
    b = bundles / "expanding.hdd"
    views = []
    for spec in (b, b / "expanding.hdd", b / "DiskDescriptor.xml"):
        disk = open_disk(open_source(spec))
        views.append((disk.size, hashlib.sha256(disk.read(0, disk.size)).hexdigest(),
                      disk.info.subformat))
        disk.close()
    assert views[0] == views[1] == views[2]
    assert "Compressed" in views[0][2]


@need_real
def test_split_bundle_concatenates_storages_by_sector_range(bundles):
    """The dissect.hypervisor test's facts: six storages of 3989504 x5 + 1024000
    sectors; MiB 0 is byte 1; each storage ends with its number + 1 and the
    next begins with number + 2. Each storage also reads like qemu-img."""
    disk = open_disk(open_source(bundles / "split.hdd"))
    sizes = [3989504] * 5 + [1024000]
    assert disk.size == sum(sizes) * 512
    assert disk.read(0, MIB) == b"\x01" * MIB
    end = 0
    for i, n in enumerate(sizes):
        end += n * 512
        buf = disk.read(end - 512, 1024)
        assert buf == (bytes([i + 1]) * 512 + bytes([i + 2]) * 512 if i < 5 else bytes([i + 1]) * 512)
    storages = sorted((bundles / "split.hdd").glob("*.hds"))
    assert len(storages) == 6
    # Differential: every storage alone against qemu-img, and the bundle's data
    # runs against the storages qemu-img read, placed at their sector ranges.
    start = 0
    refs = []
    for hds, n in zip(storages, sizes):
        part = open_disk(FileSource(hds))
        ref = qemu_reference(hds, "parallels")
        assert part.size == ref.stat().st_size == n * 512
        assert_reads_like(part, ref, seed=n, whole_limit=0)
        refs.append((start, ref))
        start += n * 512
    def ref_read(off: int, n: int) -> bytes:
        out = b""
        for base, ref in refs:
            size = ref.stat().st_size
            lo, hi = max(off, base), min(off + n, base + size)
            if lo < hi:
                with open(ref, "rb") as f:
                    f.seek(lo - base)
                    out += f.read(hi - lo)
        return out

    data_runs = [r for r in disk.runs(0, disk.size) if r.kind == "data"]
    assert len(data_runs) >= 6
    for r in data_runs:
        n = min(r.length, 4 * MIB)
        assert disk.read(r.offset, n) == ref_read(r.offset, n)
        assert disk.read(r.offset + r.length - n, n) == ref_read(r.offset + r.length - n, n)
    disk.close()


SNAP_DESCRIPTOR = """<?xml version='1.0' encoding='UTF-8'?>
<Parallels_disk_image Version="1.0">
  <Disk_Parameters><Disk_size>{sectors}</Disk_size><Encryption><Engine>{{00000000-0000-0000-0000-000000000000}}</Engine></Encryption></Disk_Parameters>
  <StorageData><Storage><Start>0</Start><End>{sectors}</End><Blocksize>2048</Blocksize>
    <Image><GUID>{{aaaaaaaa-0000-0000-0000-000000000001}}</GUID><Type>Compressed</Type><File>snap.hdd.0.base.hds</File></Image>
    <Image><GUID>{{bbbbbbbb-0000-0000-0000-000000000002}}</GUID><Type>Compressed</Type><File>snap.hdd.0.top.hds</File></Image>
  </Storage></StorageData>
  <Snapshots>
    <Shot><GUID>{{bbbbbbbb-0000-0000-0000-000000000002}}</GUID><ParentGUID>{{aaaaaaaa-0000-0000-0000-000000000001}}</ParentGUID></Shot>
    <Shot><GUID>{{aaaaaaaa-0000-0000-0000-000000000001}}</GUID><ParentGUID>{{00000000-0000-0000-0000-000000000000}}</ParentGUID></Shot>
  </Snapshots>
</Parallels_disk_image>
"""


def test_bundle_with_a_snapshot_reads_the_newest_state(work):
    """A bundle whose storage holds a base image and a snapshot image (made by
    qemu-img -O parallels: zero clusters stay unallocated, so they fall through
    to the base): the disk is the snapshot's state."""
    need("qemu-img")
    rng = random.Random(21)
    base = rng.randbytes(4 * MIB)
    delta = bytearray(4 * MIB)
    delta[MIB:2 * MIB] = rng.randbytes(MIB)
    delta[3 * MIB + 4096:3 * MIB + 8192] = b"\x77" * 4096
    want = bytearray(base)
    want[MIB:2 * MIB] = delta[MIB:2 * MIB]
    want[3 * MIB:4 * MIB] = delta[3 * MIB:4 * MIB]   # the snapshot holds whole 1 MiB clusters
    b = work / "snap.hdd"
    b.mkdir()
    for name, data in (("base", base), ("top", bytes(delta))):
        raw = work / f"snap-{name}.raw"
        raw.write_bytes(data)
        subprocess.run(["qemu-img", "convert", "-O", "parallels", str(raw), str(b / f"snap.hdd.0.{name}.hds")],
                       check=True, capture_output=True)
    (b / "DiskDescriptor.xml").write_text(SNAP_DESCRIPTOR.format(sectors=4 * MIB // 512))
    (b / "snap.hdd").write_bytes(b"")
    disk = open_disk(open_source(b))
    assert disk.info.details["snapshots"] == 2
    assert disk.read(0, disk.size) == bytes(want)


def test_bundle_descriptor_with_entities_or_bad_numbers_is_refused(work):
    b = work / "evil.hdd"
    b.mkdir()
    (b / "DiskDescriptor.xml").write_text(
        '<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
        "<Parallels_disk_image><Disk_Parameters><Disk_size>&e;</Disk_size></Disk_Parameters>"
        "</Parallels_disk_image>")
    with pytest.raises(DiskFormatError, match="DOCTYPE"):
        open_disk(open_source(b))
    (b / "DiskDescriptor.xml").write_text(
        "<Parallels_disk_image><Disk_Parameters><Disk_size>lots</Disk_size></Disk_Parameters>"
        "</Parallels_disk_image>")
    with pytest.raises(DiskFormatError, match="Disk_size"):
        open_disk(open_source(b / "DiskDescriptor.xml"))
    (b / "DiskDescriptor.xml").write_text(
        "<Parallels_disk_image><Disk_Parameters><Disk_size>2048</Disk_size></Disk_Parameters>"
        "<StorageData><Storage><Start>0</Start><End>2048</End><Image><GUID>{1}</GUID><Type>Plain</Type>"
        "<File>../../etc/passwd</File></Image></Storage></StorageData></Parallels_disk_image>")
    with pytest.raises(DiskFormatError, match="refused"):
        open_disk(open_source(b))
    res = rescue("inspect", str(b))
    no_traceback(res)
    assert res.returncode == 2


# ---------------------------------------------------------------- DMG

def _dmg_disk() -> bytes:
    rng = random.Random(11)
    return rng.randbytes(64 * 512) + bytes(64 * 512) + rng.randbytes(96 * 512)


def test_dmg_zlib_raw_zero_ignore_chunks_read_like_qemu_img(work):
    disk = _dmg_disk()
    layout = [(0, 16, DMG_RAW), (16, 48, DMG_ZLIB), (64, 40, DMG_ZERO), (104, 24, DMG_IGNORE),
              (128, 1, DMG_ZLIB), (129, 95, DMG_ZLIB)]
    path = work / "made.dmg"
    path.write_bytes(dmg_bytes(disk, layout))
    d = open_disk(FileSource(path))
    assert (d.info.format, d.info.compression) == ("dmg", "zlib")
    assert d.read(0, d.size) == disk
    assert_reads_like(d, qemu_reference(path), seed=1)


def test_dmg_bzip2_lzfse_lzma_chunks_and_unsupported_adc_range(work):
    """qemu-img on Debian has no bzip2/LZFSE DMG modules: these chunks are
    checked against the data written. ADC is not read: only its range fails."""
    disk = _dmg_disk()
    layout = [(0, 32, DMG_BZIP2), (32, 32, DMG_LZMA), (64, 64, DMG_ZERO), (128, 8, DMG_ADC),
              (136, 88, DMG_RAW)]
    if importlib.util.find_spec("lzfse") is not None:
        layout[1:2] = [(32, 16, DMG_LZMA), (48, 16, DMG_LZFSE)]
    path = work / "codecs.dmg"
    path.write_bytes(dmg_bytes(disk, layout))
    d = open_disk(FileSource(path))
    assert "bzip2" in d.info.compression and "lzma" in d.info.compression
    assert d.read(0, 128 * 512) == disk[:128 * 512]
    assert d.read(136 * 512, 88 * 512) == disk[136 * 512:]
    with pytest.raises(DamagedRange, match="ADC"):
        d.read(127 * 512, 1024)
    assert [r.kind for r in d.runs(64 * 512, 64 * 512)] == ["zero"]


def test_encrypted_dmg_is_refused_by_name(work):
    path = work / "secret.dmg"
    path.write_bytes(b"encrcdsa" + bytes(4096))
    with pytest.raises(UnsupportedFeature, match="encrypted"):
        open_disk(FileSource(path))


def test_vma_device_choice_through_the_cli(vma_file):
    path, disks = vma_file
    res = rescue("inspect", str(path), "--internal-snapshot", "drive-virtio1")
    no_traceback(res)
    assert res.returncode == 0 and "drive-virtio1" in res.stdout.decode()
    res = rescue("inspect", str(path), "--internal-snapshot", "drive-sata9")
    err = no_traceback(res)
    assert res.returncode == 2 and "drive-scsi0, drive-virtio1, vmstate" in err
    # --snapshot, the option's old name, still works for scripts, but --help shows only the new one
    res = rescue("inspect", str(path), "--snapshot", "drive-virtio1")
    assert res.returncode == 0 and "drive-virtio1" in res.stdout.decode()
    shown = rescue("inspect", "--help").stdout.decode()
    assert "--internal-snapshot" in shown and "--snapshot" not in shown


def test_dmg_gap_between_chunks_and_damaged_plist(work):
    disk = _dmg_disk()
    path = work / "gap.dmg"
    path.write_bytes(dmg_bytes(disk, [(0, 64, DMG_ZLIB), (100, 124, DMG_RAW)]))
    d = open_disk(FileSource(path))
    assert d.read(0, 64 * 512) == disk[:64 * 512]
    with pytest.raises(DamagedRange, match="no DMG chunk describes sectors 64..99"):
        d.read(70 * 512, 10)
    blob = bytearray(path.read_bytes())
    at = blob.index(b"<key>blkx</key>")
    blob[at:at + 15] = b"<key>blkz</key>"
    bad = work / "badplist.dmg"
    bad.write_bytes(bytes(blob))
    with pytest.raises(DiskFormatError, match="blkx"):
        open_disk(FileSource(bad))
    res = rescue("inspect", str(bad))
    no_traceback(res)
    assert res.returncode == 2


# ---------------------------------------------------------------- VMA

def _vm_disks(ext4_raw: Path) -> list[tuple[str, bytes]]:
    rng = random.Random(3)
    second = bytearray(3 * MIB + 12345)          # not a whole number of clusters
    for _ in range(30):
        o = rng.randrange(0, len(second) - 9000)
        second[o:o + rng.randrange(1, 9000)] = b"\xa5" * 9000 if rng.random() < .3 else rng.randbytes(9000)
    second = bytes(second[:3 * MIB + 12345])
    return [("drive-scsi0", ext4_raw.read_bytes()), ("drive-virtio1", second),
            ("vmstate", rng.randbytes(100_000))]


@pytest.fixture(scope="session")
def vma_file(work, ext4_raw) -> tuple[Path, list[tuple[str, bytes]]]:
    disks = _vm_disks(ext4_raw)
    path = work / "vzdump-qemu-101.vma"
    path.write_bytes(vma_bytes(disks, {"qemu-server.conf": b"boot: order=scsi0\ncores: 2\n",
                                       "qemu-server.fw": b"[OPTIONS]\n"}))
    return path, disks


def test_vma_reads_first_disk_and_lists_all_devices(vma_file, ext4_raw):
    path, disks = vma_file
    d = open_disk(FileSource(path))
    assert d.info.format == "vma" and d.info.details["selected"] == "drive-scsi0"
    assert [x["name"] for x in d.info.details["devices"]] == ["drive-scsi0", "drive-virtio1", "vmstate"]
    assert d.info.details["configs"] == ["qemu-server.conf", "qemu-server.fw"]
    assert_reads_like(d, ext4_raw, seed=4)
    # Zero clusters are holes: an ext4 disk made by mkfs is mostly empty.
    assert sum(r.length for r in d.runs(0, d.size) if r.kind == "zero") > d.size // 2


def test_vma_other_device_by_name_and_unknown_name(vma_file, work):
    path, disks = vma_file
    d = open_disk(FileSource(path), DiskOptions(internal_snapshot="drive-virtio1"))
    want = disks[1][1]
    assert d.size == len(want) and d.read(0, d.size) == want
    rng = random.Random(1)
    for _ in range(100):
        off, n = rng.randrange(len(want)), rng.randrange(1, 200_000)
        assert d.read(off, n) == want[off:off + n]
    with pytest.raises(DiskFormatError, match="drive-virtio1"):
        open_disk(FileSource(path), DiskOptions(internal_snapshot="drive-sata9"))


def test_vma_zst_opens_through_rescue_inspect_and_extracts_like_raw(vma_file, work, raw_extract):
    need("zstd")
    path, _ = vma_file
    zst = work / "vzdump-qemu-101.vma.zst"
    subprocess.run(["zstd", "-q", "-f", "-o", str(zst), str(path)], check=True)
    d = open_disk(open_source(zst))
    assert d.info.format == "vma"
    assert d.read(0, d.size) == open_disk(FileSource(path)).read(0, d.size)
    res = rescue("inspect", str(zst))
    out = res.stdout.decode()
    no_traceback(res)
    assert res.returncode == 0 and "vma" in out and "ext4" in out
    dst = work / "extract-vma"
    res = rescue("extract", str(zst), "--path", "/", "-o", f"{dst}/")
    no_traceback(res)
    assert res.returncode == 0 and sha_tree(dst) == raw_extract


def test_vma_writer_lays_out_blobs_like_a_real_vzdump_archive():
    """Cross-check of the test writer with a real archive's facts (dissect.hypervisor's
    test.vma, a slice of a Proxmox backup, as its test asserts them): with a 417-byte
    qemu-server.conf, the blobs sit at 1 (its name), 20 (its data) and 439 (the
    device name), the header is 12800 bytes and cluster 0's data starts at 13312."""
    conf = b"c" * 417
    blob = vma_bytes([("drive-scsi0", b"\x01" * 65536)], {"qemu-server.conf": conf})
    h = vma.Header.parse(blob)
    assert h.header_size == 12800 and h.blob_buffer_offset == 12288
    assert (h.config_names[0], h.config_data[0], h.dev_info[1].devname_ptr) == (1, 20, 439)
    d = vma.VmaDisk(BytesSource(blob))
    assert d.index[0] >> 16 == 13312 // 512 and d.index[0] & 0xFFFF == 0xFFFF
    assert d.info.details["configs"] == ["qemu-server.conf"] and d.read(0, 65536) == b"\x01" * 65536


def test_vma_truncated_or_damaged(vma_file, work):
    path, disks = vma_file
    blob = path.read_bytes()
    cut = work / "cut.vma"
    cut.write_bytes(blob[:len(blob) // 2 + 1000])     # an interrupted upload
    d = open_disk(FileSource(cut))
    assert any("missing" in w for w in d.info.warnings)
    assert d.read(0, 4096) == disks[0][1][:4096]
    with pytest.raises(DamagedRange):
        d.read(0, d.size)
    bad = bytearray(blob)
    bad[60] ^= 1                                       # header MD5 no longer matches
    (work / "bad.vma").write_bytes(bytes(bad))
    with pytest.raises(DiskFormatError, match="MD5"):
        open_disk(FileSource(work / "bad.vma"))


# ---------------------------------------------------------------- split raw

@need_real
def test_dfvfs_split_raw_is_one_disk_with_its_ext2(work):
    for name in ("ext2.splitraw.000", "ext2.splitraw.001"):
        shutil.copyfile(DFVFS / name, work / name)
    parts = [(work / n).read_bytes() for n in ("ext2.splitraw.000", "ext2.splitraw.001")]
    src = open_source(work / "ext2.splitraw.000")
    assert isinstance(src, ConcatSource) and src.size == sum(map(len, parts))
    assert src.read(0, src.size) == b"".join(parts)
    assert src.read(len(parts[0]) - 5, 10) == parts[0][-5:] + parts[1][:5]
    # The second segment given alone is just that file: .000 exists, so it starts nothing.
    assert open_source(work / "ext2.splitraw.001").size == len(parts[1])
    res = rescue("inspect", str(work / "ext2.splitraw.000"))
    no_traceback(res)
    assert res.returncode == 0 and "ext2" in res.stdout.decode()
    res = rescue("extract", str(work / "ext2.splitraw.000"), "--path", "/", "-o", f"{work}/x-split/")
    no_traceback(res)
    assert res.returncode == 0 and (work / "x-split" / "passwords.txt").exists()


@need_real
def test_bogus_split_segment_does_not_crash(work):
    dst = work / "bogus" / "bogus.001"
    dst.parent.mkdir()
    shutil.copyfile(DFVFS / "bogus.001", dst)
    src = open_source(dst)
    assert not isinstance(src, ConcatSource)
    for cmd in (["inspect", str(dst)], ["extract", str(dst), "--path", "/", "-o", f"{work}/x-bogus/"]):
        res = rescue(*cmd)
        no_traceback(res)
        assert res.returncode in (0, 1, 2)


@pytest.mark.parametrize("suffixes", [["aa", "ab", "ac"], ["001", "002", "003"], ["000", "001", "002"]])
def test_split_sets_made_by_split_concatenate(work, ext4_raw, suffixes):
    data = ext4_raw.read_bytes()
    folder = work / ("split-" + suffixes[0])
    folder.mkdir()
    size = -(-len(data) // len(suffixes))
    for i, suf in enumerate(suffixes):
        (folder / f"disk.{suf}").write_bytes(data[i * size:(i + 1) * size])
    src = open_source(folder / f"disk.{suffixes[0]}")
    assert src.size == len(data) and src.read(0, len(data)) == data
    disk = open_disk(src)
    assert [r.kind for r in disk.runs(0, disk.size)] == ["data"]
    res = rescue("ls", str(folder / f"disk.{suffixes[0]}"), "/etc")
    no_traceback(res)
    assert res.returncode == 0 and "hostname" in res.stdout.decode()


def test_split_set_with_more_segments_than_open_files(work):
    """2000 segments (more than the 1024 files a process may often hold open): the
    set still reads, segments being opened only while read."""
    folder = work / "split-many"
    folder.mkdir()
    rng = random.Random(8)
    data = rng.randbytes(2000 * 512)
    for i in range(2000):
        (folder / f"d.{i:04d}").write_bytes(data[i * 512:(i + 1) * 512])
    src = open_source(folder / "d.0000")
    assert src.size == len(data) and src.read(0, len(data)) == data
    assert src.read(1023 * 512 - 3, 7) == data[1023 * 512 - 3:1023 * 512 + 4]
    from rescue.source.split import _Segment
    assert 0 < len(_Segment._open) <= _Segment.MAX_OPEN
    src.close()
    assert not any(seg.path.startswith(str(folder)) for seg in _Segment._open)


def test_split_gzip_archive_is_joined_then_decompressed(work, ext4_raw):
    """`split -b` of a .raw.gz (how big downloads get cut for FAT32 media): the
    segments are joined first, then the archive layer reads the gzip stream."""
    need("gzip")
    folder = work / "split-gz"
    folder.mkdir()
    gz = folder / "disk.raw.gz"
    subprocess.run(["gzip", "-k", "-c", str(ext4_raw)], stdout=open(gz, "wb"), check=True)
    blob = gz.read_bytes()
    gz.unlink()
    size = -(-len(blob) // 3)
    for i in range(3):
        (folder / f"disk.raw.gz.{i + 1:03d}").write_bytes(blob[i * size:(i + 1) * size])
    src = open_source(folder / "disk.raw.gz.001")
    assert src.size == ext4_raw.stat().st_size
    assert src.read(0, src.size) == ext4_raw.read_bytes()


# ---------------------------------------------------------------- detection and CLI

def test_new_readers_are_registered_after_the_others_and_never_claim_raw(ext4_raw):
    assert FORMATS[:5] == ["qcow2", "vdi", "vmdk", "vhdx", "vhd"]
    assert FORMATS[5:] == ["parallels", "bochs", "cloop", "dmg", "vma", "unsupported"]
    rng = random.Random(0)
    raws = [BytesSource(ext4_raw.read_bytes()), BytesSource(bytes(MIB)), BytesSource(rng.randbytes(MIB)),
            BytesSource(b"#!/bin/sh\necho hi\n" + bytes(1000)), BytesSource(b"<?xml version='1.0'?><a/>"),
            BytesSource(b"")]
    for src in raws:
        for reader in (parallels, bochs, cloop, dmg, vma, unsupported):
            assert not reader.detect(src), (reader.__name__, src.data[:20])
        assert open_disk(src).info.format == "raw"


def test_headers_with_absurd_fields_are_clear_errors():
    def par(**kw):
        fields = dict(magic=parallels.MAGIC_V2, version=2, heads=16, cylinders=1, tracks=128, bat_entries=4,
                      nb_sectors=512, inuse=0, data_off=1, flags=0, ext_off=0)
        fields.update(kw)
        return BytesSource(parallels.Header.build(fields) + bytes(4096), name="x.hds")
    for kw, field in ((dict(tracks=0), "tracks"), (dict(bat_entries=1 << 27), "bat_entries"),
                      (dict(bat_entries=1), "bat_entries"), (dict(version=3), "version")):
        with pytest.raises(DiskFormatError, match=field):
            open_disk(par(**kw))
    head = cloop.Header.build(dict(preamble=b"#!/bin/sh\n#V2.0 Format\n".ljust(128, b"\0"),
                                   block_size=1000, n_blocks=1))
    with pytest.raises(DiskFormatError, match="block_size=1000"):
        open_disk(BytesSource(head + bytes(100)))
    v4 = b"#!/bin/sh\n#V4.0 Format\n".ljust(128, b"\0") + bytes(100)
    with pytest.raises(UnsupportedFeature, match="V4.0"):
        open_disk(BytesSource(v4))
    head = cloop.Header.build(dict(preamble=b"#!/bin/sh\n#V2.0 Format\n".ljust(128, b"\0"),
                                   block_size=512, n_blocks=2))
    offsets = b"".join(x.to_bytes(8, "big") for x in (200, 150, 300))
    with pytest.raises(DiskFormatError, match="not increasing"):
        open_disk(BytesSource(head + offsets + bytes(300)))
    bochs_head = bytearray(512)
    bochs_head[0:22] = b"Bochs Virtual HD Image"
    bochs_head[32:39] = b"Redolog"
    bochs_head[48:56] = b"Undoable"
    with pytest.raises(UnsupportedFeature, match="Undoable"):
        open_disk(BytesSource(bytes(bochs_head)))


def _cli(*args: str):
    """The CLI in-process (Typer's runner; a Python start-up per command would
    dominate this file's runtime): exit code, stdout, stderr, and any exception
    that escaped the command (there must be none besides SystemExit)."""
    from typer.testing import CliRunner
    from rescue.cli import app

    result = CliRunner().invoke(app, list(args))
    escaped = result.exception if not isinstance(result.exception, (SystemExit, type(None))) else None
    return result.exit_code, result.stdout, result.stderr or "", escaped


@need_real
def test_cli_on_every_real_image_never_tracebacks(samples, bundles, work):
    specs = [samples[n] for n in samples] + [bundles / "plain.hdd", bundles / "split.hdd" / "split.hdd"]
    for spec in specs:
        before = hashlib.sha256(spec.read_bytes()).hexdigest() if spec.is_file() else None
        code, out, err, escaped = _cli("inspect", str(spec))
        assert escaped is None and "Traceback" not in err, (spec, escaped, err)
        assert code in (0, 2), err
        if code == 2:
            assert len(err.strip().splitlines()) == 1, err
        dst = work / f"cli-{spec.name}"
        code, out, err, escaped = _cli("extract", str(spec), "--path", "/", "-o", f"{dst}/")
        assert escaped is None and "Traceback" not in err, (spec, escaped, err)
        # No filesystem on these pattern disks (except the DMG's HFS+): one clear line.
        assert code in (0, 1) or (code == 2 and len(err.strip().splitlines()) == 1), err
        if before is not None:
            assert hashlib.sha256(spec.read_bytes()).hexdigest() == before, f"{spec} changed"
    dmg_out = work / "cli-simple-dmg.dmg"
    assert any(dmg_out.rglob("*")), "the DMG's HFS+ files were extracted"


@need_real
def test_mutated_headers_and_tables_give_clear_errors_only(samples, vma_file):
    """Seeded fuzzing of every new reader's metadata: each open/read ends in a
    RescueError or DamagedRange, never another exception, a hang or a huge read."""
    images = {n: samples[n].read_bytes() for n in ("parallels-v1", "parallels-v2", "empty.bochs",
                                                   "simple-pattern.cloop", "simple-dmg.dmg")}
    images["vma"] = vma_file[0].read_bytes()[:200_000]
    rng = random.Random(1234)
    for name, base in images.items():
        for _ in range(120):
            b = bytearray(base)
            for _ in range(rng.randrange(1, 6)):
                tail = name.endswith(".dmg") and rng.random() < .5   # DMG metadata is at the end
                p = rng.randrange(max(0, len(b) - 9000), len(b)) if tail else rng.randrange(min(len(b), 13000))
                b[p] = rng.randrange(256)
            if rng.random() < .2:
                b = b[:rng.randrange(len(b))]
            try:
                d = open_disk(BytesSource(bytes(b), name=name))
                for _ in range(4):
                    try:
                        d.read(rng.randrange(max(1, d.size)), rng.randrange(1, MIB))
                    except DamagedRange:
                        pass
                sum(1 for _ in d.runs(0, min(d.size, 1 << 30)))
            except (RescueError, DamagedRange):
                pass


def test_tarball_of_a_bundle_is_not_guessed(work, bundles):
    """A bundle packed in a tar is several files: the archive layer must not pick an
    .hds at random silently; whatever it does, no traceback."""
    tar = work / "bundle.tar"
    with tarfile.open(tar, "w") as t:
        t.add(bundles / "plain.hdd", arcname="plain.hdd")
    res = rescue("inspect", str(tar))
    no_traceback(res)
    assert res.returncode in (0, 1, 2)


@need_real
def test_snapshot_and_backing_options_on_formats_without_them(samples):
    for name in ("parallels-v1", "empty.bochs", "simple-pattern.cloop", "simple-dmg.dmg"):
        with pytest.raises(DiskFormatError, match="--internal-snapshot x"):
            open_disk(FileSource(samples[name]), DiskOptions(internal_snapshot="x"))
        disk = open_disk(FileSource(samples[name]), DiskOptions(backing="parent.img"))
        assert any("--backing parent.img ignored" in w for w in disk.info.warnings), name


def test_python_only_use_without_cli(samples):
    """Everything is callable from Python: open, read, close."""
    src = FileSource(samples["simple-pattern.cloop"])
    disk = cloop.open(src, DiskOptions())
    assert len(disk.read(disk.size - 10, 100)) == 10
    disk.close()
    with pytest.raises(RescueError):
        parallels.open(FileSource(samples["fake.parallels"]), DiskOptions())


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
