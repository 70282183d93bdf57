"""The native btrfs reader against the kernel: filesystems made by mkfs.btrfs,
filled through a real loop mount (compression zstd/lzo/zlib, compress-force,
checksums crc32c/xxhash/sha256/blake2, metadata single/dup, 4 KiB nodes,
subvolumes, snapshots, reflinks, ACLs...), then every entry, byte, mode,
owner, time, link target, device number and xattr the reader gives must equal
what the kernel's read-only mount shows. Needs root, mkfs.btrfs and loop
devices; skips with the reason otherwise (the committed fixtures in
test_fs_btrfs.py cover machines without them)."""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from repo_paths import REPO
from btrfs_support import btrfs_trees, differences, mkfs, mounted, reader_links, reader_view, why_no_kernel
from rescue.errors import FilesystemError
from rescue.fs.base import FileReadError
from rescue.source.base import COMPRESSED, FileSource
from rescue.fs.btrfs import BtrfsFileSystem

pytestmark = pytest.mark.skipif(why_no_kernel() is not None, reason=f"btrfs differential: {why_no_kernel()}")

# A snapshot of '@' holds '@/var-lib-docker' (a nested subvolume) and the
# read-only home snapshot as empty directories whose times the kernel makes up
# at mount time: those two fields are not compared there.
MADE_UP = {p: {"mtime_ns", "ctime_ns"} for p in ("/@-snap/var-lib-docker", "/@-snap/.snapshots/home-yesterday")}

VARIANTS = {
    "plain-dup": ("", []),
    "zstd": ("compress=zstd", []),
    "lzo": ("compress=lzo", []),
    "zlib": ("compress=zlib", []),
    "force-zstd-xxhash-single": ("compress-force=zstd", ["-m", "single", "--csum", "xxhash"]),
    "force-lzo-node4k": ("compress-force=lzo", ["-n", "4096"]),
    "zlib-sha256": ("compress=zlib:9", ["--csum", "sha256"]),
    "blake2-holes": ("", ["--csum", "blake2", "-O", "^no-holes"]),
}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("btrfs")


def _build(work: Path, name: str, options: str, args: list[str]) -> tuple[Path, dict, set]:
    image = mkfs(work / f"{name}.img", "400M", *args)
    with mounted(image, work / "mnt", options) as mnt:
        btrfs_trees.populate(mnt)
        btrfs_trees.subvolumes(mnt)
    with mounted(image, work / "mnt", "ro") as mnt:
        return image, btrfs_trees.kernel_view(mnt), btrfs_trees.kernel_links(mnt)


@pytest.mark.parametrize("name", VARIANTS)
def test_every_entry_byte_and_attribute_equals_the_kernels(work, name):
    options, args = VARIANTS[name]
    image, want, links = _build(work, name, options, args)
    fs = BtrfsFileSystem(FileSource(image), subvolume=5)
    got = reader_view(fs)
    assert differences(want, got, skip=MADE_UP) == []
    assert reader_links(fs) == links and links
    runs = fs.file_runs(fs.stat("/files/text-3m"))
    compressed = sum(r.length for r in runs if r.kind == COMPRESSED)
    if "compress" in options:
        assert compressed == 3 << 20, f"{name}: the text file should be stored compressed"
    else:
        assert compressed == 0 and all(r.where is not None for r in runs)
    image.unlink()


def test_mkfs_rootdir_image_equals_the_kernels(work):
    source = mkfs(work / "src.img", "300M")
    with mounted(source, work / "src") as mnt:
        btrfs_trees.populate(mnt)
        image = work / "rootdir.img"
        image.unlink(missing_ok=True)
        subprocess.run(["truncate", "-s", "300M", str(image)], check=True)
        subprocess.run(["mkfs.btrfs", "-q", "-f", "--rootdir", str(mnt), str(image)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with mounted(image, work / "mnt", "ro") as mnt:
        want = btrfs_trees.kernel_view(mnt)
    got = reader_view(BtrfsFileSystem(FileSource(image)))
    assert differences(want, got) == []


def test_subvolumes_listed_and_opened_like_mount_subvol(work):
    image, _want, _links = _build(work, "subvols", "compress=zstd", [])
    fs = BtrfsFileSystem(FileSource(image))
    subs = {s["path"]: s for s in fs.info.details["subvolumes"]}
    assert set(subs) == {"@", "@home", "@/var-lib-docker", "@/.snapshots/home-yesterday", "@-snap"}
    assert subs["@/.snapshots/home-yesterday"]["snapshot_of"] == "@home"
    assert subs["@/.snapshots/home-yesterday"]["readonly"] is True
    assert subs["@-snap"]["snapshot_of"] == "@" and not subs["@"]["snapshot"]
    for spec, mount_opt in (("@home", "subvol=@home"), ("/@/.snapshots/home-yesterday",
                                                          "subvol=@/.snapshots/home-yesterday"),
                            (subs["@"]["id"], f"subvolid={subs['@']['id']}")):
        view = fs.subvolume(spec)
        with mounted(image, work / "mnt", "ro," + mount_opt) as mnt:
            want = btrfs_trees.kernel_view(mnt)
        assert differences(want, reader_view(view)) == [], spec
    assert fs.subvolume("@home").read_file("/alice/notes.txt") == b"changed after the snapshot\n"
    old = fs.subvolume("@/.snapshots/home-yesterday").read_file("/alice/notes.txt")
    assert old == b"alice's notes\n" * 100
    # the default subvolume, as a plain mount shows it
    with mounted(image, work / "mnt") as mnt:
        subprocess.run(["btrfs", "subvolume", "set-default", str(subs["@home"]["id"]), str(mnt)], check=True,
                       stdout=subprocess.DEVNULL)
    with mounted(image, work / "mnt", "ro") as mnt:
        want = btrfs_trees.kernel_view(mnt)
    fs = BtrfsFileSystem(FileSource(image))
    assert fs.info.details["default_subvolume"] == subs["@home"]["id"]
    assert differences(want, reader_view(fs)) == []
    with pytest.raises(Exception, match="no subvolume 'nope'"):
        fs.subvolume("nope")


def test_directory_of_100000_entries(work):
    image = mkfs(work / "big-dir.img", "600M")
    with mounted(image, work / "mnt") as mnt:
        d = mnt / "d"
        d.mkdir()
        for i in range(100_000):
            fd = os.open(d / f"file-{i:06d}", os.O_CREAT | os.O_WRONLY, 0o644)
            os.close(fd)
        names = set(os.listdir(d))
    fs = BtrfsFileSystem(FileSource(image))
    listed = fs.listdir("/d")
    assert {e.name for e in listed} == names and len(names) == 100_000
    assert fs.listing_damage("/d") is None
    assert fs.stat("/d/file-099999").kind == "file"


@pytest.mark.parametrize("profile,count", [("raid1", 2), ("raid0", 2), ("raid10", 4), ("raid1c3", 3),
                                           ("raid5", 3), ("raid6", 4)])
def test_multi_device_profiles(work, profile, count):
    images = [work / f"{profile}-{i}.img" for i in range(count)]
    mkfs(images[0], "300M", "-d", profile, "-m", "raid1" if profile != "raid1c3" else "raid1c3",
         devices=images[1:])
    with mounted(images[0], work / "mnt", "compress=zstd", extra=images[1:]) as mnt:
        btrfs_trees.populate(mnt)
    with mounted(images[0], work / "mnt", "ro", extra=images[1:]) as mnt:
        want = btrfs_trees.kernel_view(mnt)
    sources = [FileSource(p) for p in images]
    fs = BtrfsFileSystem(sources[0], devices=sources[1:])
    assert differences(want, reader_view(fs)) == []
    if profile in ("raid1", "raid1c3"):   # every copy on every disk: one disk is enough
        assert differences(want, reader_view(BtrfsFileSystem(sources[0]))) == []
        return
    try:   # metadata (raid1) may lie on the other disks; data striped over them surely does
        alone = BtrfsFileSystem(sources[0])
    except FilesystemError as exc:
        assert "is missing: add its disk with --disk" in str(exc)
    else:
        with pytest.raises(FileReadError, match="device .* is missing"):
            b"".join(alone.read_chunks(alone.stat("/files/random-1m")))


def test_rescue_extract_tar_equals_gnu_tar_of_the_mount(work, tmp_path):
    image, _want, _links = _build(work, "tar", "compress=zstd", [])
    out = tmp_path / "rescue.tar"
    rescue = REPO / ".venv" / "bin" / "rescue"
    res = subprocess.run([str(rescue), "extract", str(image), "--volume", "whole", "--path", "/files",
                          "--path", "/names", "--path", "/shared", "-o", str(out)],
                         capture_output=True, text=True, timeout=300)
    # GNU tar leaves sockets out too ("socket ignored"): named on its own line, no skip, exit 0
    assert res.returncode == 0 and "skipped:" not in res.stderr and res.stderr.count("skipped socket ") == 1, \
        res.stderr
    with mounted(image, work / "mnt", "ro") as mnt:
        gnu = tmp_path / "gnu.tar"
        subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--acls", "--numeric-owner", "-cf", str(gnu),
                        "-C", str(mnt), "files", "names", "shared"], check=True, capture_output=True)

    def members(path: Path) -> dict:
        out = {}
        with tarfile.open(path) as tf:
            for m in tf.getmembers():
                xattrs = {k: v for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.user.")
                          or k.startswith("SCHILY.xattr.security.") or k.startswith("SCHILY.xattr.trusted.")}
                data = tf.extractfile(m).read() if m.isfile() else None
                out[m.name.rstrip("/")] = dict(
                    type=m.type, mode=m.mode, uid=m.uid, gid=m.gid, mtime=m.pax_headers.get("mtime", m.mtime),
                    link=m.linkname, dev=(m.devmajor, m.devminor) if m.ischr() or m.isblk() else None,
                    data=data, xattrs=xattrs)
        return out

    ours, theirs = members(out), members(gnu)
    assert set(ours) == set(theirs)
    hard = {n for n in ours if tarfile.LNKTYPE in (ours[n]["type"], theirs[n]["type"])}
    diffs = []
    for name in sorted(ours):
        for field in ("type", "mode", "uid", "gid", "link", "dev", "data", "xattrs"):
            if name in hard and field in ("type", "link", "data", "xattrs"):
                continue   # which name carries the data of a hard-linked inode is the archiver's choice
            if ours[name][field] != theirs[name][field]:
                diffs.append((name, field, str(ours[name][field])[:80], str(theirs[name][field])[:80]))
        if int(float(ours[name]["mtime"])) != int(float(theirs[name]["mtime"])):
            diffs.append((name, "mtime", ours[name]["mtime"], theirs[name]["mtime"]))
    assert diffs == []


def test_a_data_copy_failing_its_checksum_is_read_from_the_other(work):
    """DUP data: a sector damaged in one copy is read from the other (plain and
    zstd extents); damaged in both, the file is reported, as the kernel's EIO."""
    from test_fs_btrfs import Patched

    image = mkfs(work / "dup-data.img", "300M", "-d", "dup", "-m", "dup")
    plain, text = os.urandom(500_000), b"text " * 100_000
    with mounted(image, work / "mnt", "compress=zstd") as mnt:
        (mnt / "plain").write_bytes(plain)
        (mnt / "text").write_bytes(text)
    source = FileSource(image)
    fs = BtrfsFileSystem(source)
    for name, want in (("plain", plain), ("text", text)):
        ext = fs._file_extents(fs.stat(f"/{name}"))[0]
        logical = ext.where if ext.extent is None else ext.extent[0]
        (_n, copies), = fs.vol.map(logical, 4096)
        assert len(copies) == 2
        one = BtrfsFileSystem(Patched(source, {copies[0][1] + 100: b"XXXX"}))
        assert b"".join(one.read_chunks(one.stat(f"/{name}"))) == want
        both = BtrfsFileSystem(Patched(source, {copies[0][1] + 100: b"XXXX", copies[1][1] + 100: b"XXXX"}))
        with pytest.raises(FileReadError, match="data checksum mismatch .* in every copy"):
            b"".join(both.read_chunks(both.stat(f"/{name}")))


@pytest.mark.parametrize("profile,count,meta", [("raid5", 3, "raid1c3"), ("raid6", 4, "raid1c4")])
def test_raid56_with_a_device_missing_rebuilds_from_parity(work, profile, count, meta):
    """Every device but one: data on the missing one is rebuilt from the other
    stripes of its row and P (metadata on every device, so the trees open)."""
    images = [work / f"{profile}-deg-{i}.img" for i in range(count)]
    mkfs(images[0], "300M", "-d", profile, "-m", meta, devices=images[1:])
    with mounted(images[0], work / "mnt", "", extra=images[1:]) as mnt:
        btrfs_trees.populate(mnt, small=True)
    with mounted(images[0], work / "mnt", "ro", extra=images[1:]) as mnt:
        want = btrfs_trees.kernel_view(mnt)
    sources = [FileSource(p) for p in images]
    for missing in range(count):
        present = [s for i, s in enumerate(sources) if i != missing]
        fs = BtrfsFileSystem(present[0], devices=present[1:])
        assert differences(want, reader_view(fs)) == [], f"device {missing + 1} missing"
