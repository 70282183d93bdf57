"""Sockets through every target: an ext4 image (mkfs.ext4 -d) of a tree holding a
real unix socket (made by socket.bind, as a crashed MySQL leaves mysql.sock) is
extracted into a tar, a directory, an rsync daemon and an rclone remote. Every
target names the socket on one line, counts it in --json as skipped-sockets,
writes the rest, and the socket alone does not make the exit code 1."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tarfile
from pathlib import Path

import pytest

from remote_servers import RcloneSftp, RsyncDaemon, have
from repo_paths import REPO

pytestmark = pytest.mark.skipif(not shutil.which("mkfs.ext4"), reason="mkfs.ext4 (e2fsprogs) is not installed")
RESCUE = REPO / ".venv" / "bin" / "rescue"
SOCK = "/var/lib/mysql/mysql.sock"
LINE = f"skipped socket {SOCK} (holds no data; its server re-creates it)"
DATA = os.urandom(70_000)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("sock")
    tree = work / "tree"
    (tree / "var/lib/mysql").mkdir(parents=True)
    (tree / "var/lib/mysql/ibdata1").write_bytes(DATA)
    (tree / "var/lib/mysql/my.cnf").write_text("[mysqld]\n")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(tree / SOCK.lstrip("/")))   # a real socket inode, left behind as by a crashed server
    s.close()
    assert (tree / SOCK.lstrip("/")).is_socket()
    img = work / "sock.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(img), "8M"], check=True, capture_output=True)
    listing = subprocess.run(["debugfs", "-R", f"stat {SOCK}", str(img)], capture_output=True, text=True)
    assert "Type: socket" in listing.stdout, listing.stdout   # mke2fs really stored a socket
    return img


def run(image: Path, output: str, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(RESCUE), "extract", str(image), "--path", "/var/lib/mysql", "-o", output, *extra],
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=180)


def check(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, res.stderr
    assert res.stderr.count(LINE) == 1, res.stderr
    assert "1 socket not written" in res.stderr and "skipped:" not in res.stderr, res.stderr


def check_json(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["skipped-sockets"] == [SOCK] and data["skipped"] == [], data


def check_tree(root: Path) -> None:
    got = root / "var/lib/mysql"
    assert (got / "ibdata1").read_bytes() == DATA and (got / "my.cnf").read_text() == "[mysqld]\n"
    assert not (got / "mysql.sock").exists() and not (got / "mysql.sock").is_symlink()


def test_tar(image, tmp_path):
    out = tmp_path / "out.tar"
    check(run(image, str(out)))
    with tarfile.open(out) as tf:
        names = tf.getnames()
        assert not any(n.endswith("mysql.sock") for n in names)
        assert tf.extractfile("var/lib/mysql/ibdata1").read() == DATA
    check_json(run(image, str(tmp_path / "j.tar"), "--json"))


def test_directory(image, tmp_path):
    check(run(image, str(tmp_path / "dir") + "/"))
    check_tree(tmp_path / "dir")
    check_json(run(image, str(tmp_path / "dir2") + "/", "--json"))


def test_manifest_names_the_socket(image, tmp_path):
    man = tmp_path / "m.jsonl"
    check(run(image, str(tmp_path / "dir") + "/", "--manifest", str(man)))
    records = [json.loads(line) for line in man.read_text().splitlines()]
    assert {"path": "var/lib/mysql/mysql.sock", "skipped": "socket: holds no data; its server re-creates it"} \
        in records


@pytest.mark.skipif(not have("rsync"), reason="rsync is not installed")
def test_rsync_daemon(image, tmp_path):
    with RsyncDaemon(tmp_path / "rsyncd") as daemon:
        check(run(image, daemon.url("open", "a/")))
        check_tree(daemon.open_dir / "a")
        check_json(run(image, daemon.url("open", "b/"), "--json"))
        check_tree(daemon.open_dir / "b")


@pytest.mark.skipif(not have("rclone"), reason="rclone is not installed")
def test_rclone_remote(image, tmp_path):
    with RcloneSftp(tmp_path / "rclone") as server:
        check(run(image, f"rclone:{server.name}:a/", env=server.env))
        check_tree(server.root / "a")
        check_json(run(image, f"rclone:{server.name}:b/", "--json", env=server.env))
        check_tree(server.root / "b")


def test_dry_run_names_the_socket_without_exit_1(image, tmp_path):
    res = run(image, str(tmp_path / "dir") + "/", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert res.stderr.count(f"would skip socket {SOCK} (holds no data; its server re-creates it)") == 1, res.stderr
    assert not (tmp_path / "dir").exists()
