"""ExtInodeReader against the kernel: xattrs, POSIX ACLs, device numbers and
ns/post-2038 times of ext2/ext4 images made by mkfs.ext4 -d, then touched by the
kernel through a loop mount (root), compared with a read-only loop mount. Without
root: compared with the tree mkfs.ext4 -d was given (what -d preserves)."""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from repo_paths import REAL_IMAGES
from rescue.fs.base import FileReadError
from rescue.fs.ext_inode import ExtInodeReader, ext4_acl_to_xattr
from rescue.source.base import BytesSource, FileSource

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False
REAL = REAL_IMAGES


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed")


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def xattrs_of(path: Path) -> dict[str, bytes]:
    return {n: os.getxattr(path, n, follow_symlinks=False)
            for n in os.listxattr(path, follow_symlinks=False)}


def make_tree(top: Path) -> None:
    """Files with the metadata the reader is for; root-only parts when root."""
    top.mkdir()
    (top / "plain").write_text("plain\n")
    a = top / "attrs"
    a.write_text("xattrs here\n")
    os.setxattr(a, "user.comment", b"hello")
    os.setxattr(a, "user.empty", b"")
    (top / "many").write_text("many\n")
    for i in range(24):
        os.setxattr(top / "many", f"user.k{i:02d}", f"value-{i}".encode())
    d = top / "acldir"
    d.mkdir()
    if shutil.which("setfacl"):
        run("setfacl", "-m", "u:1234:rw,g:99:r", str(a))
        run("setfacl", "-m", "u:4321:rwx", "-d", "-m", "u:55:rx,g:66:r", str(d))
    if ROOT:
        os.setxattr(a, "trusted.t", b"\x00\x01binary\xff")
        os.setxattr(a, "security.s", b"sec")
        os.mknod(top / "blk_new", 0o660 | 0o060000, os.makedev(259, 1048575))
        os.mknod(top / "chr_old", 0o600 | 0o020000, os.makedev(4, 5))
        os.mknod(top / "chr_null", 0o666 | 0o020000, os.makedev(1, 3))
        os.mknod(top / "blk_mid", 0o660 | 0o060000, os.makedev(8, 300))
    os.mkfifo(top / "fifo")


# Changes only the kernel can make faithfully (mkfs -d drops ns and truncates times to 32 bits).
BIG = b"B" * 700           # spills out of the inode into the EA block (1 KiB blocks too)
HUGE = b"H" * 6000         # larger than a 4 KiB block: an EA inode (ea_inode feature)
TIMES = {
    "plain": 1_700_000_000_123_456_789,        # ns precision
    "attrs": 4_102_444_800_987_654_321,        # 2100-01-01, past 2038
    "many": 2_500_000_000_000_000_001,         # 2049, between 2038 and 2106
    "acldir": -315_619_199_500_000_000,        # before 1970
}


def kernel_touch(image: Path, mnt: Path, ea_inode: bool) -> None:
    run("mount", "-o", "loop", str(image), str(mnt))
    try:
        for name, ns in TIMES.items():
            os.utime(mnt / name, ns=(ns - 7, ns), follow_symlinks=False)
        os.setxattr(mnt / "attrs", "user.big", BIG)
        if ea_inode:
            os.setxattr(mnt / "many", "user.huge", HUGE)
    finally:
        run("umount", str(mnt))


IMAGES = {
    # name: mkfs arguments
    "ext4": ["mkfs.ext4", "-q", "-b", "4096", "-I", "256", "-O", "ea_inode"],
    "ext4_64bit_metabg": ["mkfs.ext4", "-q", "-b", "1024", "-I", "512", "-O", "64bit,meta_bg,^resize_inode"],
    "ext4_inline_data": ["mkfs.ext4", "-q", "-b", "4096", "-I", "256", "-O", "inline_data"],
    "ext2": ["mkfs.ext2", "-q", "-b", "1024", "-I", "128"],
    "ext2_256": ["mkfs.ext2", "-q", "-b", "2048", "-I", "256"],
}


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    need("mkfs.ext4")
    base = tmp_path_factory.mktemp("extinode")
    tree = base / "tree"
    try:
        make_tree(tree)
    except OSError as exc:
        pytest.skip(f"cannot set xattrs in {base}: {exc}")
    out = {}
    for name, mkfs in IMAGES.items():
        image = base / f"{name}.img"
        with open(image, "wb") as f:
            f.truncate(16 << 20)
        run(*mkfs, "-d", str(tree), str(image))
        mounted = None
        if ROOT:
            mnt = base / f"{name}.mnt"
            mnt.mkdir()
            try:
                kernel_touch(image, mnt, ea_inode="ea_inode" in " ".join(mkfs))
                run("mount", "-o", "ro,loop", str(image), str(mnt))
                mounted = mnt
            except subprocess.CalledProcessError:
                mounted = None   # no loop devices here: fall back to the tree
        out[name] = (image, mounted)
    yield tree, out
    for image, mnt in out.values():
        if mnt is not None:
            subprocess.run(["umount", str(mnt)], capture_output=True)


def inode_numbers(image: Path) -> dict[str, int]:
    """name -> inode number, from debugfs (e2fsprogs), not from our reader."""
    res = subprocess.run(["debugfs", "-R", "ls -l /", str(image)], capture_output=True, text=True)
    found = {}
    for line in res.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            found[parts[-1]] = int(parts[0])
    return found


@pytest.mark.parametrize("name", list(IMAGES))
def test_inode_metadata_matches_the_kernel_view(built, name):
    tree, images = built
    image, mnt = images[name]
    reader = ExtInodeReader(FileSource(image))
    numbers = inode_numbers(image)
    ref_dir = mnt if mnt is not None else tree
    checked = 0
    for entry in sorted(os.listdir(ref_dir)):
        if entry == "lost+found":
            continue
        ino = numbers[entry]
        path = ref_dir / entry
        st = os.lstat(path)
        if mnt is not None:
            assert st.st_ino == ino
        # xattrs, incl. ACLs in the kernel's xattr format
        assert reader.xattrs(ino) == xattrs_of(path), entry
        # device numbers
        if os.path.stat.S_ISCHR(st.st_mode) or os.path.stat.S_ISBLK(st.st_mode):
            assert reader.rdev(ino) == (os.major(st.st_rdev), os.minor(st.st_rdev)), entry
        else:
            assert reader.rdev(ino) is None
        t = reader.times(ino)
        if mnt is not None:
            assert (t.mtime_ns, t.atime_ns, t.ctime_ns) == (st.st_mtime_ns, st.st_atime_ns,
                                                           st.st_ctime_ns), entry
        else:   # mkfs -d keeps whole seconds, 32-bit
            assert t.mtime_ns // 10**9 == ((st.st_mtime_ns // 10**9 + 2**31) % 2**32) - 2**31
        assert (t.crtime_ns is None) == (reader.inode_size <= 128)
        checked += 1
    assert checked >= 5
    if mnt is not None and reader.inode_size > 128:
        # the kernel really wrote what this test is about
        assert reader.times(numbers["attrs"]).mtime_ns == TIMES["attrs"]
        assert reader.xattrs(numbers["attrs"])["user.big"] == BIG


def test_post_2038_and_ns_times_need_big_inodes(built):
    _, images = built
    image, mnt = images["ext2"]
    if mnt is None:
        pytest.skip("needs root and a loop mount to set times through the kernel")
    reader = ExtInodeReader(FileSource(image))
    t = reader.times(inode_numbers(image)["plain"])
    assert t.mtime_ns == TIMES["plain"] // 10**9 * 10**9   # 128-byte inode: seconds only
    assert t.crtime_ns is None


def test_crtime_agrees_with_debugfs(built):
    _, images = built
    image, _ = images["ext4"]
    reader = ExtInodeReader(FileSource(image))
    for name, ino in inode_numbers(image).items():
        res = subprocess.run(["debugfs", "-R", f"stat <{ino}>", str(image)],
                             capture_output=True, text=True)
        line = next(x for x in res.stdout.splitlines() if x.strip().startswith("crtime:"))
        sec, extra = (int(v, 16) for v in line.split()[1].split(":"))
        sec = sec - 2**32 if sec >= 2**31 else sec
        expected = (sec + ((extra & 3) << 32)) * 10**9 + (extra >> 2)
        assert reader.times(ino).crtime_ns == expected, name


def test_ea_inode_value_is_read_from_its_extents(built):
    _, images = built
    image, mnt = images["ext4"]
    if mnt is None:
        pytest.skip("needs root and a loop mount: the kernel writes the EA inode")
    ino = inode_numbers(image)["many"]
    reader = ExtInodeReader(FileSource(image))
    raw = reader.raw_inode(ino)
    assert raw  # the value really lives in an EA inode: debugfs says so
    res = subprocess.run(["debugfs", "-R", f"ea_list <{ino}>", str(image)], capture_output=True, text=True)
    assert "user.huge" in res.stdout
    got = reader.xattrs(ino)
    assert got == xattrs_of(mnt / "many")
    assert got["user.huge"] == HUGE


def test_acl_conversion_matches_getfacl_format():
    # ext4 on-disk: version 1, short entries for USER_OBJ/GROUP_OBJ/MASK/OTHER
    disk = bytes.fromhex("01000000" "01000600" "02000600d2040000" "04000400" "10000600" "20000400")
    assert ext4_acl_to_xattr(disk) == bytes.fromhex(
        "02000000" "01000600ffffffff" "02000600d2040000" "04000400ffffffff"
        "10000600ffffffff" "20000400ffffffff")
    with pytest.raises(ValueError):
        ext4_acl_to_xattr(bytes.fromhex("01000000" "0200"))
    with pytest.raises(ValueError):
        ext4_acl_to_xattr(bytes.fromhex("07000000"))


def test_damaged_ea_block_is_a_file_read_error(built):
    _, images = built
    image, _ = images["ext4"]
    data = bytearray(image.read_bytes())
    reader = ExtInodeReader(BytesSource(bytes(data)))
    ino = inode_numbers(image)["attrs"]
    raw = reader.raw_inode(ino)
    acl_block = int.from_bytes(raw[0x68:0x6C], "little")
    if acl_block == 0:
        pytest.skip("no EA block was written (no root to add a large xattr)")
    at = acl_block * reader.block_size
    for damage in (
        lambda d: d.__setitem__(slice(at, at + 4), b"\0\0\0\0"),                # bad magic
        lambda d: d.__setitem__(slice(at + 32 + 2, at + 32 + 4), b"\xff\xff"),  # value offset
            lambda d: d.__setitem__(slice(at + 32 + 8, at + 32 + 12), b"\xff" * 4),  # value size
        lambda d: d.__setitem__(slice(at + 32, at + reader.block_size), b"\x01" * (reader.block_size - 32)),
    ):
        broken = bytearray(data)
        damage(broken)
        with pytest.raises(FileReadError):
            ExtInodeReader(BytesSource(bytes(broken))).xattrs(ino)
    # an i_file_acl past the end of the filesystem
    broken = bytearray(data)
    itable_off = reader.inode_offset(ino)
    broken[itable_off + 0x68:itable_off + 0x6C] = (10**9).to_bytes(4, "little")
    with pytest.raises(FileReadError):
        ExtInodeReader(BytesSource(bytes(broken))).xattrs(ino)


def test_e2fsprogs_ea_inode_image_agrees_with_debugfs(tmp_path):
    """e2fsprogs' f_valid_ea_in_inode: values in (block-mapped) EA inodes."""
    src = REAL / "e2fsprogs" / "f_valid_ea_in_inode.gz"
    if not src.exists():
        pytest.skip("../shared/real-images is not here")
    need("debugfs")
    image = tmp_path / "ea.img"
    image.write_bytes(gzip.decompress(src.read_bytes()))
    got = ExtInodeReader(FileSource(image)).xattrs(22)
    assert len(got) == 6
    for name, value in got.items():
        out = tmp_path / "value"
        run("debugfs", "-R", f"ea_get -f {out} <22> {name}", str(image))
        assert out.read_bytes() == value, name


def _real_ext_images() -> list[Path]:
    out = []
    for sub in ("e2fsprogs", "dissect.extfs"):
        d = REAL / sub
        if d.is_dir():
            out += sorted(d.glob("*.gz"))
    return out


@pytest.mark.parametrize("path", _real_ext_images() or [None], ids=lambda p: p.name if p else "none")
def test_real_images_never_crash(path, tmp_path):
    """Every in-use inode of e2fsprogs' (mostly broken) test images: only
    FilesystemError (at open) or FileReadError (per inode), bounded time."""
    if path is None:
        pytest.skip("../shared/real-images is not here")
    from rescue.errors import FilesystemError

    data = gzip.decompress(path.read_bytes())
    try:
        reader = ExtInodeReader(BytesSource(data, name=path.name))
    except FilesystemError:
        return
    start = time.monotonic()
    limit = min(reader.inodes_count, 4096)   # a sample for the big ones
    for ino in range(1, limit + 1):
        try:
            if not reader.in_use(ino) and ino > 11:
                continue
            reader.xattrs(ino)
            reader.rdev(ino)
            reader.times(ino)
        except FileReadError:
            pass
    assert time.monotonic() - start < 20
