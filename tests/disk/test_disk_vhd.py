"""VHD reader: fixed, dynamic and differencing VHDs read like qemu-img reads
them (or, for differencing disks qemu cannot make, like their parent plus the
sectors written into the child); damaged ones fail or warn clearly."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from disk_support import assert_reads_like, fuzz, open_guarded, qemu_raw, reference, sha256, unpack
from disk_support import built, small  # noqa: F401 (fixtures)
from rescue.disk import DiskOptions, open_disk, vhd
from rescue.errors import DamagedRange, DiskFormatError
from rescue.source import BytesSource, FileSource


# Where the dynamic header (at 512 in these fixtures) keeps the parent's name and locators.
PARENT_NAME = 512 + 64
LOCATORS = 512 + 576


def open_vhd(path: Path, **kw) -> vhd.VhdImage:
    return vhd.open(FileSource(path), DiskOptions(**kw))


@pytest.mark.parametrize("name", ["vhd_dynamic.vhd", "vhd_chs.vhd", "vhd_fixed.vhd", "vhd_diff.vhd"])
def test_each_vhd_kind_reads_like_qemu(small, tmp_path, name):
    before = sha256(small / name)
    img = open_disk(FileSource(small / name))
    assert img.info.format == "vhd"
    assert_reads_like(img, reference(small / name, "vpc", tmp_path, img.size), seed=len(name),
                   grain=2 << 20)
    img.close()
    assert sha256(small / name) == before


@pytest.mark.parametrize("creator", [b"qemu", b"qem2", b"win ", b"d2v ", b"d2v\0", b"vpc ", b"tap\0"])
def test_virtual_size_follows_qemus_creator_rule(small, tmp_path, creator):
    """Some creators size a disk by CHS geometry, others by current_size: the
    footer is rewritten with current_size != CHS size and qemu-img decides."""
    if not shutil.which("qemu-img"):
        pytest.skip("qemu-img not installed")
    data = bytearray((small / "vhd_chs.vhd").read_bytes())
    f = dict(vhd.Footer.parse(data[:512]))
    f.pop("_io", None)
    f.update(creator_app=creator, current_size=(small / "vmdk_base.raw").stat().st_size, checksum=0)
    f["checksum"] = vhd.checksum(vhd.Footer.build(f), 64)
    data[:512] = data[-512:] = vhd.Footer.build(f)
    (tmp_path / "c.vhd").write_bytes(data)
    r = subprocess.run(["qemu-img", "info", "--output=json", "-f", "vpc", str(tmp_path / "c.vhd")],
                       capture_output=True, text=True, check=True)
    chs = f["cylinders"] * f["heads"] * f["sectors_per_track"] * 512
    assert chs != f["current_size"]
    assert open_vhd(tmp_path / "c.vhd").size == json.loads(r.stdout)["virtual-size"]


def test_large_dynamic_vhd(built, tmp_path):
    img = open_disk(FileSource(built / "big_dynamic.vhd"))
    assert_reads_like(img, qemu_raw(built / "big_dynamic.vhd", "vpc", tmp_path / "r.raw"), grain=2 << 20)


def test_differencing_vhd_uses_bitmap_and_parent(small):
    img = open_vhd(small / "vhd_diff.vhd")
    assert img.info.subformat == "differencing"
    assert img.info.backing_chain == [str(small / "vhd_dynamic.vhd")]
    base = (small / "vmdk_base.raw").read_bytes()
    assert img.read(0, 8 * 512) == base[:8 * 512]            # bitmap 0: the parent's
    assert img.read(8 * 512, 512) != base[8 * 512:9 * 512]    # bitmap 1: ours
    assert b"\xee" * 512 not in img.read(0, 4096 * 512)        # unused sectors never read
    kinds = {r.kind for r in img.runs(0, img.size)}
    assert "data" in kinds


def test_missing_parent_is_named_and_backing_overrides(small, tmp_path):
    shutil.copy(small / "vhd_diff.vhd", tmp_path / "child.vhd")
    with pytest.raises(DiskFormatError, match="vhd_dynamic.vhd"):
        open_vhd(tmp_path / "child.vhd")
    shutil.copy(small / "vhd_dynamic.vhd", tmp_path / "renamed.vhd")
    img = open_vhd(tmp_path / "child.vhd", backing=str(tmp_path / "renamed.vhd"))
    assert img.read(0, img.size) == (small / "vhd_diff.expected.raw").read_bytes()


def test_absolute_locator_is_tried_by_file_name(small, tmp_path):
    """Without the W2ru entry, the W2ku (C:\\vms\\vhd_dynamic.vhd) names the parent."""
    data = bytearray((small / "vhd_diff.vhd").read_bytes())
    h = vhd.DynamicHeader.parse(data[512:1536])
    assert h.locators[0].platform_code == b"W2ru"
    data[LOCATORS:LOCATORS + 4] = b"\0\0\0\0"        # drop the relative locator
    data[PARENT_NAME:PARENT_NAME + 512] = bytes(512)   # and the parent's name
    (tmp_path / "child.vhd").write_bytes(data)
    shutil.copy(small / "vhd_dynamic.vhd", tmp_path / "vhd_dynamic.vhd")
    img = open_vhd(tmp_path / "child.vhd")
    assert img.read(0, img.size) == (small / "vhd_diff.expected.raw").read_bytes()
    assert any("checksum" in w for w in img.info.warnings)    # we edited the header


def test_bad_footer_checksum_warns_but_reads(small, tmp_path):
    data = bytearray((small / "vhd_dynamic.vhd").read_bytes())
    for at in (0, len(data) - 512):
        data[at + 100] ^= 0xFF            # reserved byte: only the checksum notices
    bad = tmp_path / "bad.vhd"
    bad.write_bytes(data)
    img = open_vhd(bad)
    assert any("checksum" in w and "qemu-img refuses" in w for w in img.info.warnings)
    assert img.read(0, img.size) == (small / "vmdk_base.raw").read_bytes()
    if shutil.which("qemu-img"):          # the decision documented: qemu does refuse it
        r = subprocess.run(["qemu-img", "info", "-f", "vpc", str(bad)], capture_output=True, text=True)
        assert r.returncode != 0 and "checksum" in r.stderr


def test_bat_entry_past_the_end_damages_that_block_only(small, tmp_path):
    src = small / "vhd_dynamic.vhd"
    data = bytearray(src.read_bytes())
    h = vhd.DynamicHeader.parse(data[512:1536])
    data[h.table_offset:h.table_offset + 4] = (10 ** 8).to_bytes(4, "big")
    (tmp_path / "b.vhd").write_bytes(data)
    img = open_vhd(tmp_path / "b.vhd")
    with pytest.raises(DamagedRange, match="past the end"):
        img.read(1000, 10)
    base = (small / "vmdk_base.raw").read_bytes()
    assert img.read(2 << 20, 1 << 20) == base[2 << 20:3 << 20]


def test_truncated_dynamic_vhd_uses_the_footer_copy(small, tmp_path):
    data = (small / "vhd_dynamic.vhd").read_bytes()
    (tmp_path / "t.vhd").write_bytes(data[:3 << 20])
    img = open_vhd(tmp_path / "t.vhd")
    base = (small / "vmdk_base.raw").read_bytes()
    assert img.read(0, 1 << 20) == base[:1 << 20]
    with pytest.raises(DamagedRange):
        img.read(img.size - 100, 100)


def test_absurd_sizes_are_errors(small, tmp_path):
    data = bytearray((small / "vhd_dynamic.vhd").read_bytes())
    f = dict(vhd.Footer.parse(data[:512]))
    f.pop("_io", None)
    f["current_size"] = 1 << 60
    raw = vhd.Footer.build(f)
    f["checksum"] = vhd.checksum(raw, 64)
    data[:512] = data[-512:] = vhd.Footer.build(f)
    (tmp_path / "huge.vhd").write_bytes(data)
    with pytest.raises(DiskFormatError, match="absurd"):
        open_vhd(tmp_path / "huge.vhd")


def test_raw_disks_are_not_claimed(small):
    assert not vhd.detect(FileSource(small / "vmdk_base.raw"))
    fake = bytearray(4096)
    fake[-512:-504] = b"conectix"         # the cookie alone, no valid disk type
    assert not vhd.detect(BytesSource(bytes(fake)))
    assert open_disk(BytesSource(bytes(fake))).info.format == "raw"
    # a fixed VHD is found by its footer at the end
    assert vhd.detect(FileSource(small / "vhd_fixed.vhd"))


# --- real images ------------------------------------------------------------------------

REAL_OK = ["qemu/d2v-zerofilled.vhd.bz2", "dissect.hypervisor/vhd_dynamic.vhd.gz",
           "dissect.hypervisor/vhd_fixed.vhd.gz", "dfvfs/ext2.vhd", "sleuthkit/img_image.vhd"]


@pytest.mark.parametrize("name", REAL_OK)
def test_real_vhd_reads_like_qemu(tmp_path, name):
    path = unpack(name, tmp_path)
    ref = qemu_raw(path, "vpc", tmp_path / "ref.raw")   # -f vpc: qemu probes fixed VHDs as raw
    if isinstance(ref, str):
        pytest.skip(f"qemu-img cannot read {name}: {ref}")
    img = open_disk(FileSource(path))
    assert img.info.format == "vhd"
    assert_reads_like(img, ref, reads=100, grain=2 << 20)


def test_real_vhd_with_wrong_checksums_warns(tmp_path):
    path = unpack("dfvfs/image.vhd", tmp_path)
    kind, warnings = open_guarded("vhd", path)
    assert kind == "ok" and any("checksum" in w for w in warnings)
    diff = unpack("dfvfs/image-differential.vhd", tmp_path)
    img = open_vhd(diff)
    assert img.info.backing_chain and any("checksum" in w for w in img.info.warnings)
    img.read(0, img.size)


def test_real_fuzzed_vhd_fails_on_max_table_entries(tmp_path):
    kind, text = open_guarded("vhd", unpack("qemu/afl5.img.bz2", tmp_path))
    assert kind == "error" and "Max Table Entries" in text


def test_real_differencing_vhd_without_parent_names_it(tmp_path):
    kind, text = open_guarded("vhd", unpack("dfvfs/fat-differential.vhd", tmp_path))
    assert kind == "error" and "fat-parent.vhd" in text


def test_parent_loop_is_refused(small, tmp_path):
    # a differencing disk saved under its parent's name: its parent is itself
    shutil.copy(small / "vhd_diff.vhd", tmp_path / "vhd_dynamic.vhd")
    with pytest.raises(DiskFormatError, match="loop"):
        open_vhd(tmp_path / "vhd_dynamic.vhd")


def test_mac_file_url_locator(small, tmp_path):
    data = bytearray((small / "vhd_diff.vhd").read_bytes())
    h = vhd.DynamicHeader.parse(data[512:1536])
    loc = h.locators[0]
    url = b"file://localhost/Users/ann/VMs/vhd%5Fdynamic.vhd"
    data[loc.data_offset:loc.data_offset + 512] = url.ljust(512, b"\0")
    data[LOCATORS:LOCATORS + 4] = b"MacX"
    data[LOCATORS + 8:LOCATORS + 12] = len(url).to_bytes(4, "big")
    data[LOCATORS + 24:LOCATORS + 28] = b"\0\0\0\0"    # drop the W2ku entry
    data[PARENT_NAME:PARENT_NAME + 512] = bytes(512)
    assert [x.platform_code for x in vhd.DynamicHeader.parse(data[512:1536]).locators[:2]] == \
        [b"MacX", bytes(4)]
    (tmp_path / "child.vhd").write_bytes(data)
    shutil.copy(small / "vhd_dynamic.vhd", tmp_path / "vhd_dynamic.vhd")
    img = open_vhd(tmp_path / "child.vhd")
    assert img.read(0, img.size) == (small / "vhd_diff.expected.raw").read_bytes()


def test_randomly_damaged_vhd_images_fail_cleanly(small):
    """Random bytes in headers and tables, truncation: a clear error or a
    damaged range, never another exception or a hang."""
    assert fuzz(small, ["vhd_dynamic.vhd", "vhd_diff.vhd", "vhd_fixed.vhd"], seed=1, rounds=60) == []


def test_replaced_parent_gives_a_warning(small, tmp_path):
    assert not open_vhd(small / "vhd_diff.vhd").info.warnings
    data = bytearray((small / "vhd_dynamic.vhd").read_bytes())
    f = dict(vhd.Footer.parse(data[:512]))
    f.pop("_io", None)
    f.update(uuid=bytes(range(16)), checksum=0)
    f["checksum"] = vhd.checksum(vhd.Footer.build(f), 64)
    data[:512] = data[-512:] = vhd.Footer.build(f)
    (tmp_path / "vhd_dynamic.vhd").write_bytes(data)
    shutil.copy(small / "vhd_diff.vhd", tmp_path / "child.vhd")
    img = open_vhd(tmp_path / "child.vhd")
    assert any("UUID" in w for w in img.info.warnings)


def test_old_511_byte_footer(small, tmp_path):
    """Very old Virtual PC wrote the footer one byte short: still found, and the
    data before it is the disk."""
    data = (small / "vhd_fixed.vhd").read_bytes()
    (tmp_path / "old.vhd").write_bytes(data[:-1])
    assert vhd.detect(FileSource(tmp_path / "old.vhd"))
    img = open_vhd(tmp_path / "old.vhd")
    assert img.read(0, img.size) == (small / "vmdk_base.raw").read_bytes()
