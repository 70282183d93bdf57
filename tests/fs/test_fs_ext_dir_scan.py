"""The ext reader's own scan of a damaged directory block (ext_dir.scan_block)
against The Sleuth Kit's (ext2fs_dent_parse_block), the reference: on
directory blocks damaged at random in images made by mkfs (with entries deleted
by debugfs, so slack holds deleted names; 1 KiB and 4 KiB blocks; with and
without the filetype feature) the names and inodes we list equal what
TskFileSystem lists, and on the fuzz inputs that took TSK a minute they equal
fls's names, at a fraction of the time. Lookups through a damaged directory use
the recovered names, never TSK."""

from __future__ import annotations

import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from repo_paths import REPO

from rescue.fs.ext import ExtFileSystem
from rescue.fs.tsk import TskFileSystem
from rescue.source.base import BytesSource, FileSource

# name -> mkfs command (the image is 8 MiB; ext4-1k-csum: extents and metadata_csum tail entries)
LAYOUTS = {
    "ext2-1k": ["mkfs.ext2", "-q", "-b", "1024"],
    "ext4-4k": ["mkfs.ext4", "-q", "-b", "4096", "-O", "^has_journal,^dir_index"],
    "ext2-nofiletype": ["mkfs.ext2", "-q", "-b", "1024", "-O", "^filetype"],
    "ext4-1k-csum": ["mkfs.ext4", "-q", "-b", "1024", "-O", "^has_journal"],
}
DAMAGES_PER_LAYOUT = 150
FLS_LINE = re.compile(rb"^(\S+) (\* )?(\d+)(\(realloc\))?:\t(.*)$")


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, tuple[bytes, int, list[tuple[int, int]]]]:
    """layout -> (image bytes, inode of /d, (byte offset, length) of each of /d's blocks).
    /d holds names of 1..60 bytes; every fifth is then deleted with debugfs, so
    the blocks' slack holds deleted entries (TSK's "dellen")."""
    need("mkfs.ext2")
    need("debugfs")
    work = tmp_path_factory.mktemp("ext-scan")
    out = {}
    for layout, mkfs in LAYOUTS.items():
        tree = work / f"tree-{layout}"
        (tree / "d" / "sub").mkdir(parents=True)
        rng = random.Random(layout)
        names = []
        for i in range(70):
            name = f"{i:02d}-" + "".join(rng.choice("abcdefghij") for _ in range(rng.randint(0, 57)))
            (tree / "d" / name).write_text(name)
            names.append(name)
        (tree / "d" / "sub" / "inside.txt").write_text("x")
        image = work / f"{layout}.img"
        subprocess.run(["truncate", "-s", "8M", str(image)], check=True)
        subprocess.run([*mkfs, "-d", str(tree), str(image)], check=True, capture_output=True)
        script = "".join(f"unlink /d/{name}\n" for name in names[::5])
        subprocess.run(["debugfs", "-w", "-f", "-", str(image)], input=script.encode(), check=True,
                       capture_output=True)
        data = image.read_bytes()
        fs = ExtFileSystem(BytesSource(data))
        ino = fs.stat("/d").inode
        bs = fs.block_size
        blocks = [((pblk + i) * bs, bs) for _, pblk, count in fs._ext.block_runs(ino) for i in range(count)]
        assert len(blocks) >= 2 or bs == 4096, blocks
        out[layout] = (data, ino, blocks)
    return out


def damage(rng: random.Random, block: bytearray) -> None:
    """One to six edits of the kinds the fuzzer makes, inside one block."""
    size = len(block)
    for _ in range(rng.randint(1, 6)):
        at = rng.randrange(len(block) - 4)
        op = rng.randrange(5)
        if op == 0:
            block[at] ^= 1 << rng.randrange(8)
        elif op == 1:
            block[at] = rng.choice([0, 1, 0x7F, 0x80, 0xFF])
        elif op == 2:
            block[at:at + 4] = rng.choice([0, 1, 12, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]).to_bytes(4, "little")
        elif op == 3:
            n = rng.randint(1, 64)
            block[at:at + n] = bytes(len(block[at:at + n]))
        else:
            other = rng.randrange(len(block) - 16)
            n = min(16, len(block) - at)
            block[at:at + n] = block[other:other + n]
    assert len(block) == size


def listings(data: bytes, ino: int) -> tuple[set, set, ExtFileSystem]:
    """({(path, inode, kind)} ours, the same from TSK, our filesystem)."""
    ours = ExtFileSystem(BytesSource(data, name="damaged.img"))
    got = {(e.path, e.inode, e.kind) for e in ours.listdir("/d")}
    tsk = TskFileSystem(BytesSource(data, name="damaged.img"))
    try:
        want = {(e.path, e.inode, e.kind) for e in tsk.listdir_inode("/d", ino)}
    finally:
        tsk.close()
    return got, want, ours


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_recovered_names_equal_tsk_on_randomly_damaged_blocks(layout, images):
    data, ino, blocks = images[layout]
    clean, want, _ = listings(data, ino)
    assert clean == want and len(clean) == 57, sorted(clean ^ want)   # 70 names, 14 deleted, "sub"
    rng = random.Random(f"ext-scan-{layout}")
    damaged = recovered_after = 0
    for _ in range(DAMAGES_PER_LAYOUT):
        offset, length = rng.choice(blocks)
        image = bytearray(data)
        block = bytearray(image[offset:offset + length])
        damage(rng, block)
        image[offset:offset + length] = block
        got, want, fs = listings(bytes(image), ino)
        problem = fs.listing_damage("/d")
        if problem is None:
            continue   # still valid as the kernel reads it: ours is the kernel's strict parse
        damaged += 1
        assert got == want, f"{problem}: only ours {sorted(got - want)}, only TSK's {sorted(want - got)}"
        kernel: list[str] = []   # what the kernel's readdir shows: nothing after each damaged entry
        recovered_after += len(got) > len(fs._dirs.entries(ino, kernel))
    assert damaged >= DAMAGES_PER_LAYOUT // 3, damaged   # most edits really damage the block
    assert recovered_after, "no damaged block had names recovered after the damage"


def test_lookups_through_a_damaged_directory_use_the_recovered_names(images):
    data, ino, blocks = images["ext2-1k"]
    image = bytearray(data)
    # the block holding "sub": its first entry gets rec_len=0 (the kernel would see nothing after it)
    offset = next(o for o, n in blocks if data.find(b"sub", o + 8, o + n) > 0)
    image[offset + 4:offset + 6] = (0).to_bytes(2, "little")
    fs = ExtFileSystem(BytesSource(bytes(image), name="damaged.img"))
    assert "sub" not in {e.name.decode() for e in fs._dirs.entries(ino, [])}   # the kernel's view
    entry = fs.stat("/d/sub/inside.txt")
    assert entry.kind == "file" and entry.size == 1
    assert fs._tsk is None and fs._tsk_problem is None   # TSK never opened
    names = {e.path for e in fs.listdir("/d")}
    assert "/d/sub" in names and fs.listing_damage("/d") and "rec_len=0" in fs.listing_damage("/d")
    assert fs._tsk is None


# -- the fuzz inputs that took TSK's listing 59 s and 88 s ----------------------

def _fuzz_image(name: str, tmp_path: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests" / "fuzz"))
    import targets
    setup = targets.fs_base("ext")
    if setup is None:
        pytest.skip("no ext base image for the fuzz target")
    _, base, hot = setup
    data = (REPO / "tests" / "fuzz" / "regressions" / "ext" / name).read_bytes()
    source = targets.PatchedSource(base, targets.patches_from(data, hot), name=name)
    path = tmp_path / f"{name}.img"
    path.write_bytes(source.read(0, source.size))
    return path


def _fls(image: Path, ino: int, inodes_count: int) -> set[tuple[bytes, int]] | None:
    """The allocated names TSK's scan finds in directory `ino` (fls -u), as
    (name with control characters printed as '^', inode); None when fls takes
    more than 10 s (TSK reads a directory's whole i_size: 1.8 GB of holes)."""
    try:
        out = subprocess.run(["fls", "-f", "ext", "-u", str(image), str(ino)], capture_output=True, check=True,
                             timeout=10).stdout
    except subprocess.TimeoutExpired:
        return None
    found = set()
    for line in out.splitlines():
        m = FLS_LINE.match(line)
        assert m, line
        if m.group(1) != b"V/V" and int(m.group(3)) <= inodes_count:   # not TSK's $OrphanFiles
            found.add((m.group(5), int(m.group(3))))
    return found


def _printed(name: bytes) -> bytes:
    return bytes(0x5E if b < 0x20 else b for b in name)   # tsk_print_sanitized


@pytest.mark.parametrize("name", ["out-of-range-inode-then-absurd-i_size-tsk-59s",
                                  "lost+found-i_size-1.8GB-tsk-88s"])
def test_the_fuzz_inputs_list_fast_and_as_fls_lists_them(name, tmp_path):
    need("fls")
    image = _fuzz_image(name, tmp_path)
    fs = ExtFileSystem(FileSource(str(image)))
    t0 = time.monotonic()
    todo, seen, listings = [("/", 2)], {2}, {}
    while todo:
        path, ino = todo.pop()
        listings[path, ino] = listed = fs.listdir(path)
        for e in listed:
            fs.stat(e.path)
            if e.kind == "dir" and e.inode not in seen:
                seen.add(e.inode)
                todo.append((e.path, e.inode))
    took = time.monotonic() - t0
    assert took < 2, took
    assert fs._tsk is None   # TSK was not needed
    compared = 0
    for (path, ino), listed in listings.items():
        want = _fls(image, ino, fs._ext.inodes_count)
        if want is None:
            continue
        got = {(_printed(e.path.rsplit("/", 1)[1].encode("utf-8", "surrogateescape")), e.inode) for e in listed}
        assert got == want, (path, sorted(got ^ want))
        compared += 1
    assert compared >= len(listings) - 1 and compared >= 3, compared


def test_a_directory_block_mapped_outside_the_filesystem_is_skipped_not_handed_to_tsk(images):
    """As the kernel's readdir skips a block it cannot map: the other blocks' names are listed."""
    data, ino, blocks = images["ext2-1k"]
    clean = ExtFileSystem(BytesSource(data))
    whole = {e.name for e in clean.listdir("/d")}
    in_second: list = []
    offset, length = blocks[1]
    clean._dirs._parse(data[offset:offset + length], "block 1", 0, in_second, None)
    image = bytearray(data)
    at = clean._ext.inode_offset(ino) + 0x28 + 4   # i_block[1]: the second block's pointer
    image[at:at + 4] = (0xFFFFFF0).to_bytes(4, "little")
    fs = ExtFileSystem(BytesSource(bytes(image), name="damaged.img"))
    names = {e.name for e in fs.listdir("/d")}
    assert in_second and names == whole - {e.name.decode() for e in in_second}
    assert "outside the filesystem" in fs.listing_damage("/d")
    assert fs._tsk is None
