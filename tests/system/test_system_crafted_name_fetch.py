"""A name no file name can hold is shown by `ls` escaped but whole, and that
very text fetches it: `cat` prints it, `extract --path` writes it under that
escaped form (one safe name) into a tar or a directory, reported as renamed.

The image is real: mke2fs -d builds the tree, then directory entries are
renamed in place (same length) to '../../tmp/pwned3', 'n\\0l', 's/l/dr', as
a crafted image would hold them. debugfs, which lists such a directory as
stored (the kernel's readdir refuses it with EIO), is the reference for
names, inodes and contents."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import tarfile
from pathlib import Path

import pytest

from common_support import explain, rescue
from rescue.fs.names import escape_name, unescape_name

PWNED = "../../tmp/pwned3"
# name in the image -> (name mke2fs -d creates, content)
FILES = {
    PWNED: ("xxxxxxxxxxpwned3", b"crafted: holds slashes\n"),
    "n\0l": ("nXl", b"crafted: holds a NUL\n"),
    "..\\x2f..\\x2ftmp\\x2fpwned3": ("..\\x2f..\\x2ftmp\\x2fpwned3", b"real backslashes, not escapes\n"),
    "w\\x41": ("w\\x41", b"a backslash typed as is\n"),
    "caf\udce9": ("caf\udce9", b"a byte that is not UTF-8\n"),
    "ok.txt": ("ok.txt", b"plain\n"),
}
NESTED = ("srv", "../../xy", "x-slash1", b"crafted, one level down\n")
SLASH_DIR = ("s/l/dr", "sl-dir")


def _dir_blocks(image: Path, path: str) -> list[int]:
    out = subprocess.run(["debugfs", "-R", f"blocks {path}", str(image)], capture_output=True, check=True)
    return [int(b) for b in out.stdout.split()]


def _rename(image: Path, directory: str, old: bytes, new: bytes, block_size: int = 1024) -> None:
    """Rewrite one directory entry's name in place (same length, so rec_len stays valid)."""
    assert len(old) == len(new)
    data = bytearray(image.read_bytes())
    for block in _dir_blocks(image, directory):
        pos, end = block * block_size, (block + 1) * block_size
        while pos + 8 <= end:
            ino, rec_len, name_len, _ = struct.unpack_from("<IHBB", data, pos)
            if rec_len < 8:
                break
            if ino and data[pos + 8:pos + 8 + name_len] == old:
                data[pos + 8:pos + 8 + name_len] = new
                image.write_bytes(bytes(data))
                return
            pos += rec_len
    pytest.fail(f"entry {old!r} not found in {directory}")


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    for tool in ("mke2fs", "debugfs"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} (e2fsprogs)")
    work = tmp_path_factory.mktemp("crafted-names")
    src = work / "src"
    (src / NESTED[0]).mkdir(parents=True)
    (src / SLASH_DIR[1]).mkdir()
    (src / SLASH_DIR[1] / "inside").write_bytes(b"unreachable by path\n")
    for made, content in FILES.values():
        (src / made).write_bytes(content) if "\udce9" not in made else \
            open(os.fsencode(src / made), "wb").write(content)
    (src / NESTED[0] / NESTED[2]).write_bytes(NESTED[3])
    img = work / "names.img"
    with open(img, "wb") as f:
        f.truncate(4 << 20)
    # no metadata_csum (renamed entries stay valid), no htree (one linear block per directory), no journal
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "1024", "-O", "^metadata_csum,^has_journal,^dir_index",
                    "-E", "root_owner=0:0", "-d", str(src), str(img)], check=True)
    for name, (made, _) in FILES.items():
        if name != made:
            _rename(img, "/", made.encode(), name.encode())
    _rename(img, "/" + NESTED[0], NESTED[2].encode(), NESTED[1].encode())
    _rename(img, "/", SLASH_DIR[1].encode(), SLASH_DIR[0].encode())
    return img


def _ls_json(image: Path, path: str = "/") -> dict:
    res = rescue("ls", "--json", str(image), path)
    assert res.returncode == 0, explain(res)
    return json.loads(res.stdout)


def test_ls_shows_every_name_whole_and_as_the_kernel_lists_it(image, tmp_path):
    listed = _ls_json(image)
    ours = {e["name"]: e for e in listed["entries"]}
    assert set(FILES) | {NESTED[0], SLASH_DIR[0]} <= set(ours), sorted(ours)
    text = rescue("ls", str(image), "/")
    assert text.returncode == 0, explain(text)
    lines = text.stdout.decode().splitlines()
    # each line is one name, escaped into one safe component, and turns back into the name
    shown = {unescape_name(line.rstrip("/")): line for line in lines}
    assert set(shown) == set(ours) and len(lines) == len(ours), lines
    assert shown[PWNED] == r"..\x2f..\x2ftmp\x2fpwned3" and shown["n\0l"] == r"n\x00l"
    assert shown["..\\x2f..\\x2ftmp\\x2fpwned3"] == r"..\\x2f..\\x2ftmp\\x2fpwned3"   # not the crafted one
    assert shown["caf\udce9"] == r"caf\xe9"
    # debugfs (e2fsprogs) lists the same names on the same inodes; it prints a NUL as the end of the
    # name. (The kernel's readdir refuses such a directory with EIO: no reference there.)
    theirs = _debugfs_ls(image, "/")
    assert {name.split("\0")[0]: e["inode"] for name, e in ours.items()} == theirs


def _debugfs_ls(image: Path, path: str) -> dict[str, int]:
    """name -> inode as debugfs lists the directory (`ls -p`: /ino/mode/uid/gid/name/size/)."""
    out = subprocess.run(["debugfs", "-R", f"ls -p {path}", str(image)], capture_output=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        fields = line.split(b"/")
        if len(fields) >= 7:
            name = os.fsdecode(b"/".join(fields[5:-2]))   # a name holding '/' spans several fields
            if name not in (".", ".."):
                found[name] = int(fields[1])
    return found


@pytest.mark.parametrize("name", list(FILES))
def test_cat_fetches_each_name_by_the_text_ls_shows(image, name):
    res = rescue("cat", str(image), "/" + escape_name(name))
    assert res.returncode == 0, explain(res)
    assert res.stdout == FILES[name][1]
    if "\0" not in name:   # debugfs reads the same inode (it cannot look such names up by path either)
        ino = _debugfs_ls(image, "/")[name]
        ref = subprocess.run(["debugfs", "-R", f"cat <{ino}>", str(image)], capture_output=True, check=True).stdout
        assert res.stdout == ref


def test_a_name_typed_as_is_still_works(image):
    # 'w\x41' typed raw means 'wA' as an escape; there is no 'wA', so the name as typed is read
    res = rescue("cat", str(image), "/w\\x41")
    assert res.returncode == 0 and res.stdout == FILES["w\\x41"][1], explain(res)


def test_a_crafted_name_one_level_down(image, tmp_path):
    listed = _ls_json(image, "/srv")
    assert [e["name"] for e in listed["entries"]] == [NESTED[1]] and listed["damage"] == []
    res = rescue("cat", str(image), "/srv/" + escape_name(NESTED[1]))
    assert res.returncode == 0 and res.stdout == NESTED[3], explain(res)
    out = tmp_path / "x.tar"
    res = rescue("extract", str(image), "--path", "/srv/" + escape_name(NESTED[1]), "-o", str(out))
    assert res.returncode == 0, explain(res)
    with tarfile.open(out) as tf:
        assert tf.getnames() == [r"srv/..\x2f..\x2fxy"]


def test_extract_path_into_a_tar_stores_the_escaped_name_and_says_so(image, tmp_path):
    out = tmp_path / "x.tar"
    crafted = [PWNED, "n\0l"]
    args = [a for name in crafted for a in ("--path", "/" + escape_name(name))]
    res = rescue("extract", str(image), *args, "-o", str(out))
    err = res.stderr.decode()
    assert res.returncode == 0, explain(res)
    with tarfile.open(out) as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    assert members == {escape_name(name): FILES[name][1] for name in crafted}
    renamed = [line for line in err.splitlines() if line.startswith("warning: ") and "written as" in line]
    assert len(renamed) == 2, err
    assert r"/../../tmp/pwned3 written as ..\x2f..\x2ftmp\x2fpwned3" in renamed[0], renamed
    # GNU tar restores it as one file inside the target, nothing outside
    restore = tmp_path / "restore"
    restore.mkdir()
    subprocess.run(["tar", "-xf", str(out), "-C", str(restore)], check=True)
    assert sorted(os.listdir(restore)) == sorted(escape_name(name) for name in crafted)
    assert not (tmp_path / "tmp").exists()


def test_extract_path_into_a_directory_writes_a_safe_replacement(image, tmp_path):
    out = tmp_path / "work" / "out"
    res = rescue("extract", str(image), "--path", "/" + escape_name(PWNED), "-o", str(out) + "/")
    assert res.returncode == 0, explain(res)
    assert os.listdir(out) == [r"..\x2f..\x2ftmp\x2fpwned3"]
    assert (out / r"..\x2f..\x2ftmp\x2fpwned3").read_bytes() == FILES[PWNED][1]
    assert sorted(os.listdir(tmp_path / "work")) == ["out"] and not Path("/tmp/pwned3").exists()
    assert b"written as" in res.stderr


def test_a_whole_extract_skips_the_name_and_names_the_path_that_fetches_it(image, tmp_path):
    res = rescue("extract", str(image), "-o", str(tmp_path / "all.tar"))
    err = res.stderr.decode()
    assert res.returncode == 1, explain(res)
    line = next(line for line in err.splitlines() if line.startswith(r"skipped: /..\x2f..\x2ftmp\x2fpwned3: "))
    hinted = line.split("--path ")[1].split()[0]
    again = rescue("extract", str(image), "--path", hinted, "-o", str(tmp_path / "one.tar"))
    assert again.returncode == 0, explain(again)
    with tarfile.open(tmp_path / "one.tar") as tf:
        assert tf.extractfile(escape_name(PWNED)).read() == FILES[PWNED][1]
    with tarfile.open(tmp_path / "all.tar") as tf:   # the ordinary names are all there
        assert tf.extractfile("ok.txt").read() == b"plain\n"
        assert tf.extractfile("..\\x2f..\\x2ftmp\\x2fpwned3").read() == FILES["..\\x2f..\\x2ftmp\\x2fpwned3"][1]


def test_a_directory_whose_name_holds_a_slash_is_refused_in_one_line(image):
    for command in ("ls", "cat"):
        res = rescue(command, str(image), "/" + escape_name(SLASH_DIR[0]))
        lines = res.stderr.decode().strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and "cannot be walked" in lines[0], explain(res)
