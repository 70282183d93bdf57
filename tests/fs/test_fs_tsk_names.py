"""The Sleuth Kit backend and names that are not UTF-8: ls shows them
surrogate-escaped, and stat, listdir and read must take that form back
(pytsk3 accepts only UTF-8 str paths)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from rescue.errors import GuestPathError
from rescue.fs.tsk import TskFileSystem
from rescue.source import open_source

pytestmark = pytest.mark.skipif(not shutil.which("mkfs.ext4"), reason="needs mkfs.ext4")

LATIN1_DIR = b"r\xe9sum\xe9s"        # ISO-8859-1 bytes: not valid UTF-8
LATIN1_FILE = b"caf\xe9.txt"


@pytest.fixture(scope="module")
def latin1_ext(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    tree = os.fsencode(root / "tree")
    os.makedirs(os.path.join(tree, LATIN1_DIR))
    with open(os.path.join(tree, LATIN1_DIR, LATIN1_FILE), "wb") as f:
        f.write(b"latin-1 names survive\n")
    image = root / "latin1.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", os.fsdecode(tree), str(image), "8M"], check=True)
    return image


def test_non_utf8_names_round_trip_through_tsk(latin1_ext):
    fs = TskFileSystem(open_source(str(latin1_ext)), name="latin1")
    dir_name = LATIN1_DIR.decode("utf-8", "surrogateescape")
    file_name = LATIN1_FILE.decode("utf-8", "surrogateescape")
    assert dir_name in [e.name for e in fs.listdir("/")]
    directory = "/" + dir_name
    assert fs.stat(directory).kind == "dir"
    fs._dir_inodes.clear()   # listed by path, not by the inode remembered from the listing
    assert [e.name for e in fs.listdir(directory)] == [file_name]
    path = f"{directory}/{file_name}"
    entry = fs.stat(path)
    assert entry.size == len(b"latin-1 names survive\n")
    assert fs.read_file(path) == b"latin-1 names survive\n"
    with pytest.raises(GuestPathError):
        fs.stat(directory + "/caf\udce8.txt")   # one byte off: not there
