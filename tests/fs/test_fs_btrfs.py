"""The native btrfs reader on committed fixtures (no mkfs, no root needed):
every entry, byte, mode, owner, time, link, device and xattr equals what the
kernel showed when scripts/make-btrfs-fixtures built them (fixtures/btrfs/
MANIFEST.json); zstd, LZO and zlib extents are really exercised; superblock
mirrors, DUP metadata copies, unknown feature flags; layouts checked
against the declared Structs."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import zstandard

import repo_paths
from btrfs_support import differences, reader_links, reader_view
from rescue.errors import FilesystemError
from rescue.fs import open_filesystem
from rescue.fs.btrfs import BtrfsFileSystem
from rescue.fs.btrfs import structs as S
from rescue.fs.btrfs.checksum import checksummer, name_hash
from rescue.fs.btrfs.lzo import LzoError, btrfs_lzo_decompress, lzo1x_decompress, segments
from rescue.source.base import COMPRESSED, FileSource

FIXTURES = repo_paths.FIXTURES / "btrfs"
MANIFEST = json.loads((FIXTURES / "MANIFEST.json").read_text())


class Patched:
    """A byte source with some bytes replaced (damage without copying the image)."""

    def __init__(self, base, patches: dict[int, bytes] | None = None, size: int | None = None) -> None:
        self.base, self.patches = base, dict(patches or {})
        self.name = base.name
        self.size = base.size if size is None else size

    def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        data = bytearray(self.base.read(offset, length))
        for at, blob in self.patches.items():
            lo, hi = max(at, offset), min(at + len(blob), offset + length)
            if lo < hi:
                data[lo - offset:hi - offset] = blob[lo - at:hi - at]
        return bytes(data)

    def close(self) -> None:
        pass


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> dict[str, Path]:
    out = {}
    tmp = tmp_path_factory.mktemp("btrfs-fixtures")
    for name in MANIFEST:
        dst = tmp / name
        with open(FIXTURES / f"{name}.zst", "rb") as src, open(dst, "wb") as f:
            zstandard.ZstdDecompressor().copy_stream(src, f)
        out[name] = dst
    return out


def _expected(name: str, view: str) -> dict[str, tuple]:
    raw = MANIFEST[name]["views"][view]
    return {p: (*r[:9], tuple(r[9]) if r[9] is not None else None, {k: bytes.fromhex(v) for k, v in r[10].items()},
                r[11]) for p, r in raw.items()}


MADE_UP = {"/@-snap/var-lib-docker": {"mtime_ns", "ctime_ns"},
           "/@-snap/.snapshots/home-yesterday": {"mtime_ns", "ctime_ns"}}


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_fixture_reads_exactly_as_the_kernel_showed_it(images, name):
    fs = BtrfsFileSystem(FileSource(images[name]), subvolume=5)
    assert differences(_expected(name, "5"), reader_view(fs), skip=MADE_UP) == []
    assert {tuple(sorted(g)) for g in reader_links(fs)} == {tuple(g) for g in MANIFEST[name]["links"]["5"]}
    if "@home" in MANIFEST[name]["views"]:
        assert differences(_expected(name, "@home"), reader_view(fs.subvolume("@home"))) == []
        opened = BtrfsFileSystem(FileSource(images[name]), subvolume="/@home")
        assert opened.info.details["subvolume"]["path"] == "/@home"
        assert differences(_expected(name, "@home"), reader_view(opened)) == []
        with pytest.raises(FilesystemError, match=r"no subvolume '@nope' \(subvolumes: @ \(id 256\)"):
            BtrfsFileSystem(FileSource(images[name]), subvolume="@nope")


def test_each_compression_is_really_exercised(images):
    fs = BtrfsFileSystem(FileSource(images["subvols-xxhash.img"]))
    for directory, code in (("zstd", S.COMPRESS_ZSTD), ("lzo", S.COMPRESS_LZO), ("zlib", S.COMPRESS_ZLIB)):
        entry = fs.stat(f"/{directory}/files/text-3m")
        exts = fs._file_extents(entry)
        assert {e.extent[3] for e in exts if e.kind == COMPRESSED} == {code}
        assert all(r.kind == COMPRESSED and r.where is None for r in fs.file_runs(entry))
    forced = BtrfsFileSystem(FileSource(images["mixed-4k.img"]))
    assert any(e.kind == COMPRESSED and e.extent[0] == "inline"
               for e in forced._file_extents(forced.stat("/files/inline")))


def test_registry_detects_and_describes_it(images):
    fs = open_filesystem(FileSource(images["subvols-xxhash.img"]))
    assert isinstance(fs, BtrfsFileSystem) and fs.info.type == "btrfs" and fs.info.label == "fixture"
    d = fs.info.details
    assert d["checksum"] == "xxhash64" and "dup/metadata" in d["profiles"]
    paths = {s["path"] for s in d["subvolumes"]}
    assert {"@", "@home", "@/var-lib-docker", "@/.snapshots/home-yesterday", "@-snap"} <= paths
    assert fs.info.size == 110 << 20 and 0 < fs.info.used < fs.info.size
    assert fs.stat("/@home").inode != fs.stat("/@").inode   # both are inode 256 of their own tree


def test_file_runs_point_at_the_bytes_on_the_volume(images):
    source = FileSource(images["mixed-4k.img"])
    fs = BtrfsFileSystem(source)
    entry = fs.stat("/files/sparse")
    runs = fs.file_runs(entry)
    assert sum(r.length for r in runs) == entry.size and runs[0].offset == 0
    content = fs.read_range(entry, 0, entry.size)
    for run in runs:
        if run.where is not None:
            assert source.read(run.where, run.length) == content[run.offset:run.offset + run.length]
        elif run.kind in ("zero", "unwritten"):
            assert content[run.offset:run.offset + run.length].count(0) == run.length
    assert fs.read_range(entry, 1000, 5000) == content[1000:6000]


def test_primary_superblock_damaged_uses_the_mirror(images):
    base = FileSource(images["subvols-xxhash.img"])
    fs = BtrfsFileSystem(Patched(base, {S.SUPER_INFO_OFFSET + 0x100: b"\xff\xff"}))
    assert any("superblock at 65536: checksum mismatch" in d for d in fs.info.details["damage"])
    assert fs.read_file("/@home/alice/notes.txt") == b"changed after the snapshot\n"
    with pytest.raises(FilesystemError, match="no valid btrfs superblock") as exc:
        BtrfsFileSystem(Patched(base, {S.SUPER_INFO_OFFSET + 0x100: b"\xff", (64 << 20) + 0x100: b"\xff"}))
    assert "\n" not in str(exc.value)


def _resign_super(raw: bytes) -> bytes:
    sb = S.Superblock.parse(raw)
    csum = checksummer(sb.csum_type)(raw[0x20:])
    return csum + bytes(32 - len(csum)) + raw[0x20:]


def test_unknown_incompat_flag_is_named(images):
    base = FileSource(images["mixed-4k.img"])
    raw = bytearray(base.read(S.SUPER_INFO_OFFSET, S.SUPER_INFO_SIZE))
    flags = struct.unpack_from("<Q", raw, 0xBC)[0] | (1 << 13) | (1 << 40)
    struct.pack_into("<Q", raw, 0xBC, flags)
    with pytest.raises(FilesystemError, match="extent_tree_v2, bit 40"):
        BtrfsFileSystem(Patched(base, {S.SUPER_INFO_OFFSET: _resign_super(bytes(raw))}))


def test_a_bad_metadata_copy_is_read_from_the_other_dup_copy(images):
    source = FileSource(images["subvols-xxhash.img"])
    fs = BtrfsFileSystem(source)
    loc = fs._locate("/zstd/files")
    node = fs.vol.node(fs.roots[loc.tree].bytenr)
    (_n, copies), = fs.vol.map(node.bytenr, fs.vol.nodesize)
    assert len(copies) == 2   # DUP
    damaged = Patched(source, {copies[0][1] + 200: b"\x00\x01\x02\x03"})
    again = BtrfsFileSystem(damaged)
    assert differences(reader_view(fs, "/zstd"), reader_view(again, "/zstd")) == []
    both = Patched(source, {copies[0][1] + 200: b"\x00\x01\x02\x03", copies[1][1] + 200: b"\x00\x01\x02\x03"})
    broken = BtrfsFileSystem(both)   # the root block of the top level: nothing below it can be listed
    with pytest.raises(OSError, match="checksum mismatch"):
        broken.listdir("/zstd")


def test_structs_and_their_fast_twins_agree():
    assert S.Superblock.sizeof() == S.SUPER_INFO_SIZE
    assert S.Header.sizeof() == S.HEADER_SIZE == 32 + 16 + S.HEADER.size
    for con, fast in ((S.Item, S.ITEM), (S.KeyPtr, S.KEY_PTR), (S.Chunk, S.CHUNK), (S.Stripe, S.STRIPE),
                      (S.InodeItem, S.INODE_ITEM), (S.DirItem, S.DIR_ITEM), (S.RootRef, S.ROOT_REF),
                      (S.InodeRef, S.INODE_REF), (S.DiskKey, S.DISK_KEY)):
        assert con.sizeof() == fast.size, con
    assert S.FileExtentItem.sizeof() == S.FILE_EXTENT_HEAD.size + S.FILE_EXTENT_DISK.size
    assert S.RootItem.sizeof() >= 351 and S.ROOT_ITEM_V1.size == 239
    raw = bytes(range(160))
    slow = S.InodeItem.parse(raw)
    fast = S.INODE_ITEM.unpack(raw)
    assert (slow.size, slow.nlink, slow.mode, slow.rdev, slow.mtime.sec, slow.mtime.nsec) == \
        (fast[2], fast[5], fast[8], fast[9], fast[16], fast[17])


def test_name_hash_and_lzo_edges():
    assert name_hash(b"default") == 0x8DBFC2D2   # crc32c seeded with ~1, as btrfs_name_hash
    # LZO1X: a literal run then the end marker; truncated and runaway streams are errors
    for native in (False, True):
        assert lzo1x_decompress(bytes([17 + 5]) + b"hello" + b"\x11\x00\x00", 100, native) == b"hello"
    for bad in (b"\x00\x00\x00", bytes([17 + 5]) + b"hel", bytes([17 + 2]) + b"ab" + b"\x40\xff"):
        for native in (False, True):
            with pytest.raises(LzoError):
                lzo1x_decompress(bad, 100, native)


def test_our_lzo1x_decoder_matches_the_native_one_on_real_extents(images):
    """The pure-Python LZO1X decoder (used where lzallright is not installed)
    inflates every segment of the fixture's LZO extents like the native one."""
    fs = BtrfsFileSystem(FileSource(images["subvols-xxhash.img"]))
    checked = 0
    for path in ("/lzo/files/text-3m", "/lzo/files/mixed", "/lzo/files/inline", "/lzo/files/overwritten"):
        for ext in fs._file_extents(fs.stat(path)):
            if ext.kind != COMPRESSED:
                continue
            if ext.extent[0] == "inline":
                stored = ext.extent[1]
            else:
                stored = fs.vol.read_logical(ext.extent[0], ext.extent[1])
            ram = ext.extent[2]
            ours = btrfs_lzo_decompress(stored, fs.vol.sectorsize, ram, native=False)
            assert ours == btrfs_lzo_decompress(stored, fs.vol.sectorsize, ram)
            checked += sum(1 for _ in segments(stored, fs.vol.sectorsize))
    assert checked > 100
