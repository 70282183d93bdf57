"""The native ext reader (rescue/fs/ext.py over ext_dir.py and ext_inode.py)
against The Sleuth Kit and the kernel: every Entry of every directory of the fixtures, of real ext
images from other projects and of images made here by mkfs -d (inline-data,
htree + metadata_csum, 1 KiB block maps through double indirect blocks, no
filetype feature) equals what TSK lists and, as root, what a read-only loop
mount shows. Crafted damaged directory entries end in a warning naming the
field, never a traceback or a hang."""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest
from common_support import FS_DIR, HOSTILE, IS_ROOT, REAL_IMAGES, explain, rescue

from rescue.errors import GuestPathError
from rescue.fs import ext_inode
from rescue.fs.base import DIR, SYMLINK
from rescue.fs.ext_dir import _HEADER, DirectoryDamaged, DirEntryHeader
from rescue.fs.ext import ExtFileSystem
from rescue.fs.tsk import TskFileSystem
from rescue.source.base import DATA, HOLE_KINDS, ZERO, FileSource, Run

FIELDS = ("kind", "mode", "uid", "gid", "size", "mtime_ns", "atime_ns", "ctime_ns", "nlink", "inode",
          "link_target", "rdev", "xattrs")
# Real ext images both readers must agree on: the normal ones and e2fsprogs' "edge" cases
# (htree, block maps, extents, EAs) whose directories are intact.
REAL = ["dissect.extfs/ext4.bin.gz", "dissect.extfs/ext4_symlink_test1.bin.gz", "dfvfs/ext2.raw.gz",
        "e2fsprogs/f_h_normal.gz", "e2fsprogs/f_collapse_extent_tree.gz",
        "e2fsprogs/f_convert_bmap_sparse.gz", "e2fsprogs/f_valid_ea_in_inode.gz", "e2fsprogs/f_orphan.gz",
        "e2fsprogs/f_shared_blocks_ok.gz", "e2fsprogs/f_uninit_ext_past_eof.gz"]


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed")


def walk_both(image: Path) -> tuple[int, list[str]]:
    """(entries compared, differences) between the native and TSK listings of
    every directory reachable from the root."""
    native, tsk = ExtFileSystem(FileSource(str(image))), TskFileSystem(FileSource(str(image)))
    diffs: list[str] = []
    stack, seen, count = ["/"], {2}, 0
    while stack:
        path = stack.pop()
        want = {(e.path, e.inode): e for e in tsk.listdir(path)}
        got = {(e.path, e.inode): e for e in native.listdir(path)}
        diffs += [f"{k}: only in TSK" for k in want.keys() - got.keys()]
        diffs += [f"{k}: only native" for k in got.keys() - want.keys()]
        for key in want.keys() & got.keys():
            count += 1
            for f in FIELDS:
                a, b = getattr(want[key], f), getattr(got[key], f)
                if f == "xattrs":
                    a, b = dict(a or {}), dict(b or {})
                if a != b:
                    diffs.append(f"{key[0]}: {f}: TSK {a!r}, native {b!r}")
            if want[key].kind == DIR and key[1] not in seen:
                seen.add(key[1])
                stack.append(key[0])
    return count, diffs


def kernel_diffs(image: Path, fs: ExtFileSystem, mnt: Path) -> tuple[int, list[str]]:
    """Names, inode numbers, types, sizes, owners, modes, links, mtimes and link
    targets of the native listing against a read-only loop mount."""
    mnt.mkdir(exist_ok=True)
    run("mount", "-o", "ro,loop", str(image), str(mnt))
    diffs, count = [], 0
    try:
        for root, dirs, files in os.walk(mnt):
            rel = "/" + os.path.relpath(root, mnt) if root != str(mnt) else "/"
            got = {os.fsencode(e.name): e for e in fs.listdir(rel)}
            want = {os.fsencode(n): os.lstat(os.path.join(root, n)) for n in dirs + files}
            if set(got) != set(want):
                diffs.append(f"{rel}: names differ: native-only {sorted(set(got) - set(want))[:5]}, "
                             f"kernel-only {sorted(set(want) - set(got))[:5]}")
                continue
            for name, st in want.items():
                e, count = got[name], count + 1
                k = (st.st_ino, st.st_mode & 0o7777, st.st_uid, st.st_gid, st.st_nlink, st.st_mtime_ns,
                     os.stat_result(st).st_mode & 0o170000 == 0o040000)
                n = (e.inode, e.mode, e.uid, e.gid, e.nlink, e.mtime_ns, e.kind == DIR)
                if k != n:
                    diffs.append(f"{rel}/{name!r}: kernel {k}, native {n}")
                if e.kind == SYMLINK and os.readlink(os.path.join(root, os.fsdecode(name))) != e.link_target:
                    diffs.append(f"{rel}/{name!r}: link target {e.link_target!r}")
                if e.kind == "file" and e.size != st.st_size:
                    diffs.append(f"{rel}/{name!r}: size {e.size} != {st.st_size}")
    finally:
        run("umount", str(mnt))
    return count, diffs


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ext-dir")


def _gunzip(src: Path, dst: Path) -> Path:
    if not dst.exists():
        with gzip.open(src, "rb") as fi, open(dst, "wb") as fo:
            while chunk := fi.read(1 << 20):
                if chunk.count(0) == len(chunk):
                    fo.seek(len(chunk), os.SEEK_CUR)
                else:
                    fo.write(chunk)
            fo.truncate()
    return dst


@pytest.mark.parametrize("image", ["ext2.img", "ext3.img", "hostile/sizes.img", "hostile/truncated.img"])
def test_native_listing_equals_tsk_on_the_fixtures(image):
    path = HOSTILE / image.split("/")[1] if image.startswith("hostile/") else FS_DIR / image
    count, diffs = walk_both(path)
    assert count > 0 and not diffs, "\n".join(diffs[:20])


@pytest.mark.parametrize("name", REAL)
def test_native_listing_equals_tsk_on_real_ext_images(name, work):
    src = REAL_IMAGES / name
    if not src.exists():
        pytest.skip(f"{src} is absent")
    image = _gunzip(src, work / name.replace("/", "__")[:-3])
    count, diffs = walk_both(image)
    assert count > 0 and not diffs, "\n".join(diffs[:20])


def _tree(top: Path, big_dir_names: int, name_len: int) -> None:
    (top / "small").mkdir(parents=True)            # inline data when the feature is on
    (top / "small" / "a").write_text("a")
    (top / "small" / "b").mkdir()
    (top / "big").mkdir()
    for i in range(big_dir_names):
        (top / "big" / f"{i:06d}".ljust(name_len, "x")).write_bytes(b"")
    (top / "links").mkdir()
    (top / "links" / "fast").symlink_to("target")
    (top / "links" / "slow").symlink_to("t" * 300)
    os.link(top / "small" / "a", top / "links" / "hard")
    os.mkfifo(top / "links" / "fifo")
    (top / os.fsdecode(b"latin1-\xe9")).write_bytes(b"x")
    with open(top / "sparse", "wb") as f:   # runs at 0, 100 KiB and 9 MiB: direct, indirect, double indirect
        for off in (0, 100 << 10, 9 << 20):
            f.seek(off)
            f.write(b"d" * 3000)
    (top / "mid").write_bytes(os.urandom(10_000))
    (top / "large").write_bytes(os.urandom(300_000))
    os.chown(top / "small" / "a", 1234, 5678)


MADE = {
    # name: (mkfs arguments, names in /big, name length)
    "ext4_inline_htree_csum": (["mkfs.ext4", "-q", "-b", "4096", "-I", "256",
                                "-O", "inline_data,metadata_csum,64bit,dir_index"], 1500, 12),
    "ext2_1k_blockmap_nofiletype": (["mkfs.ext2", "-q", "-b", "1024", "-O", "^filetype,^dir_index"], 2500, 120),
    "ext3_htree_1k": (["mkfs.ext3", "-q", "-b", "1024", "-O", "dir_index"], 1500, 20),
}


@pytest.fixture(scope="module")
def made(work) -> dict[str, Path]:
    need("mkfs.ext4")
    out = {}
    for name, (mkfs, count, name_len) in MADE.items():
        tree = work / f"tree-{name}"
        _tree(tree, count, name_len)
        image = work / f"{name}.img"
        run("truncate", "-s", "64M", str(image))
        run(*mkfs, "-d", str(tree), str(image))
        out[name] = image
    return out


@pytest.mark.parametrize("name", list(MADE))
def test_made_images_list_as_tsk_and_the_kernel_show_them(name, made, work):
    image = made[name]
    count, diffs = walk_both(image)
    assert count > MADE[name][1] and not diffs, "\n".join(diffs[:20])
    fs = ExtFileSystem(FileSource(str(image)))
    assert {e.name for e in fs.listdir("/small")} == {"a", "b"}
    if not IS_ROOT:
        pytest.skip("loop mounts need root (compared with TSK only)")
    count, diffs = kernel_diffs(image, fs, work / f"mnt-{name}")
    assert count > MADE[name][1] and not diffs, "\n".join(diffs[:20])


def _holes_as_zero(runs):
    """Runs with UNWRITTEN shown as ZERO and neighbouring holes joined (TSK
    calls an unwritten extent a sparse run)."""
    out = []
    for r in runs:
        kind = ZERO if r.kind in HOLE_KINDS else r.kind
        if out and kind == ZERO and out[-1].kind == ZERO:
            out[-1] = Run(out[-1].offset, out[-1].length + r.length, ZERO)
        else:
            out.append(Run(r.offset, r.length, kind, r.where))
    return out


@pytest.mark.parametrize("name", list(MADE))
def test_file_runs_equal_tsk_data_runs(name, made):
    """ExtFileSystem.file_runs (ExtInodeReader's extents and block maps: direct,
    indirect, double indirect) maps every regular file's blocks as TSK does,
    and both read the same bytes."""
    native, tsk = ExtFileSystem(FileSource(str(made[name]))), TskFileSystem(FileSource(str(made[name])))
    checked = 0
    for entry in native.walk("/"):
        if entry.kind != "file" or entry.size == 0:
            continue
        got, want = native.file_runs(entry), tsk.file_runs(entry)
        assert b"".join(native.read_chunks(entry)) == b"".join(tsk.read_chunks(entry)), entry.path
        if any(r.where is None and r.kind == DATA for r in want):   # inline data: no blocks
            assert native._ext.block_runs(entry.inode) == [] and got == [Run(0, entry.size, DATA)]
            continue
        assert _holes_as_zero(got) == _holes_as_zero(want), entry.path
        assert native.data_ranges(entry) == tsk.data_ranges(entry), entry.path
        checked += 1
    assert checked >= 3


def test_struct_fast_paths_equal_their_declarations():
    raw = DirEntryHeader.build({"inode": 70000, "rec_len": 4084, "name_len": 255, "file_type": 7})
    assert _HEADER.unpack(raw) == (70000, 4084, 255, 7)
    raw = ext_inode.ExtentHeader.build({"eh_magic": 0xF30A, "eh_entries": 3, "eh_max": 4, "eh_depth": 1,
                                        "eh_generation": 9})
    assert ext_inode._EXTENT_HEADER.unpack(raw) == (0xF30A, 3, 4, 1, 9)
    raw = ext_inode.ExtentLeaf.build({"ee_block": 7, "ee_len": 32769, "ee_start_hi": 2, "ee_start_lo": 99})
    assert ext_inode._EXTENT_LEAF.unpack(raw) == (7, 32769, 2, 99)
    raw = ext_inode.ExtentIndex.build({"ei_block": 7, "ei_leaf_lo": 123456, "ei_leaf_hi": 3})
    assert ext_inode._EXTENT_INDEX.unpack(raw) == (7, 123456, 3)


# -- damaged directories ---------------------------------------------------------

def _crafted(work: Path, name: str) -> tuple[Path, int, int]:
    """A small ext2 (1 KiB blocks) with /d holding f0..f9; returns (image, byte
    offset of /d's first block, inode of /d)."""
    tree = work / f"tree-{name}"
    (tree / "d").mkdir(parents=True)
    for i in range(10):
        (tree / "d" / f"f{i}").write_text(str(i))
    (tree / "keep.txt").write_text("rescued\n")
    image = work / f"{name}.img"
    run("truncate", "-s", "4M", str(image))
    run("mkfs.ext2", "-q", "-b", "1024", "-d", str(tree), str(image))
    fs = ExtFileSystem(FileSource(str(image)))
    ino = fs.stat("/d").inode
    (_, pblk, _), = fs._ext.block_runs(ino)
    return image, pblk * 1024, ino


def _patch(image: Path, offset: int, fmt: str, *values: int) -> None:
    with open(image, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


# entry 2 (after "." and "..", 12 bytes each) is "f0": patch its header fields
DAMAGE = {
    "rec_len=0": ("<H", 24 + 4, 0),
    "name_len=200 runs past rec_len": ("<B", 24 + 6, 200),
    "inode=9999999 is out of range": ("<I", 24, 9999999),
    "rec_len=1026 runs past the end of the block": ("<H", 24 + 4, 1026),
}


@pytest.mark.parametrize("problem", list(DAMAGE))
def test_damaged_entries_are_reported_by_field_and_the_rest_is_rescued(problem, work, tmp_path):
    need("mkfs.ext2")
    image, block, ino = _crafted(work, "dmg-" + problem.split()[0].replace("=", ""))
    fmt, where, value = DAMAGE[problem]
    _patch(image, block + where, fmt, value)
    fs = ExtFileSystem(FileSource(str(image)))
    with pytest.raises(DirectoryDamaged, match=problem.split()[0]):
        fs._dirs.entries(ino)
    problems: list[str] = []
    assert fs._dirs.entries(ino, problems) == [] and problem.split()[0] in problems[0]
    t0 = time.monotonic()
    out = tmp_path / "x.tar"
    res = rescue("extract", str(image), "--path", "/", "-o", str(out), timeout=60)
    assert time.monotonic() - t0 < 30
    err = res.stderr.decode(errors="replace")
    # exit 1 "partial": the directory is kept, but entries after the damage may be lost
    assert res.returncode == 1 and "Traceback" not in err, explain(res)
    # the warning names the field and value, on a line of its own marked as a warning
    assert any(line.startswith("warning: ") and problem.split()[0] in line for line in err.splitlines()), err
    assert "skipped: /d: directory only partly readable" in err, err
    dry = rescue("extract", str(image), "--path", "/", "--dry-run", timeout=60)
    assert dry.returncode == 1 and b"directory only partly readable" in dry.stderr + dry.stdout, explain(dry)
    assert "keep.txt" in subprocess.run(["tar", "tf", str(out)], capture_output=True, text=True,
                                         check=True).stdout


def test_a_directory_linked_into_its_own_subtree_is_reported_not_followed(work, tmp_path):
    need("mkfs.ext2")
    image, block, _ = _crafted(work, "loop")
    _patch(image, block + 24, "<I", 2)    # /d/f0 -> the root directory
    _patch(image, block + 24 + 7, "<B", 2)   # file_type: directory
    res = rescue("extract", str(image), "--path", "/", "-o", str(tmp_path / "x.tar"), timeout=60)
    err = res.stderr.decode(errors="replace")
    assert res.returncode == 1 and "Traceback" not in err, explain(res)
    assert "directory loop" in err, err


def _real(name: str, work: Path) -> Path:
    src = REAL_IMAGES / name
    if not src.exists():
        pytest.skip(f"{src} is absent")
    return _gunzip(src, work / name.replace("/", "__")[:-3])


def test_a_block_neither_reader_can_walk_keeps_the_names_before_the_damage(work, caplog):
    """e2fsprogs f_dup3: block 12 of /lost+found starts with rec_len=0. TSK cannot
    list the directory at all; the kernel shows the other blocks, and so do we."""
    image = _real("e2fsprogs/f_dup3.gz", work)
    with pytest.raises((OSError, GuestPathError)):
        TskFileSystem(FileSource(str(image))).listdir("/lost+found")
    fs = ExtFileSystem(FileSource(str(image)))
    with caplog.at_level("WARNING"):
        fs.listdir("/lost+found")
        fs.listdir("/lost+found")
    warned = [r.getMessage() for r in caplog.records if "rec_len=0" in r.getMessage()]
    assert len(warned) == 1 and "block 12" in warned[0], warned   # once, naming block and field
    assert {e.name for e in fs.listdir("/")} >= {"lost+found"}


def test_a_root_inode_that_is_not_a_directory_is_reported(work, tmp_path):
    image = _real("e2fsprogs/f_badroot.gz", work)
    res = rescue("extract", str(image), "--path", "/", "-o", str(tmp_path / "x.tar"))
    err = res.stderr.decode(errors="replace")
    assert res.returncode == 1 and "root inode 2 has i_mode=" in err, explain(res)
