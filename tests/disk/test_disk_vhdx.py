"""VHDX reader: dynamic and fixed VHDX read like qemu-img reads them; a
differencing VHDX (which qemu cannot read) reads like its parent plus the
child's blocks and sectors; a dirty log is reported, damage is contained."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from disk_support import assert_reads_like, fuzz, open_guarded, qemu_raw, reference, sha256, unpack
from disk_support import built, small  # noqa: F401 (fixtures)
from rescue.disk import DiskOptions, open_disk, vhdx
from rescue.errors import DamagedRange, DiskFormatError
from rescue.source import FileSource

KiB = 1024


def open_vhdx(path: Path, **kw) -> vhdx.VhdxImage:
    return vhdx.open(FileSource(path), DiskOptions(**kw))


def test_crc32c_matches_the_standard_check_value():
    assert vhdx.crc32c(b"123456789") == 0xE3069283
    assert vhdx.crc32c(b"") == 0


@pytest.mark.parametrize("name", ["vhdx_dynamic.vhdx", "vhdx_fixed.vhdx", "vhdx_diff.vhdx"])
def test_each_vhdx_kind_reads_like_qemu(small, tmp_path, name):
    before = sha256(small / name)
    img = open_disk(FileSource(small / name))
    assert img.info.format == "vhdx"
    assert_reads_like(img, reference(small / name, "vhdx", tmp_path, img.size), seed=len(name),
                   grain=1 << 20)
    img.close()
    assert sha256(small / name) == before


def test_large_dynamic_vhdx(built, tmp_path):
    img = open_disk(FileSource(built / "big_dynamic.vhdx"))
    assert_reads_like(img, qemu_raw(built / "big_dynamic.vhdx", "vhdx", tmp_path / "r.raw"), grain=32 << 20)


def test_differencing_vhdx_block_states(small):
    img = open_vhdx(small / "vhdx_diff.vhdx")
    assert img.info.subformat == "differencing"
    assert img.info.backing_chain == [str(small / "vhdx_dynamic.vhdx")]
    parent = open_vhdx(small / "vhdx_dynamic.vhdx")
    mib = 1 << 20
    assert img.read(0, 3 * 512) == parent.read(0, 3 * 512)      # partial block, bit 0: parent
    assert img.read(3 * 512, 6 * 512) != parent.read(3 * 512, 6 * 512)
    assert img.read(mib, mib) == parent.read(mib, mib)            # NOT_PRESENT: parent
    assert img.read(3 * mib, mib) == bytes(mib)                   # ZERO
    assert ("zero" in {r.kind for r in img.runs(3 * mib, mib)})
    assert b"\xee" * 512 not in img.read(0, mib)


def test_missing_parent_is_named_and_backing_overrides(small, tmp_path):
    shutil.copy(small / "vhdx_diff.vhdx", tmp_path / "child.avhdx")
    with pytest.raises(DiskFormatError, match="vhdx_dynamic.vhdx"):
        open_vhdx(tmp_path / "child.avhdx")
    shutil.copy(small / "vhdx_dynamic.vhdx", tmp_path / "p.vhdx")
    img = open_vhdx(tmp_path / "child.avhdx", backing=str(tmp_path / "p.vhdx"))
    assert img.read(0, img.size) == (small / "vhdx_diff.expected.raw").read_bytes()


def test_replaced_parent_gives_a_warning(small, tmp_path):
    shutil.copy(small / "vhdx_diff.vhdx", tmp_path / "child.vhdx")
    shutil.copy(small / "vhdx_fixed.vhdx", tmp_path / "vhdx_dynamic.vhdx")   # another disk
    img = open_vhdx(tmp_path / "child.vhdx")
    assert any("parent_linkage" in w for w in img.info.warnings)


def _rewrite_headers(src: Path, dst: Path, **fields) -> Path:
    data = bytearray(src.read_bytes())
    for at in (64 * KiB, 128 * KiB):
        h = dict(vhdx.Header.parse(data[at:at + 4 * KiB]))
        h.pop("_io", None)
        h.update(fields, checksum=0)
        raw = bytearray(vhdx.Header.build(h).ljust(4 * KiB, b"\0"))
        raw[4:8] = vhdx.crc32c(bytes(raw)).to_bytes(4, "little")
        data[at:at + 4 * KiB] = raw
    dst.write_bytes(data)
    return dst


def test_dirty_log_is_reported_not_replayed(small, tmp_path):
    path = _rewrite_headers(small / "vhdx_dynamic.vhdx", tmp_path / "dirty.vhdx", log_guid=b"\x11" * 16)
    img = open_vhdx(path)
    assert any("log" in w and "not replayed" in w for w in img.info.warnings)
    assert img.read(0, img.size) == (small / "vmdk_base.raw").read_bytes()
    assert not open_vhdx(small / "vhdx_dynamic.vhdx").info.warnings    # clean: no log needed


def test_header_choice_and_corruption(small, tmp_path):
    data = bytearray((small / "vhdx_dynamic.vhdx").read_bytes())
    data[64 * KiB + 100] ^= 0xFF            # first header's CRC32C now fails: the second serves
    (tmp_path / "h1.vhdx").write_bytes(data)
    assert open_vhdx(tmp_path / "h1.vhdx").read(0, 4096) == (small / "vmdk_base.raw").read_bytes()[:4096]
    data[128 * KiB + 100] ^= 0xFF
    (tmp_path / "h2.vhdx").write_bytes(data)
    with pytest.raises(DiskFormatError, match="header"):
        open_vhdx(tmp_path / "h2.vhdx")
    data = bytearray((small / "vhdx_dynamic.vhdx").read_bytes())
    for at in (192 * KiB, 256 * KiB):
        data[at + 40] ^= 0xFF
    (tmp_path / "r.vhdx").write_bytes(data)
    with pytest.raises(DiskFormatError, match="region table"):
        open_vhdx(tmp_path / "r.vhdx")


def test_higher_sequence_number_wins(small, tmp_path):
    data = bytearray((small / "vhdx_dynamic.vhdx").read_bytes())
    hdrs = [vhdx.Header.parse(data[at:at + 4 * KiB]) for at in (64 * KiB, 128 * KiB)]
    path = _rewrite_headers(small / "vhdx_dynamic.vhdx", tmp_path / "s.vhdx",
                            sequence_number=max(h.sequence_number for h in hdrs) + 5)
    # make the header at 128 KiB newer and dirty: only it carries the warning
    data = bytearray(path.read_bytes())
    h = dict(vhdx.Header.parse(data[128 * KiB:132 * KiB]))
    h.pop("_io", None)
    h.update(sequence_number=h["sequence_number"] + 1, log_guid=b"\x22" * 16, checksum=0)
    raw = bytearray(vhdx.Header.build(h).ljust(4 * KiB, b"\0"))
    raw[4:8] = vhdx.crc32c(bytes(raw)).to_bytes(4, "little")
    data[128 * KiB:132 * KiB] = raw
    path.write_bytes(data)
    assert any("log" in w for w in open_vhdx(path).info.warnings)


def test_bat_entry_past_the_end_damages_that_block_only(small, tmp_path):
    img0 = open_vhdx(small / "vhdx_dynamic.vhdx")
    at = img0.bat_offset
    data = bytearray((small / "vhdx_dynamic.vhdx").read_bytes())
    data[at:at + 8] = ((10 ** 6 << 20) | vhdx.FULLY_PRESENT).to_bytes(8, "little")
    (tmp_path / "b.vhdx").write_bytes(data)
    img = open_vhdx(tmp_path / "b.vhdx")
    with pytest.raises(DamagedRange):
        img.read(10, 10)
    base = (small / "vmdk_base.raw").read_bytes()
    assert img.read(1 << 20, 1 << 20) == base[1 << 20:2 << 20]


def test_truncated_vhdx_reads_what_is_there(small, tmp_path):
    data = (small / "vhdx_dynamic.vhdx").read_bytes()
    img0 = open_vhdx(small / "vhdx_dynamic.vhdx")
    last = [r for r in img0.runs(0, img0.size) if r.kind == "data"][-1]
    first_block = img0._bat(0) >> 20 << 20
    (tmp_path / "t.vhdx").write_bytes(data[:first_block + (1 << 20)])
    img = open_vhdx(tmp_path / "t.vhdx")
    assert img.read(0, 4096) == (small / "vmdk_base.raw").read_bytes()[:4096]
    with pytest.raises(DamagedRange):
        img.read(last.offset + last.length - 10, 10)


def test_absurd_virtual_size_is_an_error(small, tmp_path):
    img0 = open_vhdx(small / "vhdx_dynamic.vhdx")
    regions = img0._read_regions()
    meta = regions[vhdx.METADATA_GUID]
    data = bytearray((small / "vhdx_dynamic.vhdx").read_bytes())
    mh = vhdx.MetadataTableHeader.parse(data[meta.file_offset:meta.file_offset + 32])
    for i in range(mh.entry_count):
        e = vhdx.MetadataTableEntry.parse(data[meta.file_offset + 32 + 32 * i:][:32])
        if e.item_id == vhdx.VIRTUAL_DISK_SIZE:
            at = meta.file_offset + e.offset
            data[at:at + 8] = (1 << 62).to_bytes(8, "little")
    (tmp_path / "huge.vhdx").write_bytes(data)
    with pytest.raises(DiskFormatError, match="absurd"):
        open_vhdx(tmp_path / "huge.vhdx")


# --- real images ------------------------------------------------------------------------

REAL_OK = ["qemu/iotest-dynamic-1G.vhdx.bz2", "qemu/test-disk2vhd.vhdx.bz2",
           "dissect.hypervisor/vhdx_dynamic.vhdx.gz", "dissect.hypervisor/vhdx_fixed.vhdx.gz"]


@pytest.mark.parametrize("name", REAL_OK)
def test_real_vhdx_reads_like_qemu(tmp_path, name):
    """test-disk2vhd has both headers with one sequence number: not corrupt."""
    path = unpack(name, tmp_path)
    ref = qemu_raw(path, "vhdx", tmp_path / "ref.raw")
    if isinstance(ref, str):
        pytest.skip(f"qemu-img cannot read {name}: {ref}")
    img = open_disk(FileSource(path))
    assert img.info.format == "vhdx" and not img.info.warnings
    assert_reads_like(img, ref, reads=100, grain=32 << 20)


def test_real_differencing_vhdx_without_parent_names_it(tmp_path):
    kind, text = open_guarded("vhdx", unpack("dissect.hypervisor/vhdx_differencing.avhdx.gz", tmp_path))
    assert kind == "error" and "Generation 1_49C4BAF3-4B25-4406-8C4B-D39E65C32385.avhdx" in text


def test_randomly_damaged_vhdx_images_fail_cleanly(small):
    """Random bytes in headers and tables, truncation: a clear error or a
    damaged range, never another exception or a hang."""
    assert fuzz(small, ["vhdx_dynamic.vhdx", "vhdx_diff.vhdx"], seed=1, rounds=40) == []
