"""Snapshots that are file trees: a tar of a server's root made by real GNU tar
(`--xattrs --acls --numeric-owner`, gzip and zstd as vzdump does, a `./` prefix and
a plain one, an Incus-style rootfs/ export) is read as a filesystem of its own, and
`rescue extract` gives back the tree the archive was made from, entry by entry."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from common_support import IS_ROOT, assert_one_line_error, dir_view, explain, rescue, tar_view
from rescue.fs.tartree import TarTreeFileSystem, acl_text_to_xattr
from rescue.source import open_source

pytestmark = pytest.mark.skipif(not shutil.which("tar"), reason="needs GNU tar")

HAVE_ACL_TOOLS = bool(shutil.which("setfacl"))


def _t(sec: int) -> tuple[int, int]:
    ns = sec * 10**9 + 123456789
    return ns, ns


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A small server root with what metadata can carry."""
    r = tmp_path_factory.mktemp("server") / "root"
    for d in ("etc/ssh", "var/www/html", "var/lib/docker/volumes/db/_data", "usr/bin", "home/alice",
              "root", "srv/empty-dir", "var/shared"):
        (r / d).mkdir(parents=True)
    (r / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/sh\n")
    (r / "etc/group").write_text("root:x:0:\nalice:x:1000:\n")
    (r / "etc/os-release").write_text('ID=debian\nNAME="Debian GNU/Linux"\nPRETTY_NAME="Debian GNU/Linux 12 '
                                      '(bookworm)"\nVERSION_ID="12"\n')
    (r / "etc/ssh/moduli").write_bytes(os.urandom(200_000))   # what inspect used to take for "the disk"
    (r / "var/www/html/index.html").write_text("<h1>hi</h1>\n")
    (r / "var/lib/docker/volumes/db/_data/pg.conf").write_text("listen_addresses='*'\n")
    (r / "var/lib/docker/volumes/db/_data/big.bin").write_bytes(os.urandom(3 << 20))
    (r / "home/alice/notes.txt").write_text("notes\n")
    os.link(r / "home/alice/notes.txt", r / "home/alice/notes-link.txt")
    (r / "home/alice/empty").write_bytes(b"")
    (r / "home/alice/weird name é\tx").write_text("odd\n")
    os.symlink("../../etc/passwd", r / "var/www/passwd-link")
    os.symlink("/etc/os-release", r / "root/abs-link")
    (r / "usr/bin/tool").write_bytes(b"#!/bin/sh\necho tool\n")
    os.chmod(r / "usr/bin/tool", 0o4755)
    os.chmod(r / "root", 0o700)
    with open(r / "var/sparse.img", "wb") as f:
        f.seek(8 << 20)
        f.write(b"end")
    os.mkfifo(r / "var/fifo")
    os.setxattr(r / "var/www/html/index.html", "user.mime_type", b"text/html")
    os.setxattr(r / "usr/bin/tool", "user.bin", b"\x00\x01\xff binary")
    if IS_ROOT:
        os.mknod(r / "var/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        for p in (r / "home/alice", r / "home/alice/notes.txt", r / "home/alice/empty"):
            os.chown(p, 1000, 1000)
        os.chown(r / "var/lib/docker/volumes/db/_data", 999, 999)
        os.chown(r / "var/www/passwd-link", 33, 33, follow_symlinks=False)
    if HAVE_ACL_TOOLS:
        subprocess.run(["setfacl", "-m", "u:1000:rw,g:33:r", str(r / "var/www/html/index.html")], check=True)
        subprocess.run(["setfacl", "-m", "u:1000:rwx", "-d", "-m", "g:1000:rx", str(r / "var/shared")], check=True)
    for i, p in enumerate(sorted(r.rglob("*"), key=lambda p: -len(p.parts))):
        os.utime(p, ns=_t(1_600_000_000 + i * 1000), follow_symlinks=False)
    os.utime(r, ns=_t(1_500_000_000))
    return r


def _tar(root: Path, out: Path, *args: str, members: list[str] | None = None, prefix_dir: Path | None = None) -> Path:
    cmd = ["tar", "--xattrs", "--xattrs-include=*", "--acls", "--numeric-owner", *args, "-f", str(out)]
    res = subprocess.run(cmd + ["-C", str(prefix_dir or root)] + (members or ["."]), capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"tar cannot make this archive here: {res.stderr.decode(errors='replace').strip()}")
    return out


@pytest.fixture(scope="module")
def archives(root, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("archives")
    out = {"dot.tar.gz": _tar(root, d / "backup.tar.gz", "-cz")}
    if shutil.which("zstd"):
        out["plain.tar.zst"] = _tar(root, d / "vzdump-lxc-101.tar.zst", "--zstd", "-c",
                                    members=sorted(os.listdir(root)))
    # an Incus/LXD-style export: metadata beside a rootfs/ directory
    incus = d / "incus"
    incus.mkdir()
    (incus / "metadata.yaml").write_text("architecture: x86_64\n")
    res = subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--acls", "--numeric-owner", "-cf",
                          str(d / "export.tar"), "-C", str(incus), "metadata.yaml",
                          "--transform", "s,^\\.,rootfs,rhS", "-C", str(root), "."], capture_output=True)
    assert res.returncode == 0, res.stderr
    out["rootfs.tar"] = d / "export.tar"
    return out


def _compare(got, want, what: str) -> None:
    assert set(got.recs) == set(want.recs), (what, sorted(set(got.recs) ^ set(want.recs)))
    for path, rec in want.recs.items():
        assert got.recs[path] == rec, (what, path, got.recs[path], rec)


@pytest.mark.parametrize("kind", ["dot.tar.gz", "plain.tar.zst", "rootfs.tar"])
def test_extract_gives_back_the_tree_the_archive_was_made_from(kind, archives, root, tmp_path):
    archive = archives.get(kind)
    if archive is None:
        pytest.skip(f"no {kind} (zstd missing)")
    want = dir_view(root)
    out = tmp_path / "out.tar"
    res = rescue("extract", str(archive), "-o", str(out))
    assert res.returncode == 0, explain(res)
    got = tar_view(out)
    _compare(got, want, kind)
    assert sorted(map(sorted, got.links)) == sorted(map(sorted, want.links)) and want.links


def test_extract_to_a_directory_equals_the_tree(archives, root, tmp_path):
    out = tmp_path / "out"
    res = rescue("extract", str(archives["dot.tar.gz"]), "--path", "/home", "--path", "/var/lib",
                 "--path", "/usr", "--keep-setuid", "-o", str(out) + "/")
    assert res.returncode == 0, explain(res)
    want = {k: v for k, v in dir_view(root).recs.items() if k.startswith(("home/", "var/lib/", "usr/"))}
    got = {k: v for k, v in dir_view(out).recs.items() if k.startswith(("home/", "var/lib/", "usr/"))}
    assert got == want


def test_inspect_sees_the_server_not_a_disk(archives):
    res = rescue("inspect", str(archives["dot.tar.gz"]), "--json")
    assert res.returncode == 0, explain(res)
    data = json.loads(res.stdout)
    assert data["os"]["id"] == "debian"
    assert data["archive"]["tree"] == "./"
    assert [(v["filesystem"], v.get("backend")) for v in data["volumes"]] == [("tar", "tar")]
    paths = {v["path"] for v in data["valuables"]}
    assert "/var/lib/docker/volumes/db/_data" in paths or "/var/www" in paths, data["valuables"]
    res = rescue("cat", str(archives["dot.tar.gz"]), "/var/www/passwd-link")
    assert res.returncode == 0 and res.stdout.startswith(b"root:x:0:0:root:/root:/bin/bash\n"), explain(res)
    res = rescue("ls", "-l", str(archives["dot.tar.gz"]), "/usr/bin")
    assert res.returncode == 0 and b"-rwsr-xr-x" in res.stdout, explain(res)


def test_sparse_member_reads_as_the_file(archives, root, tmp_path):
    sparse = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", "--posix", "-cf", str(sparse), "-C", str(root), "./etc", "./var/sparse.img",
                    "./usr", "./home"], check=True)
    src = open_source(str(sparse))
    try:
        fs = TarTreeFileSystem(src)
        e = fs.stat("/var/sparse.img")
        assert b"".join(fs.read_chunks(e)) == (root / "var/sparse.img").read_bytes()
        assert fs.data_ranges(e) and sum(n for _, n in fs.data_ranges(e)) < 1 << 20
    finally:
        src.close()


def test_acl_text_becomes_the_kernel_xattr(root):
    if not HAVE_ACL_TOOLS:
        pytest.skip("needs setfacl/getfacl")
    want = os.getxattr(root / "var/www/html/index.html", "system.posix_acl_access")
    text = subprocess.run(["getfacl", "-cn", "--absolute-names", str(root / "var/www/html/index.html")],
                          capture_output=True, text=True, check=True).stdout
    assert acl_text_to_xattr(",".join(line for line in text.splitlines() if line)) == want


def test_a_truncated_tree_archive_rescues_what_it_holds(root, tmp_path):
    whole = tmp_path / "whole.tar"
    subprocess.run(["tar", "--numeric-owner", "-cf", str(whole), "-C", str(root), "./etc", "./home", "./usr",
                    "./var/lib"], check=True)
    data = whole.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:len(data) - (2 << 20)])   # inside big.bin, the last file
    out = tmp_path / "out.tar"
    res = rescue("extract", str(cut), "-o", str(out))
    assert res.returncode == 1, explain(res)   # partial: reported, the rest rescued
    assert b"damaged" in res.stderr and b"Traceback" not in res.stderr
    got = tar_view(out).recs
    assert got["etc/passwd"].sha == dir_view(root).recs["etc/passwd"].sha and "home/alice/notes.txt" in got


def test_the_walked_table_is_cached_and_gives_the_same_tree(archives, tmp_path, monkeypatch):
    monkeypatch.setenv("RESCUE_CACHE_DIR", str(tmp_path / "cache"))
    views = []
    for i in range(2):
        out = tmp_path / f"out{i}.tar"
        res = rescue("extract", str(archives.get("plain.tar.zst") or archives["dot.tar.gz"]), "-o", str(out))
        assert res.returncode == 0, explain(res)
        views.append(tar_view(out))
        if i == 0:
            assert list((tmp_path / "cache").rglob("tree-v1.json")), "no cached table after the first open"
    assert views[0].recs == views[1].recs and views[0].links == views[1].links
