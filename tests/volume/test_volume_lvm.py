"""LVM2 reader: against the kernel's view (committed fixtures written and read
back through device-mapper by scripts/make-lvm-fixtures), against the LVM
tools' own reports, and on the real-world images under ../shared/real-images."""

from __future__ import annotations

import gzip
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import random
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from repo_paths import REPO
from rescue.errors import DamagedRange, UnsupportedFeature, VolumeError
from rescue.source import BytesSource, FileSource
from rescue.volume import lvm
from rescue.volume.lvm import MdaHeader, RawLocn, lvm_crc, parse_metadata

FIX = REPO / "fixtures" / "lvm"
REAL = REPO.parent / "shared" / "real-images"
EXPECTED = json.loads((FIX / "expected.json").read_text())
_loader = importlib.machinery.SourceFileLoader("make_lvm_fixtures", str(REPO / "scripts" / "make-lvm-fixtures"))
make_fixtures = importlib.util.module_from_spec(importlib.util.spec_from_loader(_loader.name, _loader))
_loader.exec_module(make_fixtures)


@pytest.fixture(scope="session")
def fixture_disks(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("lvmfix")
    disks = {}
    for name in ("single", "pair-a", "pair-b"):
        disks[name] = out / f"{name}.img"
        with gzip.open(FIX / f"{name}.img.gz") as f, open(disks[name], "wb") as g:
            shutil.copyfileobj(f, g)
    return disks


def _open(disks, *names):
    return [FileSource(disks[n]) for n in names]


def _lvs_report() -> list[dict]:
    return [row for row in EXPECTED["report"][0]["report"][0]["lv"]]


def _pvs_report() -> dict[str, str]:
    return {row["pv_name"]: row["pv_uuid"] for row in EXPECTED["report"][1]["report"][0]["pv"]}


def _read_all(source, step: int) -> bytes:
    return b"".join(source.read(off, step) for off in range(0, source.size, step))


def test_finds_pv_label_and_rejects_other_bytes(fixture_disks):
    assert lvm.is_pv(FileSource(fixture_disks["single"]))
    assert not lvm.is_pv(BytesSource(bytes(4096)))
    assert not lvm.is_pv(BytesSource(b"LABELONE" + bytes(100)))


def test_lists_volume_groups_and_lvs_like_lvs_does(fixture_disks):
    vgs, vols = lvm.assemble(_open(fixture_disks, "single", "pair-a", "pair-b"))
    report = _lvs_report()
    visible = {f"{r['vg_name']}/{r['lv_name']}" for r in report if not r["lv_name"].startswith("[")}
    assert {v.id for v in vols} == visible
    assert {vg["name"] for vg in vgs} == {"fixvg", "fixpair"}
    by_id = {v.id: v for v in vols}
    for row in report:
        if row["lv_name"].startswith("["):
            continue
        assert by_id[f"{row['vg_name']}/{row['lv_name']}"].size == int(row["lv_size"].rstrip("B"))
    # Segment placement agrees with the tool's PE ranges (device names mapped via PV uuids).
    dev_uuid = _pvs_report()
    for vg in vgs:
        name_uuid = {pv["name"]: pv["uuid"] for pv in vg["pvs"]}
        for lv in vg["lvs"]:
            rows = [r for r in report if r["vg_name"] == vg["name"] and r["lv_name"].strip("[]") == lv["name"]]
            assert len(rows) == len(lv["segments"]), lv["name"]
            for row, seg in zip(sorted(rows, key=lambda r: int(r["seg_start_pe"])), lv["segments"]):
                assert seg["start_extent"] == int(row["seg_start_pe"])
                assert seg["extent_count"] == int(row["seg_size_pe"])
                if row["segtype"] in ("linear", "striped"):
                    per = seg["extent_count"] // len(seg["stripes"])
                    ours = [f"{name_uuid[pv]}:{pe}-{pe + per - 1}" for pv, pe in seg["stripes"]]
                    theirs = []
                    for rng in row["seg_pe_ranges"].split():
                        dev, span = rng.rsplit(":", 1)
                        theirs.append(f"{dev_uuid[dev]}:{span}")
                    assert ours == theirs
                    if row["segtype"] == "striped":
                        assert seg["stripe_size"] == int(row["stripe_size"].rstrip("B"))


def test_lv_bytes_match_what_the_kernel_read(fixture_disks):
    _, vols = lvm.assemble(_open(fixture_disks, "single", "pair-a", "pair-b"))
    by_id = {v.id: v for v in vols}
    checked = 0
    for lvid, want in EXPECTED["lvs"].items():
        vol = by_id[lvid]
        if vol.details.get("unsupported"):
            continue
        assert vol.size == want["size"]
        # An odd read size crosses extent, stripe and segment boundaries unaligned.
        assert hashlib.sha256(_read_all(vol.source, (1 << 20) + 4099)).hexdigest() == want["sha256"], lvid
        checked += 1
    assert checked == 6


def test_random_unaligned_reads_match_the_kernel_content(fixture_disks):
    _, vols = lvm.assemble(_open(fixture_disks, "single", "pair-a", "pair-b"))
    rng = random.Random(7)
    for vol in vols:
        if vol.details.get("unsupported") or not EXPECTED["lvs"][vol.id]["pattern"]:
            continue
        want = EXPECTED["lvs"][vol.id]
        expected = make_fixtures.pattern(vol.id, vol.size)
        assert hashlib.sha256(expected).hexdigest() == want["sha256"]   # what the kernel holds
        for _ in range(60):
            off = rng.randrange(vol.size)
            n = rng.choice([1, 511, 4097, 65537, 300000, vol.size])
            assert vol.source.read(off, n) == expected[off:off + n], (vol.id, off, n)
        assert vol.source.read(vol.size - 3, 100) == expected[-3:]
        assert vol.source.read(vol.size, 10) == b""


def test_root_lv_holds_the_ext4_the_kernel_wrote(fixture_disks):
    _, vols = lvm.assemble(_open(fixture_disks, "single"))
    root = next(v for v in vols if v.id == "fixvg/root")
    sb = root.source.read(1024, 1024)
    assert sb[56:58] == b"\x53\xef"                      # ext4 superblock magic
    assert sb[120:127] == b"fixroot"
    assert root.description == "LVM2 linear LV"


def test_striped_and_multi_segment_lvs_are_described(fixture_disks):
    _, vols = lvm.assemble(_open(fixture_disks, "pair-a", "pair-b"))
    by_id = {v.id: v for v in vols}
    assert by_id["fixpair/str"].description == "LVM2 striped LV (2 stripes)"
    assert len(by_id["fixpair/multi"].details["segments"]) == 2
    assert by_id["fixpair/span"].details["vg"] == "fixpair"
    spans = {s[0] for seg in by_id["fixpair/span"].details["segments"] for s in seg["stripes"]}
    assert len(spans) == 2   # really on both disks


def test_thin_lvs_are_listed_but_not_read(fixture_disks):
    _, vols = lvm.assemble(_open(fixture_disks, "single"))
    by_id = {v.id: v for v in vols}
    thin, pool = by_id["fixvg/thin"], by_id["fixvg/pool"]
    assert thin.details["unsupported"] == "thin LV: not supported yet"
    assert "thin pool" in pool.details["unsupported"]
    assert thin.size == EXPECTED["lvs"]["fixvg/thin"]["size"]
    with pytest.raises(UnsupportedFeature, match="thin LV: not supported yet"):
        thin.source.read(0, 512)
    assert not any(v.id.endswith(("_tdata", "_tmeta", "_pmspare")) for v in vols)


def test_missing_pv_fails_only_the_ranges_on_it(fixture_disks):
    vgs, vols = lvm.assemble(_open(fixture_disks, "pair-a"))
    vg = vgs[0]
    missing = [pv for pv in vg["pvs"] if not pv["present"]]
    assert len(missing) == 1 and f"PV {missing[0]['uuid']} missing" in " ".join(vg["warnings"])
    by_id = {v.id: v for v in vols}
    span = by_id["fixpair/span"]
    assert span.details["missing"] == f"PV {missing[0]['uuid']} missing"
    expected = make_fixtures.pattern("fixpair/span", span.size)
    extent = vg["extent_size"]
    present = {pv["name"] for pv in vg["pvs"] if pv["present"]}
    segs = span.details["segments"]
    assert len(segs) == 2
    for seg in segs:
        lo, hi = seg["start_extent"] * extent, (seg["start_extent"] + seg["extent_count"]) * extent
        if seg["stripes"][0][0] in present:
            assert span.source.read(lo + 100, hi - lo - 200) == expected[lo + 100:hi - 100]
        else:
            with pytest.raises(DamagedRange, match="missing"):
                span.source.read(lo + 10, 20)
    with pytest.raises(DamagedRange, match="missing"):      # a read straddling both
        span.source.read(segs[0]["extent_count"] * extent - 10, 20)
    with pytest.raises(DamagedRange, match="missing"):
        by_id["fixpair/str"].source.read(0, 1 << 20)
    first = by_id["fixpair/first"]
    assert "missing" not in first.details
    assert first.source.read(0, first.size) == make_fixtures.pattern("fixpair/first", first.size)


def test_runs_cover_the_lv(fixture_disks):
    _, vols = lvm.assemble(_open(fixture_disks, "pair-a", "pair-b"))
    for vol in vols:
        got = list(vol.source.runs(0, vol.size))
        assert sum(r.length for r in got) == vol.size
        assert got[0].offset == 0
        assert all(a.offset + a.length == b.offset for a, b in zip(got, got[1:]))


# ------------------------------------------------------------- committed metadata

def _mda(pv_bytes: bytearray) -> tuple[int, object, object]:
    pv = lvm.read_pv(BytesSource(bytes(pv_bytes)))
    start, _ = pv.metadata_areas[0]
    hdr = MdaHeader.parse(bytes(pv_bytes[start:start + 512]))
    loc = RawLocn.parse(bytes(pv_bytes[start + MdaHeader.sizeof():start + MdaHeader.sizeof() + 24]))
    return start, hdr, loc


def _write_mda(pv_bytes: bytearray, start: int, hdr, locs: list[dict]) -> None:
    raw = bytearray(MdaHeader.build(dict(checksum_xl=0, magic=lvm.MDA_MAGIC, version=hdr.version,
                                         start=hdr.start, size=hdr.size)))
    for loc in locs:
        raw += RawLocn.build(loc)
    raw += bytes(512 - len(raw))
    raw[0:4] = lvm_crc(bytes(raw[4:])).to_bytes(4, "little")
    pv_bytes[start:start + 512] = raw


def test_picks_the_committed_copy_not_the_highest_seqno(fixture_disks):
    data = bytearray(Path(fixture_disks["single"]).read_bytes())
    start, hdr, loc = _mda(data)
    committed = bytes(data[start + loc.offset:start + loc.offset + loc.size]).rstrip(b"\0").decode()
    seqno = parse_metadata(committed)["fixvg"]["seqno"]
    # A stale copy later in the ring with a higher seqno and an LV that is gone.
    stale = committed.replace(f"seqno = {seqno}", f"seqno = {seqno + 50}", 1)
    stale = stale.replace("logical_volumes {", "logical_volumes {\nghost {\nid = \"x\"\n"
                          "status = [\"READ\", \"VISIBLE\"]\nsegment_count = 0\n}\n", 1).encode() + b"\0"
    at = (loc.offset + loc.size + 511) // 512 * 512 + 4096
    assert at + len(stale) < hdr.size
    data[start + at:start + at + len(stale)] = stale
    vgs, vols = lvm.assemble([BytesSource(bytes(data), "stale.img")])
    assert vgs[0]["seqno"] == seqno
    assert "fixvg/ghost" not in {v.id for v in vols}
    # ...and when raw_locn points at that copy, it is the one we read.
    _write_mda(data, start, hdr, [dict(offset=at, size=len(stale), checksum=lvm_crc(stale), flags=0)])
    vgs, vols = lvm.assemble([BytesSource(bytes(data), "moved.img")])
    assert vgs[0]["seqno"] == seqno + 50 and "fixvg/ghost" in {v.id for v in vols}


def test_reads_metadata_that_wraps_round_the_ring(fixture_disks):
    data = bytearray(Path(fixture_disks["single"]).read_bytes())
    start, hdr, loc = _mda(data)
    text = bytes(data[start + loc.offset:start + loc.offset + loc.size])
    data[start + 512:start + hdr.size] = bytes(hdr.size - 512)
    cut = 700
    at = hdr.size - cut
    data[start + at:start + hdr.size] = text[:cut]
    data[start + 512:start + 512 + len(text) - cut] = text[cut:]
    _write_mda(data, start, hdr, [dict(offset=at, size=len(text), checksum=loc.checksum, flags=0)])
    vgs, vols = lvm.assemble([BytesSource(bytes(data), "wrapped.img")])
    assert "fixvg/root" in {v.id for v in vols}


def test_corrupt_committed_metadata_is_a_clear_error(fixture_disks):
    data = bytearray(Path(fixture_disks["single"]).read_bytes())
    start, hdr, loc = _mda(data)
    data[start + loc.offset + 20] ^= 0xFF
    with pytest.raises(VolumeError, match="checksum does not match"):
        lvm.assemble([BytesSource(bytes(data), "bad.img")])


def test_parses_lvm_text_format():
    text = ('# comment\nvg { id = "a\\"b" seqno = 3\nflags = []\nlist = ["x", 1, "y", 2]\n'
            'sub { n = -1 f = 1.5 }\n}\ncontents = "Text"\nversion = 1\n\0junk')
    meta = parse_metadata(text)
    assert meta == {"vg": {"id": 'a"b', "seqno": 3, "flags": [], "list": ["x", 1, "y", 2],
                           "sub": {"n": -1, "f": 1.5}}, "contents": "Text", "version": 1}
    with pytest.raises(VolumeError):
        parse_metadata("vg { id = }")
    with pytest.raises(VolumeError):
        parse_metadata("vg { a = 1 ")


# ------------------------------------------------------------- real-world images

def _real(name: str) -> Path:
    path = REAL / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


def _gunzip(path: Path, tmp_path: Path) -> Path:
    out = tmp_path / path.name.removesuffix(".gz")
    with gzip.open(path) as f, open(out, "wb") as g:
        shutil.copyfileobj(f, g)
    return out


def test_dissect_lvm_image(tmp_path):
    img = _gunzip(_real("dissect.volume/lvm.bin.gz"), tmp_path)
    vgs, vols = lvm.assemble([FileSource(img)])
    assert [v.id for v in vols] == ["vg_test/lv_test"]
    assert vols[0].size == 4 << 20
    # The file also holds an older metadata copy (seqno 1, no LVs): we read the committed one.
    assert vgs[0]["seqno"] == 2
    data = img.read_bytes()
    pe_start = vgs[0]["pvs"][0]["pe_start"] * 512
    assert vols[0].source.read(0, 4 << 20) == data[pe_start:pe_start + (4 << 20)]


def test_dissect_mirror_pair_is_listed_as_unsupported(tmp_path):
    imgs = [_gunzip(_real(f"dissect.volume/lvm-mirror-{i}.bin.gz"), tmp_path) for i in (1, 2)]
    vgs, vols = lvm.assemble([FileSource(p) for p in imgs])
    assert [v.id for v in vols] == ["lvm-mirror/mirrormirror"]
    assert vols[0].details["unsupported"] == "mirror LV: not supported yet"
    with pytest.raises(UnsupportedFeature, match="mirror"):
        vols[0].source.read(0, 1)
    assert all(pv["present"] for pv in vgs[0]["pvs"])


@pytest.mark.parametrize("name", ["dfvfs/lvm.qcow2", "dfvfs/lvmtest.qcow2"])
def test_dfvfs_qcow2_lvm_images(name, tmp_path):
    from rescue.disk import open_disk

    disk = open_disk(FileSource(_real(name)))
    if disk.info.format != "qcow2":
        pytest.skip("qcow2 reader not available yet (rescue.disk)")
    pv = _find_pv(disk)
    vgs, vols = lvm.assemble([pv])
    assert vols and all(v.size > 0 for v in vols)
    for v in vols:
        if not v.details.get("unsupported"):
            assert len(v.source.read(0, 4096)) == 4096
    # The LVM tools see the same LVs (qemu-img to raw, read-only loop device).
    _lvm_tools_or_skip()
    if not shutil.which("qemu-img"):
        pytest.skip("qemu-img not installed")
    raw = tmp_path / "disk.raw"
    _run("qemu-img", "convert", "-O", "raw", str(_real(name)), str(raw))
    loop = _run("losetup", "-r", "-P", "-f", "--show", str(raw)).strip()
    try:
        devs = ",".join([loop] + [f"{loop}p{i}" for i in range(1, 5) if os.path.exists(f"{loop}p{i}")])
        rows = json.loads(_run("lvs", "--devices", devs, "--reportformat", "json", "--units", "b",
                               "-o", "vg_name,lv_name,lv_size"))["report"][0]["lv"]
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True)
    assert sorted((v.id, v.size) for v in vols) == sorted(
        (f"{r['vg_name']}/{r['lv_name']}", int(r["lv_size"].rstrip("B"))) for r in rows)


def _find_pv(disk):
    """The PV is either the whole disk or its first MBR partition (these images)."""
    from rescue.source import Window

    if lvm.is_pv(disk):
        return disk
    mbr = disk.read(0, 512)
    for i in range(4):
        e = mbr[446 + 16 * i:462 + 16 * i]
        start = int.from_bytes(e[8:12], "little") * 512
        size = int.from_bytes(e[12:16], "little") * 512
        if size and lvm.is_pv(Window(disk, start, size)):
            return Window(disk, start, size)
    pytest.fail("no PV found in the image")


# ------------------------------------------------------------- LVM tools on loop devices

def _lvm_tools_or_skip():
    if os.geteuid() != 0:
        pytest.skip("needs root for loop devices")
    if not shutil.which("lvcreate") or not shutil.which("losetup"):
        pytest.skip("lvm2 tools or losetup not installed")


def _run(*args: str) -> str:
    env = dict(os.environ, LVM_SUPPRESS_FD_WARNINGS="1")
    return subprocess.run(args, check=True, capture_output=True, text=True, env=env).stdout


def test_lvm_tools_on_loop_devices(tmp_path):
    """VGs made by pvcreate/vgcreate/lvcreate on loop devices (metadata only:
    --driverloaded n, so it also works where device-mapper is missing); data
    placed at the PE ranges `lvs` reports, then read back through our LVs."""
    _lvm_tools_or_skip()
    imgs = [tmp_path / "a.img", tmp_path / "b.img"]
    for p in imgs:
        with open(p, "wb") as f:
            f.truncate(12 << 20)
    vg = "rt" + uuid.uuid4().hex[:10]
    loops: list[str] = []
    try:
        for p in imgs:
            loops.append(_run("losetup", "-f", "--show", str(p)).strip())
        # --devices: only our loops; no backup/archive files on the host.
        dev = ["--devices", ",".join(loops), "--config", "backup { backup = 0 archive = 0 }"]
        nodm = dev + ["--driverloaded", "n"]
        _run("pvcreate", *dev, *loops)
        _run("vgcreate", *dev, "-s", "1M", vg, *loops)
        _run("lvcreate", *nodm, "-an", "-Zn", "-Wn", "-L", "3M", "-n", "root", vg, loops[0])
        _run("lvcreate", *nodm, "-an", "-Zn", "-Wn", "-L", "1M", "-n", "swap", vg, loops[0])
        _run("lvcreate", *nodm, "-an", "-Zn", "-Wn", "-i", "2", "-I", "128k", "-L", "4M", "-n", "str", vg)
        _run("lvextend", *nodm, "-L", "+2M", f"{vg}/root", loops[1])
        _run("lvcreate", *nodm, "-an", "-Zn", "-Wn", "-L", "2M", "-n", "var", vg)
        report = json.loads(_run("lvs", *dev, "--reportformat", "json", "--units", "b", "-o",
                                 "lv_name,lv_size,seg_start_pe,seg_size_pe,seg_pe_ranges,stripes,stripe_size",
                                 vg))["report"][0]["lv"]
        pe_start = {r["pv_name"]: int(r["pe_start"].rstrip("B")) for r in json.loads(
            _run("pvs", *dev, "--reportformat", "json", "--units", "b", "-o", "pv_name,pe_start",
                 *loops))["report"][0]["pv"]}
        # Write each LV's pattern where lvs says its extents are.
        expected: dict[str, bytearray] = {}
        for row in report:
            size = int(row["lv_size"].rstrip("B"))
            expected.setdefault(row["lv_name"], bytearray(make_fixtures.pattern(row["lv_name"], size)))
        fds = {lp: os.open(lp, os.O_RDWR) for lp in loops}
        try:
            for row in report:
                want = expected[row["lv_name"]]
                seg_off = int(row["seg_start_pe"]) << 20
                ranges = row["seg_pe_ranges"].split()
                chunk = int(row["stripe_size"].rstrip("B")) or (int(row["seg_size_pe"]) << 20)
                seg_len = int(row["seg_size_pe"]) << 20
                for i in range(0, seg_len // chunk):     # dm-stripe: chunk i goes to stripe i % n
                    lp, span = ranges[i % len(ranges)].rsplit(":", 1)
                    first_pe = int(span.split("-")[0])
                    where = pe_start[lp] + (first_pe << 20) + (i // len(ranges)) * chunk
                    os.pwrite(fds[lp], bytes(want[seg_off + i * chunk:seg_off + (i + 1) * chunk]), where)
        finally:
            for fd in fds.values():
                os.close(fd)
    finally:
        for lp in loops:
            subprocess.run(["losetup", "-d", lp], capture_output=True)
    vgs, vols = lvm.assemble([FileSource(p) for p in imgs])
    assert {v.id for v in vols} == {f"{vg}/{n}" for n in ("root", "swap", "str", "var")}
    for vol in vols:
        name = vol.id.split("/")[1]
        assert vol.size == len(expected[name])
        assert vol.source.read(0, vol.size) == bytes(expected[name]), vol.id
        assert vol.source.read(12345, 777777) == bytes(expected[name][12345:12345 + 777777])
    root = next(v for v in vols if v.id.endswith("/root"))
    assert len(root.details["segments"]) == 2


def test_real_lvm_tools_agree_on_dissect_image(tmp_path):
    _lvm_tools_or_skip()
    img = _gunzip(_real("dissect.volume/lvm.bin.gz"), tmp_path)
    loop = _run("losetup", "-r", "-f", "--show", str(img)).strip()
    try:
        rows = json.loads(_run("lvs", "--devices", loop, "--reportformat", "json", "--units", "b",
                               "-o", "vg_name,lv_name,lv_size"))["report"][0]["lv"]
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True)
    _, vols = lvm.assemble([FileSource(img)])
    assert sorted((v.id, v.size) for v in vols) == sorted(
        (f"{r['vg_name']}/{r['lv_name']}", int(r["lv_size"].rstrip("B"))) for r in rows)


def test_damaged_lv_segment_list_spoils_only_that_lv(fixture_disks):
    data = bytearray(Path(fixture_disks["single"]).read_bytes())
    start, hdr, loc = _mda(data)
    text = bytes(data[start + loc.offset:start + loc.offset + loc.size]).rstrip(b"\0").decode()
    meta = parse_metadata(text)
    root_seg = meta["fixvg"]["logical_volumes"]["root"]["segment1"]
    old = f"start_extent = 0\nextent_count = {root_seg['extent_count']}"
    assert text.count(old) >= 1
    idx = text.index("root {")
    bad = (text[:idx] + text[idx:].replace(old, f"start_extent = 3\nextent_count = {root_seg['extent_count']}", 1))
    raw = bad.encode() + b"\0"
    _write_mda(data, start, hdr, [dict(offset=loc.offset, size=len(raw), checksum=lvm_crc(raw), flags=0)])
    data[start + loc.offset:start + loc.offset + len(raw)] = raw
    _, vols = lvm.assemble([BytesSource(bytes(data), "damaged-lv.img")])
    by_id = {v.id: v for v in vols}
    assert "gap" in by_id["fixvg/root"].details["unsupported"]
    with pytest.raises(VolumeError, match="fixvg/root: metadata damaged"):
        by_id["fixvg/root"].source.read(0, 1)
    data_lv = by_id["fixvg/data"]
    assert data_lv.source.read(0, data_lv.size) == make_fixtures.pattern("fixvg/data", data_lv.size)


def test_truncated_and_garbage_pvs_give_clear_errors(fixture_disks):
    whole = Path(fixture_disks["single"]).read_bytes()
    with pytest.raises(VolumeError):
        lvm.assemble([BytesSource(whole[:3000], "cut.img")])        # label, but no metadata area
    junk = bytearray(whole)
    _, hdr, loc = _mda(junk)
    junk[hdr.start + loc.offset:hdr.start + loc.offset + loc.size] = b"{" * loc.size
    with pytest.raises(VolumeError):
        lvm.assemble([BytesSource(bytes(junk), "junk.img")])


def test_metadata_that_does_not_parse_is_a_clear_error(fixture_disks):
    data = bytearray(Path(fixture_disks["single"]).read_bytes())
    start, hdr, loc = _mda(data)
    raw = b"fixvg {\nid = \"x\"\nseqno = \n}\n\0"
    data[start + loc.offset:start + loc.offset + len(raw)] = raw
    _write_mda(data, start, hdr, [dict(offset=loc.offset, size=len(raw), checksum=lvm_crc(raw), flags=0)])
    with pytest.raises(VolumeError, match="LVM metadata"):
        lvm.assemble([BytesSource(bytes(data), "unparsable.img")])


def test_vg_summary_names_lvs_and_missing_pvs(fixture_disks):
    vgs, _ = lvm.assemble(_open(fixture_disks, "pair-a"))
    line = lvm.vg_summary(vgs[0])
    missing = next(pv["uuid"] for pv in vgs[0]["pvs"] if not pv["present"])
    assert line.startswith("volume group fixpair: 2 PVs (1 missing: " + missing)
    assert "multi 4.0 MiB linear (2 segments)" in line and "str 4.0 MiB striped" in line
    vgs, _ = lvm.assemble(_open(fixture_disks, "single"))
    assert "thin 4.0 MiB thin [not supported yet]" in lvm.vg_summary(vgs[0])


def test_second_metadata_area_is_used_when_the_first_is_damaged(tmp_path):
    """pvcreate --pvmetadatacopies 2 keeps a copy at the end of the PV."""
    _lvm_tools_or_skip()
    img = tmp_path / "pv.img"
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    vg = "rt" + uuid.uuid4().hex[:10]
    loop = _run("losetup", "-f", "--show", str(img)).strip()
    try:
        dev = ["--devices", loop, "--config", "backup { backup = 0 archive = 0 }"]
        _run("pvcreate", *dev, "--pvmetadatacopies", "2", loop)
        _run("vgcreate", *dev, "-s", "1M", vg, loop)
        _run("lvcreate", *dev, "--driverloaded", "n", "-an", "-Zn", "-Wn", "-L", "3M", "-n", "root", vg)
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True)
    pv = lvm.read_pv(FileSource(img))
    assert len(pv.metadata_areas) == 2
    data = bytearray(img.read_bytes())
    first = pv.metadata_areas[0][0]
    data[first + 4:first + 20] = b"\0" * 16          # wipe the first header's magic
    vgs, vols = lvm.assemble([BytesSource(bytes(data), "one-bad-mda.img")])
    assert [v.id for v in vols] == [f"{vg}/root"]
    assert any("no mda_header magic" in w for w in vgs[0]["warnings"])


@pytest.mark.parametrize("text", [
    "vg { a = " + "[" * 5000 + " }",
    "vg " + "{ s " * 5000,
    "vg { physical_volumes = 3 logical_volumes = [] extent_size = 8192 id = \"x\" seqno = 1 }",
    "vg { id = \"x\" seqno = [1] extent_size = 99999999999999999999999 }",
])
def test_hostile_metadata_text_is_a_volume_error(fixture_disks, text):
    data = bytearray(Path(fixture_disks["single"]).read_bytes())
    start, hdr, loc = _mda(data)
    raw = text.encode() + b"\0"
    data[start + loc.offset:start + loc.offset + len(raw)] = raw
    _write_mda(data, start, hdr, [dict(offset=loc.offset, size=len(raw), checksum=lvm_crc(raw), flags=0)])
    with pytest.raises(VolumeError):
        lvm.assemble([BytesSource(bytes(data), "hostile.img")])
