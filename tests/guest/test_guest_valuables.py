"""What `rescue inspect` says is worth rescuing (rescue/guest/valuables.py), on an
ext4 image made by `mkfs.ext4 -d` from a server-like tree: the findings and
their file counts and byte totals must match the tree on the host."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from rescue.guest.snapshot import open_snapshot
from rescue.guest.valuables import find_valuables

pytestmark = pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs mkfs.ext4 (e2fsprogs)")

TREE = {
    "etc/os-release": b'ID=debian\nPRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n',
    "etc/hostname": b"web1\n",
    "var/lib/docker/volumes/metadata.db": b"\0" * 4096,
    "var/lib/docker/volumes/shop_db/_data/base/1/1259": os.urandom(20000),
    "var/lib/docker/volumes/shop_db/_data/PG_VERSION": b"16\n",
    "var/lib/docker/volumes/shop_media/_data/a.jpg": os.urandom(3000),
    "var/lib/containers/storage/volumes/cache/_data/x": b"x" * 10,
    "var/lib/postgresql/15/main/PG_VERSION": b"15\n",
    "var/lib/postgresql/15/main/base/1/1": b"p" * 8192,
    "var/lib/pgsql/data/PG_VERSION": b"13\n",
    "var/lib/mysql/ibdata1": b"m" * 12345,
    "var/www/html/index.html": b"<h1>hi</h1>\n",
    "home/alice/notes.txt": b"remember\n",
    "home/bob/.profile": b"# bob\n",
    "root/.bash_history": b"ls\n",
}
EMPTY_DIRS = ("srv", "opt", "var/lib/redis")   # present but empty: not worth listing


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("valuables")
    tree = base / "tree"
    for rel, data in TREE.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(data)
    for rel in EMPTY_DIRS:
        (tree / rel).mkdir(parents=True, exist_ok=True)
    os.symlink("/etc/hostname", tree / "home/alice/link")   # symlinks are not counted as files
    image = base / "server.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image), "16M"], check=True)
    return tree, image


def _host_totals(tree: Path, guest_path: str) -> tuple[int, int]:
    files = size = 0
    for root, _dirs, names in os.walk(tree / guest_path.lstrip("/")):
        for name in names:
            p = Path(root, name)
            if p.is_file() and not p.is_symlink():
                files += 1
                size += p.stat().st_size
    return files, size


def test_findings_match_the_tree(server):
    tree, image = server
    with open_snapshot(str(image)) as snap:
        found = {f.path: f for f in find_valuables(snap.filesystem())}
    expected = {
        "/var/lib/docker/volumes/shop_db/_data": "Docker volume shop_db",
        "/var/lib/docker/volumes/shop_media/_data": "Docker volume shop_media",
        "/var/lib/containers/storage/volumes/cache/_data": "Podman volume cache",
        "/var/lib/postgresql/15/main": "PostgreSQL 15 cluster",
        "/var/lib/pgsql/data": "PostgreSQL 13 cluster",
        "/var/lib/mysql": "MySQL/MariaDB data directory",
        "/var/www": "web root",
        "/home/alice": "home of alice",
        "/home/bob": "home of bob",
        "/root": "root's home directory",
        "/etc": "system configuration",
    }
    assert {p: f.what for p, f in found.items()} == expected
    for path, finding in found.items():
        assert (finding.files, finding.bytes) == _host_totals(tree, path), path
        assert finding.complete


def test_budget_makes_sizes_a_lower_bound(server):
    _tree, image = server
    with open_snapshot(str(image)) as snap:
        found = {f.path: f for f in find_valuables(snap.filesystem(), budget=1)}
    etc = found["/etc"]
    assert not etc.complete and etc.files <= 1
    assert found["/var/lib/mysql"].complete   # one entry: within its own budget


def test_inspect_lists_them(server):
    _tree, image = server
    from common_support import rescue
    result = rescue("inspect", "--json", str(image))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    paths = [f["path"] for f in data["valuables"]]
    assert paths[0] == "/var/lib/docker/volumes/shop_db/_data" and "/etc" in paths
    text = rescue("inspect", str(image)).stdout.decode()
    assert "Docker volume shop_media, 1 file, 2.9 KiB" in text and "/var/lib/postgresql/15/main" in text
