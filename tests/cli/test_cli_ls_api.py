"""`ls` and `cat` are the typed API (api.ls -> Listing, api.cat -> chunks)
rendered; a directory listed only in part is said once on stderr and given
in --json as "damage", whichever reader found the damage (an ext directory
block, a tree archive cut short)."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from common_support import explain, rescue
from repo_paths import FIXTURES
from rescue import api
from rescue.errors import GuestPathError
from rescue.guest import SnapshotOptions

SAMPLE = FIXTURES / "sample-vps.disk"


def test_ls_json_is_the_listing_the_api_returns():
    listing = api.ls(str(SAMPLE), "/etc")
    assert listing.entry.kind == "dir" and listing.damage == []
    assert listing.names == sorted(listing.names) and "fstab" in listing.names
    res = rescue("ls", "--json", str(SAMPLE), "/etc")
    assert res.returncode == 0, explain(res)
    assert json.loads(res.stdout) == json.loads(json.dumps(listing.to_json()))
    text = rescue("ls", str(SAMPLE), "/etc").stdout.decode().splitlines()
    assert [line.rstrip("/") for line in text] == listing.names


def test_cat_is_the_api_stream_and_errors_come_before_any_byte():
    data = b"".join(api.cat(str(SAMPLE), "/etc/fstab"))
    res = rescue("cat", str(SAMPLE), "/etc/fstab")
    assert res.returncode == 0 and res.stdout == data and b"UUID=" in data
    with pytest.raises(GuestPathError, match="not a file"):
        next(iter(api.cat(str(SAMPLE), "/etc")))


def _tree_archive(tmp_path: Path) -> Path:
    """A server's files as `tar czf` writes them, cut in the middle of /srv."""
    if shutil.which("tar") is None:
        pytest.skip("needs GNU tar")
    root = tmp_path / "root"
    for d in ("etc", "usr/bin", "var/lib", "srv"):
        (root / d).mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "etc/os-release").write_text('ID=debian\nPRETTY_NAME="Debian GNU/Linux 12"\n')
    import random
    rng = random.Random(7)
    for i in range(40):   # incompressible, so the cut falls among them
        (root / "srv" / f"f{i:02}").write_bytes(rng.randbytes(20000))
    whole = tmp_path / "backup.tar.gz"
    subprocess.run(["tar", "czf", str(whole), "-C", str(root), "."], check=True)
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(whole.read_bytes()[:whole.stat().st_size // 2])
    return cut


def _damage_lines(stderr: bytes, text: str) -> list[str]:
    return [line for line in stderr.decode(errors="replace").splitlines() if text in line]


def test_ls_of_a_cut_tree_archive_says_the_listing_is_partial(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cut = _tree_archive(tmp_path)
    res = rescue("ls", "--partial", str(cut), "/srv")
    assert res.returncode == 0, explain(res)
    listed = res.stdout.decode().split()
    assert 0 < len(listed) < 40, listed
    said = _damage_lines(res.stderr, "later files are missing")
    assert len(said) == 1 and said[0].startswith("warning: /srv: listed only in part: "), explain(res)
    data = json.loads(rescue("ls", "--json", "--partial", str(cut), "/srv").stdout)
    assert len(data["damage"]) == 1 and data["damage"][0] in said[0]
    assert sorted(e["name"] for e in data["entries"]) == sorted(listed)
    # extract reports the same damage for the same directory
    ext = rescue("extract", "--partial", str(cut), "--path", "/srv", "-o", str(tmp_path / "out") + "/")
    assert f"skipped: /srv: directory only partly readable: {data['damage'][0]}" in ext.stderr.decode(), explain(ext)
    assert {p.name for p in (tmp_path / "out" / "srv").iterdir()} <= set(listed)
    # the Python API gives the same
    listing = api.ls(str(cut), "/srv", SnapshotOptions(partial=True))
    assert listing.damage == data["damage"]


def test_ls_of_a_damaged_ext_directory_says_it_once(tmp_path):
    for tool in ("mkfs.ext2", "debugfs"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} (e2fsprogs)")
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    for i in range(10):
        (tree / "d" / f"f{i}").write_text(str(i))
    image = tmp_path / "dmg.img"
    with open(image, "wb") as f:
        f.truncate(4 << 20)
    subprocess.run(["mkfs.ext2", "-q", "-b", "1024", "-d", str(tree), str(image)], check=True)
    block = int(subprocess.run(["debugfs", "-R", "blocks /d", str(image)], capture_output=True,
                               check=True).stdout.split()[0])
    with open(image, "r+b") as f:   # the third entry (after '.' and '..'): rec_len = 0
        f.seek(block * 1024 + 24 + 4)
        f.write(struct.pack("<H", 0))
    res = rescue("ls", str(image), "/d")
    assert res.returncode == 0, explain(res)
    said = _damage_lines(res.stderr, "rec_len=0")
    assert len(said) == 1 and said[0].startswith("warning: "), explain(res)
    data = json.loads(rescue("ls", "--json", str(image), "/d").stdout)
    assert len(data["damage"]) == 1 and "rec_len=0" in data["damage"][0]
    assert {e["name"] for e in data["entries"]} >= {f"f{i}" for i in range(1, 10)}
