"""Owner names that are not UTF-8: a real ext4 image (mkfs.ext4 -d) whose
/etc/passwd and /etc/group hold a Latin-1 name (`café` as byte e9) is extracted
into a tar through the CLI; the tar carries the real bytes, GNU tar lists them
and restores (by name, --numeric-owner off) without a word, and ls escapes them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from repo_paths import REPO

pytestmark = pytest.mark.skipif(not shutil.which("mkfs.ext4") or not shutil.which("tar"),
                                reason="needs mkfs.ext4 (e2fsprogs) and GNU tar")
RESCUE = REPO / ".venv" / "bin" / "rescue"
UID, GID = 4321, 4322
NAME = b"caf\xe9"          # Latin-1, not UTF-8


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("latin1")
    tree = work / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/passwd").write_bytes(b"root:x:0:0:root:/root:/bin/sh\n" + NAME +
                                      b":x:%d:%d:Ren\xe9:/home/cafe:/bin/sh\n" % (UID, GID))
    (tree / "etc/group").write_bytes(b"root:x:0:\n" + NAME + b"grp:x:%d:\n" % GID)
    (tree / "etc/os-release").write_text('ID=debian\nNAME="Debian GNU/Linux"\n')
    (tree / "home/cafe").mkdir(parents=True)
    (tree / "home/cafe/notes.txt").write_text("bonjour\n")
    for p in (tree / "home/cafe", tree / "home/cafe/notes.txt"):
        os.chown(p, UID, GID)
    img = work / "latin1.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(img), "8M"], check=True, capture_output=True)
    return img


def test_tar_gets_the_raw_owner_name_and_gnu_tar_restores_it(image, tmp_path):
    out = tmp_path / "home.tar"
    res = subprocess.run([str(RESCUE), "extract", str(image), "--path", "/home", "-o", str(out)],
                         capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr
    raw = out.read_bytes()
    assert b"\xef\xbf\xbd" not in raw and b"hdrcharset" not in raw   # no U+FFFD, no charset record
    with tarfile.open(out, encoding="utf-8", errors="surrogateescape") as tf:
        member = tf.getmember("home/cafe/notes.txt")
        assert os.fsencode(member.uname) == NAME and os.fsencode(member.gname) == NAME + b"grp"
        assert (member.uid, member.gid) == (UID, GID)
    listing = subprocess.run(["tar", "-tvf", str(out)], capture_output=True, check=True)
    assert b" " + NAME + b"/" + NAME + b"grp " in listing.stdout and not listing.stderr, listing
    dest = tmp_path / "restored"
    dest.mkdir()
    # --numeric-owner off: GNU tar looks the name up; this host has no such user, so it falls back to the id
    res = subprocess.run(["tar", "--xattrs", "--acls", "-xpf", str(out), "-C", str(dest)], capture_output=True)
    assert res.returncode == 0 and not res.stderr, res.stderr
    st = (dest / "home/cafe/notes.txt").stat()
    assert (dest / "home/cafe/notes.txt").read_text() == "bonjour\n"
    if os.geteuid() == 0:
        assert (st.st_uid, st.st_gid) == (UID, GID)


def test_ls_shows_the_name_escaped(image):
    res = subprocess.run([str(RESCUE), "ls", "-l", str(image), "/home/cafe"], capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert b"caf\\xe9" in res.stdout and b"\xe9" not in res.stdout.replace(b"caf\\xe9", b""), res.stdout
    res = subprocess.run([str(RESCUE), "ls", "--json", str(image), "/home/cafe"], capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    entries = json.loads(res.stdout)["entries"]
    assert {e["user"] for e in entries} == {"caf\\xe9"} and {e["group"] for e in entries} == {"caf\\xe9grp"}
