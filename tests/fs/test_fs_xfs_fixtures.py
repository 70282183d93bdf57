"""The native XFS reader against the committed fixtures (fixtures/xfs, made by
scripts/make-xfs-fixtures with mkfs.xfs + a real loop mount; the manifest is
the kernel's own view of each image). Runs without mkfs.xfs, root or mounts."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import pytest
import zstandard

import xfs_support as S
from common_support import rescue, tar_view, zstd_decompress
from rescue.errors import FilesystemError
from rescue.fs import open_filesystem
from rescue.fs.xfs import XfsFileSystem
from rescue.fs.xfs.attr import xfs_acl_to_xattr
from rescue.fs.xfs.structs import INODE_CORE_V3, INODE_FAST, INODE_V3_FAST, InodeCore
from rescue.source.base import DATA, UNWRITTEN, ZERO, FileSource

FIX = S.REPO / "fixtures" / "xfs"
MANIFEST = json.loads(zstandard.ZstdDecompressor().decompress((FIX / "MANIFEST.json.zst").read_bytes(),
                                                              max_output_size=64 << 20))
NAMES = sorted(n for n in MANIFEST if "volume" not in MANIFEST[n])   # bare XFS images
# Forms each fixture must exercise (xfs_support.forms), so passing means something.
REQUIRED = {
    "v5": {"dir:shortform", "dir:block", "dir:leaf", "dir:node", "dir:btree", "file:extents", "file:btree",
           "unwritten", "symlink:inline", "symlink:remote", "attr:shortform", "attr:node"},
    "b1k": {"bmbt-levels-2", "symlink:remote", "attr:leaf", "attr:remote", "dir:leaf", "unwritten"},
    "v4": {"dir:shortform", "dir:block", "dir:leaf", "dir:node", "symlink:remote"},
}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("xfsfx")
    return {n: zstd_decompress(FIX / f"{n}.img.zst", tmp / f"{n}.img") for n in NAMES}


def _expected(name: str) -> dict[str, tuple]:
    return S.xfs_trees.from_json(MANIFEST[name]["view"])


def _masked(got: dict[str, tuple], want: dict[str, tuple]) -> dict[str, tuple]:
    """Fields the manifest leaves as None (mkfs -p chooses them) are not compared."""
    return {p: tuple(None if w is None else g for g, w in zip(rec, want[p])) if p in want else rec
            for p, rec in got.items()}


@pytest.mark.parametrize("name", NAMES)
def test_reader_sees_what_the_kernel_saw(images, name):
    fs = XfsFileSystem(FileSource(images[name]))
    want = _expected(name)
    got = _masked(S.reader_view(fs), want)
    assert len(got) == len(want)
    assert S.differences(want, got) == []
    assert fs.info.label == MANIFEST[name]["label"]
    assert fs.info.type == "xfs" and fs.info.free and fs.info.used and fs.info.size == fs.info.used + fs.info.free


@pytest.mark.parametrize("name", NAMES)
def test_fixture_exercises_every_form(images, name):
    seen = S.forms(XfsFileSystem(FileSource(images[name])))
    assert REQUIRED[name] <= seen, f"missing forms: {REQUIRED[name] - seen}"


def test_registry_picks_the_native_reader(images):
    fs = open_filesystem(FileSource(images["v5"]))
    assert isinstance(fs, XfsFileSystem) and fs.backend == "xfs"
    assert fs.info.details["log"] == "clean"
    assert {"v5", "ftype", "bigtime", "reflink"} <= set(fs.info.details["features"])
    v4 = open_filesystem(FileSource(images["v4"]))
    assert v4.info.details["version"] == 4 and "ftype" not in v4.info.details["features"]


def test_file_runs_keep_holes_and_unwritten_ranges(images):
    fs = XfsFileSystem(FileSource(images["v5"]))
    sparse = fs.stat("/files/sparse")
    runs = fs.file_runs(sparse)
    assert runs[0].kind == DATA and runs[0].offset == 0 and runs[0].where is not None
    assert any(r.kind == ZERO and r.length >= 4 << 20 for r in runs)
    assert sum(r.length for r in runs) == sparse.size
    assert [r.offset for r in runs] == sorted(r.offset for r in runs)
    falloc = fs.file_runs(fs.stat("/files/fallocated"))
    assert any(r.kind == UNWRITTEN and r.where is None for r in falloc)
    assert fs.data_ranges(fs.stat("/files/all-hole")) == []
    frag = fs.file_runs(fs.stat("/files/fragmented"))
    assert sum(r.kind == DATA for r in frag) == 300
    # a read across a hole boundary equals the same bytes from the whole-file stream
    whole = b"".join(fs.read_chunks(sparse))
    assert fs.read_range(sparse, (5 << 20) - 100, 1000) == whole[(5 << 20) - 100:(5 << 20) + 900]


def test_acls_come_out_in_linux_xattr_form(images):
    fs = XfsFileSystem(FileSource(images["v5"]))
    x = fs.xattrs(fs.stat("/xattrs/acl-dir"))
    assert set(x) == {"system.posix_acl_access", "system.posix_acl_default"}
    version, = struct.unpack_from("<I", x["system.posix_acl_default"])
    entries = [struct.unpack_from("<HHI", x["system.posix_acl_default"], 4 + 8 * i)
               for i in range((len(x["system.posix_acl_default"]) - 4) // 8)]
    assert version == 2 and (2, 5, 1000) in entries    # ACL_USER 1000 r-x
    assert not any(k.startswith("trusted.SGI_ACL") for k in x)


def test_xfs_acl_conversion_rejects_garbage():
    good = struct.pack(">I", 1) + struct.pack(">IIH2x", 1, 0, 6)
    assert xfs_acl_to_xattr(good) == struct.pack("<IHHI", 2, 1, 6, 0xFFFFFFFF)
    for bad in (b"", struct.pack(">I", 3) + b"\0" * 12, struct.pack(">I", 1) + struct.pack(">IIH2x", 0x99, 0, 0)):
        with pytest.raises(ValueError):
            xfs_acl_to_xattr(bad)


def test_inode_fast_path_agrees_with_the_declared_struct():
    values = dict(di_mode=0o100644, di_version=3, di_format=2, di_onlink=0, di_uid=1, di_gid=2, di_nlink=3,
                  di_projid_lo=0, di_projid_hi=0, di_big_nextents=0, di_atime=4, di_mtime=5, di_ctime=6,
                  di_size=7, di_nblocks=8, di_extsize=0, di_nextents=9, di_anextents=10, di_forkoff=11,
                  di_aformat=2, di_dmevmask=0, di_dmstate=0, di_flags=0, di_gen=12, di_next_unlinked=13,
                  di_crc=14, di_changecount=15, di_lsn=16, di_flags2=17, di_cowextsize=18, di_crtime=19,
                  di_ino=20, di_uuid=b"u" * 16)
    raw = InodeCore.build(values)
    assert len(raw) == INODE_CORE_V3 == 176 and INODE_FAST.size == 100
    fast = INODE_FAST.unpack_from(raw)
    assert fast[1:8] == (0o100644, 3, 2, 0, 1, 2, 3) and fast[14] == 7 and fast[19] == 11
    v3 = INODE_V3_FAST.unpack_from(raw, 100)
    assert v3[3] == 17 and v3[6] == 20 and v3[7] == b"u" * 16


@pytest.mark.parametrize("name", ["v5", "b1k"])
def test_extract_to_tar_matches_the_kernel(images, name, tmp_path):
    """`rescue extract` end to end (no libguestfs): every entry, byte, mode, owner,
    mtime, link target and xattr in the tar is what the kernel showed."""
    out = tmp_path / "out.tar"
    res = rescue("extract", str(images[name]), "-o", str(out), "--keep-setuid", timeout=120)
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    assert b"libguestfs" not in res.stderr
    view = tar_view(out)
    want = _expected(name)
    assert set(view.recs) == {p.lstrip("/") for p in want if p != "/"}
    for path, rec in want.items():
        if path == "/":
            continue
        kind, mode, uid, gid, size, mtime, _ctime, _nlink, _ino, target, rdev, xattrs, sha = rec
        got = view.recs[path.lstrip("/")]
        assert (got.kind, got.mode, got.uid, got.gid, got.mtime_ns) == (kind, mode, uid, gid, mtime), path
        if kind == "file":
            assert (got.size, got.sha) == (size, sha), path
        assert got.target == target and got.rdev == rdev, path
        plain = {k: v for k, v in xattrs.items() if not k.startswith("system.posix_acl")}
        assert {k: v for k, v in got.xattrs.items() if not k.startswith("system.posix_acl")} == plain, path


def test_ls_and_cat_work_without_libguestfs(images):
    res = rescue("ls", str(images["v5"]), "/links")
    assert res.returncode == 0 and b"len1023" in res.stdout
    res = rescue("cat", str(images["v5"]), "/files/tiny")
    assert res.returncode == 0 and res.stdout == b"hello\n"
    res = rescue("inspect", str(images["v5"]))
    assert res.returncode == 0 and b"fx-v5" in res.stdout and b"xfs" in res.stdout


def test_unknown_incompat_feature_is_named(images, tmp_path):
    raw = bytearray(images["v5"].read_bytes()[:1 << 20])
    struct.pack_into(">I", raw, 0xD8, struct.unpack_from(">I", raw, 0xD8)[0] | 0x200 | 0x10000)
    bad = tmp_path / "future.img"
    bad.write_bytes(raw)
    with pytest.raises(FilesystemError, match="zoned realtime device, unknown bit 0x10000"):
        XfsFileSystem(FileSource(bad))


def test_dirty_log_is_a_warning_not_a_refusal(images, tmp_path, caplog):
    """A log whose last record is not an unmount record: read on, say so."""
    img = tmp_path / "dirty.img"
    img.write_bytes(images["v5"].read_bytes())
    fs = XfsFileSystem(FileSource(img))
    sb = fs.sb
    start = sb.fsb_to_byte(sb.logstart)
    with open(img, "r+b") as f:      # turn the unmount record's op flag into an ordinary commit
        data = bytearray(f.read())
        found = 0
        for bb in range(sb.logblocks * sb.block_size // 512):
            pos = start + bb * 512
            if struct.unpack_from(">I", data, pos)[0] == 0xFEEDBABE and struct.unpack_from(">I", data, pos + 40)[0] == 1:
                data[pos + 512 + 9] &= ~0x20
                found += 1
        assert found
        f.seek(0)
        f.write(data)
    with caplog.at_level(logging.WARNING):
        fs = XfsFileSystem(FileSource(img))
    assert fs.info.details["log"] == "dirty"
    assert "log is dirty" in caplog.text
    assert fs.stat("/files/tiny").size == 6


REAL = S.REPO.parent / "shared" / "real-images"


@pytest.mark.skipif(not (REAL / "e2fsprogs" / "f_detect_xfs.bz2").exists(), reason="../shared/real-images not present")
def test_real_image_from_e2fsprogs_opens(tmp_path):
    """e2fsprogs' f_detect_xfs: a real (v4, 2014) XFS with an empty root."""
    import bz2
    img = tmp_path / "detect.img"
    img.write_bytes(bz2.decompress((REAL / "e2fsprogs" / "f_detect_xfs.bz2").read_bytes()))
    fs = open_filesystem(FileSource(img))
    assert isinstance(fs, XfsFileSystem)
    assert fs.info.label == "test_filsys" and fs.info.details["version"] == 4
    assert fs.listdir("/") == [] and fs.stat("/").kind == "dir"


@pytest.mark.skipif("lvm-gpt" not in MANIFEST, reason="the LVM+XFS fixture was not built (needs guestfish)")
def test_lvm_xfs_root_on_gpt_end_to_end(tmp_path):
    """A RHEL-style disk: GPT, LVM2 PV, VG rl, LV root = XFS. inspect names it; extract
    of /var/lib/docker/volumes equals the kernel's view of the LV; no libguestfs."""
    disk = zstd_decompress(FIX / "lvm-gpt.img.zst", tmp_path / "lvm-gpt.img")
    res = rescue("inspect", str(disk))
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    assert b"rl/root" in res.stdout and b"xfs" in res.stdout and b"rlroot" in res.stdout
    out = tmp_path / "vols.tar"
    res = rescue("extract", str(disk), "--path", "/var/lib/docker/volumes", "-o", str(out), timeout=120)
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    assert b"libguestfs" not in res.stderr
    view = tar_view(out)
    want = {p: r for p, r in S.xfs_trees.from_json(MANIFEST["lvm-gpt"]["view"]).items()
            if p.startswith("/var/lib/docker/volumes")}
    assert want and set(view.recs) == {p.lstrip("/") for p in want}
    for path, rec in want.items():
        got = view.recs[path.lstrip("/")]
        assert (got.kind, got.mode, got.uid, got.gid, got.mtime_ns) == (rec[0], rec[1], rec[2], rec[3], rec[5])
        assert got.sha == rec[12] and got.target == rec[9]
        assert got.xattrs == rec[11]
    res = rescue("cat", str(disk), "/etc/os-release")
    assert res.returncode == 0 and b"Rocky" in res.stdout


def test_realtime_flag_skips_the_file_with_the_reason(images, tmp_path):
    """(This kernel has no CONFIG_XFS_RT to make one: the flag is set on a v5 inode
    and its CRC recomputed, as the kernel would have written it.)"""
    from rescue.crc32c import crc32c
    from rescue.fs.base import FileReadError

    data = bytearray(images["v5"].read_bytes())
    fs = XfsFileSystem(FileSource(images["v5"]))
    pos = fs.reader.ino_location(fs.stat("/files/tiny").inode)
    inode = data[pos:pos + fs.sb.inode_size]
    struct.pack_into(">H", inode, 0x5A, struct.unpack_from(">H", inode, 0x5A)[0] | 0x1)   # XFS_DIFLAG_REALTIME
    struct.pack_into("<I", inode, 0x64, 0)
    struct.pack_into("<I", inode, 0x64, crc32c(bytes(inode)))
    data[pos:pos + len(inode)] = inode
    img = tmp_path / "rt.img"
    img.write_bytes(data)
    fs = XfsFileSystem(FileSource(img))
    with pytest.raises(FileReadError, match="realtime device"):
        fs.file_runs(fs.stat("/files/tiny"))
    assert fs.read_range(fs.stat("/files/sparse"), 0, 5) == b"start"


@pytest.mark.parametrize("header_bb,cycles,flags,state", [
    (8, {range(0, 10): 2, range(10, 128): 1}, 0x20, "clean"),    # unmount record just before the head
    (8, {range(0, 10): 2, range(10, 128): 1}, 0x00, "dirty"),    # an ordinary transaction last
    (127, {range(0, 1): 2, range(1, 128): 1}, 0x20, "clean"),    # the record wraps the log's end
    (40, {range(0, 128): 3}, 0x20, "unknown"),                   # no record before the (wrapped) head
])
def test_log_state_finds_the_head_and_the_last_record(images, header_bb, cycles, flags, state):
    from dataclasses import replace

    from rescue.fs.xfs.superblock import log_state

    sb = replace(XfsFileSystem(FileSource(images["v5"])).sb, logstart=1, logblocks=16)   # 128 sectors
    log = bytearray(128 * 512)
    for bbs, cycle in cycles.items():
        for bb in bbs:
            struct.pack_into(">I", log, bb * 512, cycle)
    if state != "unknown":
        hdr = header_bb * 512
        struct.pack_into(">II", log, hdr, 0xFEEDBABE, struct.unpack_from(">I", log, hdr)[0])
        struct.pack_into(">I", log, hdr + 8, 2)          # h_version 2, h_size small: one header sector
        struct.pack_into(">I", log, hdr + 40, 1)         # h_num_logops
        op = ((header_bb + 1) % 128) * 512
        log[op + 9] = flags

    class Src:
        name, size = "log", 4096 + len(log)

        def read(self, offset, length):
            return (bytes(4096) + bytes(log))[offset:offset + length]

    assert log_state(Src(), sb).split(":")[0] == state
