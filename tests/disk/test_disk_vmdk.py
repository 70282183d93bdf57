"""VMDK reader: every subformat qemu-img writes reads exactly like qemu-img's
own reading; real VMware/ESXi images open; damaged ones fail clearly."""

from __future__ import annotations

import os
import shutil
import sys
import zlib
from pathlib import Path

import pytest

from repo_paths import FIXTURES
from disk_support import assert_reads_like, fuzz, open_guarded, qemu_raw, reference, sha256, unpack
from disk_support import built, small  # noqa: F401 (fixtures)
from rescue.disk import DiskOptions, open_disk, vhd, vhdx, vmdk
from rescue.errors import DamagedRange, DiskFormatError, UnsupportedFeature
from rescue.source import FileSource

SMALL = ["vmdk_sparse.vmdk", "vmdk_stream.vmdk", "vmdk_split.vmdk", "vmdk_flat.vmdk",
         "vmdk_splitflat.vmdk", "vmdk_delta.vmdk"]
LARGE = ["big_sparse.vmdk", "big_stream.vmdk", "big_split.vmdk"]


def open_vmdk(path: Path, **kw) -> vmdk.VmdkImage:
    return vmdk.open(FileSource(path), DiskOptions(**kw))


@pytest.mark.parametrize("name", SMALL)
def test_each_vmdk_subformat_reads_like_qemu(small, tmp_path, name):
    before = sha256(small / name)
    img = open_disk(FileSource(small / name))
    assert img.info.format == "vmdk"
    assert_reads_like(img, reference(small / name, "vmdk", tmp_path, img.size), seed=hash(name) & 0xFFFF)
    img.close()
    assert sha256(small / name) == before      # read-only


def test_subformat_and_grain_are_reported(small):
    stream = open_vmdk(small / "vmdk_stream.vmdk")
    assert (stream.info.subformat, stream.info.compression, stream.info.cluster_size) == \
        ("streamOptimized", "deflate", 65536)
    split = open_vmdk(small / "vmdk_split.vmdk")
    assert split.info.subformat == "twoGbMaxExtentSparse"
    # holes are reported so that conversion stays sparse
    assert any(r.kind == "zero" for r in stream.runs(0, stream.size))


def test_delta_disk_reads_unallocated_grains_from_its_parent(small):
    img = open_vmdk(small / "vmdk_delta.vmdk")
    assert img.info.backing_chain == [str(small / "vmdk_sparse.vmdk")]
    expected = (small / "vmdk_delta.expected.raw").read_bytes()
    base = (small / "vmdk_base.raw").read_bytes()
    assert img.read(0, 60 << 10) == base[:60 << 10]               # parent's
    assert img.read(60 << 10, 100 << 10) == b"\x5a" * (100 << 10)  # the child's
    assert img.read(0, img.size) == expected


@pytest.mark.parametrize("name", LARGE)
def test_large_vmdk_across_grain_tables_and_extents(built, tmp_path, name):
    img = open_disk(FileSource(built / name))
    ref = qemu_raw(built / name, "vmdk", tmp_path / "ref.raw")
    assert_reads_like(img, ref, seed=7)
    if name == "big_split.vmdk":
        assert img.info.details["extents"] == 2


def test_missing_parent_is_named(small, tmp_path):
    shutil.copy(small / "vmdk_delta.vmdk", tmp_path / "vmdk_delta.vmdk")
    with pytest.raises(DiskFormatError, match="vmdk_sparse.vmdk"):
        open_vmdk(tmp_path / "vmdk_delta.vmdk")


def test_backing_option_overrides_the_hint(small, tmp_path):
    shutil.copy(small / "vmdk_delta.vmdk", tmp_path / "d.vmdk")
    shutil.copy(small / "vmdk_sparse.vmdk", tmp_path / "elsewhere.vmdk")
    img = open_vmdk(tmp_path / "d.vmdk", backing=str(tmp_path / "elsewhere.vmdk"))
    assert img.read(0, img.size) == (small / "vmdk_delta.expected.raw").read_bytes()


def _with_hint(src: Path, dst: Path, parent: str) -> Path:
    data = src.read_bytes()
    old = b'parentFileNameHint="vmdk_sparse.vmdk"'
    new = f'parentFileNameHint="{parent}"'.encode()
    assert old in data and len(new) <= len(old)
    dst.write_bytes(data.replace(old, new.ljust(len(old), b"\n")))
    return dst


def test_parent_loops_and_overlong_chains_fail(small, tmp_path):
    _with_hint(small / "vmdk_delta.vmdk", tmp_path / "a.vmdk", "b.vmdk")
    _with_hint(small / "vmdk_delta.vmdk", tmp_path / "b.vmdk", "a.vmdk")
    with pytest.raises(DiskFormatError, match="loop"):
        open_vmdk(tmp_path / "a.vmdk")
    _with_hint(small / "vmdk_delta.vmdk", tmp_path / "self.vmdk", "self.vmdk")
    with pytest.raises(DiskFormatError, match="loop"):
        open_vmdk(tmp_path / "self.vmdk")
    shutil.copy(small / "vmdk_sparse.vmdk", tmp_path / "vmdk_sparse.vmdk")
    _with_hint(small / "vmdk_delta.vmdk", tmp_path / "c1.vmdk", "vmdk_sparse.vmdk")
    _with_hint(small / "vmdk_delta.vmdk", tmp_path / "c2.vmdk", "c1.vmdk")
    assert len(open_vmdk(tmp_path / "c2.vmdk").info.backing_chain) == 2
    with pytest.raises(DiskFormatError, match="longer than 1"):
        open_vmdk(tmp_path / "c2.vmdk", max_chain=1)


def test_missing_extent_file_is_named(small, tmp_path):
    shutil.copy(small / "vmdk_split.vmdk", tmp_path / "vmdk_split.vmdk")
    with pytest.raises(DiskFormatError, match="vmdk_split-s001.vmdk"):
        open_disk(FileSource(tmp_path / "vmdk_split.vmdk"))


def test_multi_extent_descriptor_with_zero_and_offset_flat_extents(small, tmp_path):
    """FLAT with an offset, a ZERO extent and a SPARSE extent, concatenated."""
    base = (small / "vmdk_base.raw").read_bytes()
    (tmp_path / "pad-flat.bin").write_bytes(b"\x99" * 4096 + base[:1 << 20])
    shutil.copy(small / "vmdk_sparse.vmdk", tmp_path / "s.vmdk")
    sparse_sectors = len(base) // 512
    (tmp_path / "multi.vmdk").write_text(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"custom\"\n"
        f'RW 2048 FLAT "pad-flat.bin" 8\nRW 100 ZERO\nRW {sparse_sectors} SPARSE "s.vmdk"\n')
    img = open_disk(FileSource(tmp_path / "multi.vmdk"))
    assert img.size == (2048 + 100) * 512 + len(base)
    want = base[:1 << 20] + bytes(100 * 512) + base
    assert img.read(0, img.size) == want
    assert img.read((1 << 20) - 300, 52000) == want[(1 << 20) - 300:(1 << 20) - 300 + 52000]
    assert [r.kind for r in img.runs((1 << 20), 100 * 512)] == ["zero"]


def _gd_gt(path: Path):
    h = vmdk.SparseExtentHeader.parse(path.read_bytes()[:512])
    data = path.read_bytes()
    gt0 = int.from_bytes(data[h.gd_offset * 512:h.gd_offset * 512 + 4], "little")
    return h, gt0


def test_grain_and_table_entries_past_the_end_damage_only_their_range(small, tmp_path):
    src = small / "vmdk_sparse.vmdk"
    h, gt0 = _gd_gt(src)
    base = (small / "vmdk_base.raw").read_bytes()
    # grain 0's GT entry points far past the end: that grain is damaged, grain 1 reads
    bad = tmp_path / "bad-gte.vmdk"
    (bad).write_bytes(src.read_bytes())
    with open(bad, "r+b") as f:
        f.seek(gt0 * 512)
        f.write((10 ** 8).to_bytes(4, "little"))
    img = open_vmdk(bad)
    with pytest.raises(DamagedRange):
        img.read(100, 10)
    assert img.read(65536, 65536) == base[65536:131072]
    # the GD entry points past the end: its whole table's range is damaged, runs still work
    with open(bad, "r+b") as f:
        f.seek(h.gd_offset * 512)
        f.write((10 ** 8).to_bytes(4, "little"))
    img = open_vmdk(bad)
    with pytest.raises(DamagedRange):
        img.read(65536, 10)
    assert sum(r.length for r in img.runs(0, img.size)) == img.size


def test_truncated_sparse_file_reads_what_is_there(small, tmp_path):
    data = (small / "vmdk_sparse.vmdk").read_bytes()
    img0 = open_vmdk(small / "vmdk_sparse.vmdk")
    runs = [r for r in img0.runs(0, img0.size) if r.kind == "data"]
    (tmp_path / "t.vmdk").write_bytes(data[:len(data) // 2])
    img = open_vmdk(tmp_path / "t.vmdk")
    base = (small / "vmdk_base.raw").read_bytes()
    assert img.read(0, 4096) == base[:4096]        # early grains are still there
    with pytest.raises(DamagedRange):
        img.read(runs[-1].offset, runs[-1].length)


def test_absurd_capacity_and_bad_grain_size_are_errors(small, tmp_path):
    src = small / "vmdk_sparse.vmdk"
    with pytest.raises(DiskFormatError, match="L1 size too big"):
        open_vmdk(_patch_header(src, tmp_path / "cap.vmdk", capacity=1 << 60))
    with pytest.raises(DiskFormatError, match="grainSize"):
        open_vmdk(_patch_header(src, tmp_path / "grain.vmdk", grain_size=100))
    with pytest.raises(DiskFormatError, match="numGTEsPerGT"):
        open_vmdk(_patch_header(src, tmp_path / "gtes.vmdk", num_gtes_per_gt=100000))


def _patch_header(src: Path, dst: Path, **fields) -> Path:
    data = bytearray(src.read_bytes())
    h = dict(vmdk.SparseExtentHeader.parse(data[:512]))
    h.pop("_io", None)
    h.update(fields)
    data[:512] = vmdk.SparseExtentHeader.build(h)
    dst.write_bytes(data)
    return dst


def test_version3_header_reads_like_version1(small, tmp_path):
    img = open_vmdk(_patch_header(small / "vmdk_sparse.vmdk", tmp_path / "v3.vmdk", version=3))
    assert img.read(0, img.size) == (small / "vmdk_base.raw").read_bytes()


def test_corrupt_compressed_grain_damages_that_grain_only(small, tmp_path):
    src = small / "vmdk_stream.vmdk"
    img0 = open_vmdk(src)
    ext = img0.extents[0][1]
    table = ext._table(0)
    entries = [(i, e) for i, e in enumerate(table) if e > 1]
    (i_bad, sec_bad), (i_ok, _) = entries[0], entries[1]
    data = bytearray(src.read_bytes())
    at = sec_bad * 512 + 12
    data[at + 2:at + 40] = b"\xff" * 38      # inside the deflate stream
    (tmp_path / "c.vmdk").write_bytes(data)
    img = open_vmdk(tmp_path / "c.vmdk")
    with pytest.raises(DamagedRange, match="grain"):
        img.read(i_bad * 65536 + 5, 100)
    base = (small / "vmdk_base.raw").read_bytes()
    assert img.read(i_ok * 65536, 65536) == base[i_ok * 65536:(i_ok + 1) * 65536]
    # zlib agrees that the grain is broken (the test could fail otherwise)
    with pytest.raises(zlib.error):
        zlib.decompress(bytes(data[at:at + 3000]))


def test_raw_disk_and_other_formats_are_not_claimed(small):
    raw = FileSource(small / "vmdk_base.raw")
    assert not vmdk.detect(raw) and not vhd.detect(raw) and not vhdx.detect(raw)
    assert open_disk(raw).info.format == "raw"
    assert not vmdk.detect(FileSource(small / "vhd_dynamic.vhd"))


# --- real images from other projects ------------------------------------------------

REAL_OK = ["qemu/iotest-version3.vmdk.bz2", "dfvfs/ext2.vmdk", "dfvfs/image.vmdk",
           "bwlehrpool/image-default.vmdk", "bwlehrpool/image_t0.vmdk", "bwlehrpool/image_t5.vmdk",
           "bwlehrpool/image_t1-s001.vmdk"]


@pytest.mark.parametrize("name", REAL_OK)
def test_real_vmdk_reads_like_qemu(tmp_path, name):
    path = unpack(name, tmp_path)
    ref = qemu_raw(path, "vmdk", tmp_path / "ref.raw")
    if isinstance(ref, str) and name.endswith("image_t1-s001.vmdk"):
        # qemu will not open the bare extent; its descriptor reads the same data
        ref = qemu_raw(unpack("bwlehrpool/image_t1.vmdk", tmp_path), "vmdk", tmp_path / "ref.raw")
    if isinstance(ref, str):
        img = open_vmdk(path)     # we read it; qemu cannot (a bare extent): nothing to compare
        img.read(0, min(img.size, 1 << 20))
        pytest.skip(f"qemu-img cannot read {name}: {ref}")
    assert_reads_like(open_vmdk(path), ref, reads=100)


def test_real_split_descriptor_reads_its_extent(tmp_path):
    path = unpack("bwlehrpool/image_t1.vmdk", tmp_path)
    unpack("bwlehrpool/image_t1-s001.vmdk", tmp_path)
    ref = qemu_raw(path, "vmdk", tmp_path / "ref.raw")
    assert_reads_like(open_disk(FileSource(path)), ref, reads=50)


@pytest.mark.parametrize("name, missing", [("bwlehrpool/image_t1.vmdk", "image_t1-s001.vmdk"),
                                           ("bwlehrpool/image_t2.vmdk", "image_t2-flat.vmdk"),
                                           ("bwlehrpool/image_t3.vmdk", "image_t3-f001.vmdk"),
                                           ("bwlehrpool/image_t4.vmdk", "image_t4-flat.vmdk")])
def test_real_descriptors_without_extents_name_the_missing_file(tmp_path, name, missing):
    path = unpack(name, tmp_path)
    with pytest.raises(DiskFormatError, match=missing):
        open_disk(FileSource(path))


def test_real_fuzzed_vmdk_fails_clearly(tmp_path):
    kind, text = open_guarded("vmdk", unpack("qemu/afl9.vmdk.bz2", tmp_path))
    assert kind == "error" and "L1 size too big" in text, (kind, text)


def test_real_bare_sesparse_extent_opens_with_a_warning(tmp_path):
    kind, warnings = open_guarded("vmdk", unpack("dissect.hypervisor/vmdk_sesparse.vmdk.gz", tmp_path))
    assert kind == "ok" and any("bare seSparse" in w for w in warnings), (kind, warnings)


def _sesparse_descriptor(tmp_path: Path) -> Path:
    path = unpack("dissect.hypervisor/vmdk_sesparse.vmdk.gz", tmp_path)
    h = vmdk.SeSparseConstHeader.parse(path.read_bytes()[:512])
    desc = tmp_path / "se.vmdk"
    desc.write_text('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                    f'createType="seSparse"\n\nRW {h.capacity} SESPARSE "{path.name}"\n')
    return desc


def test_real_sesparse_through_a_descriptor_reads_like_qemu(tmp_path):
    desc = _sesparse_descriptor(tmp_path)
    img = open_disk(FileSource(desc))
    assert img.info.subformat == "seSparse" and not img.info.warnings
    ref = qemu_raw(desc, "vmdk", tmp_path / "ref.raw")
    if isinstance(ref, str):
        pytest.skip(f"qemu-img cannot read seSparse: {ref}")
    # qemu 7.2 appends the seSparse extent twice (its size doubles, the second
    # half repeats the first at the same host offsets); ours is the first half.
    n = img.size
    if ref.stat().st_size == 2 * n:
        with open(ref, "rb") as f:
            assert f.read(16 << 20) == (f.seek(n), f.read(16 << 20))[1]
        os.truncate(ref, n)
    assert_reads_like(img, ref, reads=100, grain=4096)


def test_sesparse_dirty_journal_warns_and_odd_versions_are_refused(tmp_path):
    desc = _sesparse_descriptor(tmp_path)
    ext = tmp_path / "vmdk_sesparse.vmdk"
    data = bytearray(ext.read_bytes())
    h = vmdk.SeSparseConstHeader.parse(data[:512])
    vol = h.volatile_header_offset * 512
    data[vol + 24:vol + 32] = (1).to_bytes(8, "little")     # replay_journal
    ext.write_bytes(data)
    assert any("journal" in w for w in open_disk(FileSource(desc)).info.warnings)
    data[8:16] = (0x300000001).to_bytes(8, "little")
    ext.write_bytes(data)
    with pytest.raises(UnsupportedFeature, match="version"):
        open_disk(FileSource(desc))


def test_esx2_cowd_extent_reads_like_qemu(tmp_path):
    """VMFSSPARSE ('COWD'): qemu-img cannot write one, so it is built here
    with the reader's Struct: 4 KiB grains, one 4096-entry grain table."""
    grains = {0: b"A", 5: b"B", 255: b"Z"}           # grain number -> fill
    gt = [0] * 4096
    body = bytearray()
    for i, (g, fill) in enumerate(sorted(grains.items())):
        gt[g] = 40 + 8 * i
        body += fill * 4096
    head = vmdk.CowdHeader.build(dict(version=1, flags=3, disk_sectors=2048, granularity=8,
                                      l1dir_offset=3, l1dir_size=1, file_sectors=40 + len(body) // 512))
    data = bytearray(head.ljust(512, b"\0"))
    # qemu looks for CID= in sector 1 of any sparse file
    data += b"CID=12345678\nparentCID=ffffffff\n".ljust(1024, b"\0")
    data += (4).to_bytes(4, "little").ljust(512, b"\0")             # GD at 3: GT at sector 4
    data += b"".join(e.to_bytes(4, "little") for e in gt)           # sectors 4..35
    data = data.ljust(40 * 512, b"\0") + body
    path = tmp_path / "cowd.vmdk"
    path.write_bytes(data)
    img = open_disk(FileSource(path))
    assert img.info.subformat == "vmfsSparse" and img.size == 1 << 20
    assert img.read(5 * 4096 - 2, 4) == b"\0\0BB"
    ref = qemu_raw(path, "vmdk", tmp_path / "ref.raw")
    if isinstance(ref, str):
        pytest.skip(f"qemu-img cannot read COWD: {ref}")
    assert_reads_like(img, ref, reads=50, grain=4096)


@pytest.mark.parametrize("create_type, extent", [("vmfs", "VMFS"), ("vmfsThin", "VMFS"),
                                                  ("monolithicFlat", "FLAT")])
def test_esx_flat_descriptors(small, tmp_path, create_type, extent):
    base = small / "vmdk_base.raw"
    shutil.copy(base, tmp_path / "disk-flat.vmdk")
    (tmp_path / "disk.vmdk").write_text(
        f'# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="{create_type}"\n'
        f'RW {base.stat().st_size // 512} {extent} "disk-flat.vmdk" 0\nddb.thinProvisioned = "1"\n')
    img = open_disk(FileSource(tmp_path / "disk.vmdk"))
    assert img.info.subformat == create_type
    ref = qemu_raw(tmp_path / "disk.vmdk", "vmdk", tmp_path / "ref.raw")
    assert_reads_like(img, base if isinstance(ref, str) else ref, reads=50)


def test_randomly_damaged_vmdk_images_fail_cleanly(small):
    """Random bytes in headers and tables, truncation: a clear error or a
    damaged range, never another exception or a hang."""
    assert fuzz(small, ["vmdk_sparse.vmdk", "vmdk_stream.vmdk", "vmdk_split.vmdk", "vmdk_delta.vmdk"], seed=1, rounds=60) == []


def test_gd_at_end_footer_and_a_stream_cut_short(small, tmp_path):
    """The header says GD_AT_END (as VMware and AWS exports do): the footer
    serves; cut the file short and the grains are found by walking the markers,
    the rest of the disk is a damaged range."""
    full = _patch_header(small / "vmdk_stream.vmdk", tmp_path / "end.vmdk", gd_offset=vmdk.GD_AT_END)
    img = open_vmdk(full)
    ref = qemu_raw(full, "vmdk", tmp_path / "ref.raw")
    assert_reads_like(img, small / "vmdk_base.raw" if isinstance(ref, str) else ref, reads=50)
    data = full.read_bytes()
    base = (small / "vmdk_base.raw").read_bytes()
    (tmp_path / "cut.vmdk").write_bytes(data[:len(data) // 2])
    cut = open_vmdk(tmp_path / "cut.vmdk")
    assert any("no footer" in w for w in cut.info.warnings)
    lost = cut.extents[0][1].lost_from
    assert 0 < lost < cut.size
    assert cut.read(0, lost) == base[:lost]
    with pytest.raises(DamagedRange, match="lost"):
        cut.read(lost, 512)


def test_real_vmware_stream_cut_short_keeps_what_arrived(tmp_path):
    path = unpack("qemu/iotest-version3.vmdk.bz2", tmp_path)
    whole = open_vmdk(path)
    data = path.read_bytes()
    (tmp_path / "cut.vmdk").write_bytes(data[:len(data) // 2])
    cut = open_vmdk(tmp_path / "cut.vmdk")
    lost = cut.extents[0][1].lost_from
    assert 0 < lost < cut.size and cut.info.warnings
    runs = [r for r in whole.runs(0, lost) if r.kind == "data"]
    assert runs and runs == [r for r in cut.runs(0, lost) if r.kind == "data"]
    for r in runs:
        assert cut.read(r.offset, r.length) == whole.read(r.offset, r.length)
    with pytest.raises(DamagedRange):
        cut.read(lost, 512)


_RAW_ANSWERS: dict[tuple[str, ...], bytes] = {}


@pytest.mark.parametrize("fmt, opts", [("vmdk", "subformat=streamOptimized"), ("vpc", "subformat=dynamic"),
                                       ("vhdx", "subformat=dynamic")])
def test_rescue_reads_a_servers_files_through_each_container(tmp_path, fmt, opts):
    """The user's story: the provider exported the dead server as VMDK, VHD or
    VHDX; `rescue ls` and `cat` see the same files as in the raw disk."""
    import subprocess
    if not shutil.which("qemu-img"):
        pytest.skip("qemu-img not installed")
    raw = FIXTURES / "sample-vps.disk"
    if not raw.exists():
        pytest.skip("fixtures/sample-vps.disk not present")
    image = tmp_path / f"vps.{fmt}"
    subprocess.run(["qemu-img", "convert", "-O", fmt, "-o", opts, str(raw), str(image)], check=True)

    def run(disk: Path, *args: str) -> bytes:
        cmd = [sys.executable, "-m", "rescue", args[0], str(disk), *args[1:]]
        return subprocess.run(cmd, check=True, capture_output=True, timeout=120).stdout

    before = sha256(image)
    for args in (("ls", "/var/lib/docker/volumes"), ("cat", "/etc/hostname")):
        if args not in _RAW_ANSWERS:
            _RAW_ANSWERS[args] = run(raw, *args)
        assert run(image, *args) == _RAW_ANSWERS[args] != b""
    assert sha256(image) == before


def test_parent_changed_since_the_delta_was_made_is_a_warning(small, tmp_path):
    data = (small / "vmdk_delta.vmdk").read_bytes()
    img = open_vmdk(small / "vmdk_delta.vmdk")
    assert not img.info.warnings                                  # CIDs agree
    start = data.index(b"parentCID=") + len(b"parentCID=")
    old = data[start:start + 8]
    new = b"%08x" % (int(old, 16) ^ 0x1)
    shutil.copy(small / "vmdk_sparse.vmdk", tmp_path / "vmdk_sparse.vmdk")
    (tmp_path / "d.vmdk").write_bytes(data[:start] + new + data[start + 8:])
    warned = open_vmdk(tmp_path / "d.vmdk")
    assert any("parentCID" in w for w in warned.info.warnings)
    assert warned.read(0, warned.size) == (small / "vmdk_delta.expected.raw").read_bytes()
