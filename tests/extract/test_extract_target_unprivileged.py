"""rsync and rclone targets as an ordinary user (issue 14, "every skip counts"):
the real CLI runs as `nobody` (setpriv, when the tests run as root) against a
real rsync daemon and a real `rclone serve sftp` remote on 127.0.0.1. Device
nodes (and, for rclone, FIFOs) the staging or the remote cannot hold are each
named on a `skipped:` line and make the exit code 1, as the directory target
does; everything else arrives equal to the image's files. The image is made by
mkfs.ext4 -d, its device nodes and FIFO by debugfs (no root needed for either).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from remote_servers import RcloneSftp, RsyncDaemon, have
from unprivileged_support import IS_ROOT, python_for_user, setpriv_prefix, user_ids

FILES = {"etc/hostname": b"web1\n", "srv/data.bin": os.urandom(300_000), "srv/empty": b"",
         "srv/deep/note.txt": b"deeper\n"}
SPECIALS = {"/dev/null": ("c", 1, 3, 0o20666), "/dev/loop0": ("b", 7, 0, 0o60660), "/srv/pipe": ("p", 0, 0, 0o10644)}
DEVICES = sorted(p for p, s in SPECIALS.items() if s[0] in "cb")


def _need(*tools: str) -> None:
    for tool in tools:
        if not have(tool):
            pytest.skip(f"needs {tool} (apt: e2fsprogs rsync rclone util-linux)")


@pytest.fixture(scope="module")
def world():
    _need("mkfs.ext4", "debugfs")
    prefix = setpriv_prefix()
    uid, gid = user_ids()
    base = Path(tempfile.mkdtemp(prefix="rescue-unpriv-remote-"))   # pytest's tmp of root is 0700
    try:
        os.chmod(base, 0o755)
        tree, home = base / "tree", base / "home"
        for name, data in FILES.items():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            (tree / name).write_bytes(data)
        (tree / "dev").mkdir()
        os.symlink("data.bin", tree / "srv" / "link")
        image = base / "server.img"
        with open(image, "wb") as f:
            f.truncate(16 << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image)], check=True, capture_output=True)
        script = ""
        for path, (kind, major, minor, mode) in SPECIALS.items():
            parent, leaf = os.path.split(path)
            nums = f" {major} {minor}" if kind != "p" else ""
            script += f"cd {parent}\nmknod {leaf} {kind}{nums}\nsif {leaf} mode 0{mode:o}\n"
        subprocess.run(["debugfs", "-w", "-f", "-", str(image)], input=script.encode(), check=True, capture_output=True)
        os.chmod(image, 0o444)
        (home / "tmp").mkdir(parents=True)
        if IS_ROOT:
            for d in (home, home / "tmp"):
                os.chown(d, uid, gid)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "NO_COLOR": "1",
               "PYTHONDONTWRITEBYTECODE": "1", "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"),
               "TMPDIR": str(home / "tmp")}
        python, pythonpath = python_for_user(prefix, env)
        env["PYTHONPATH"] = pythonpath

        def user(*args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
            return subprocess.run([*prefix, python, "-m", "rescue", *args], capture_output=True, text=True,
                                  env={**env, **(extra_env or {})}, cwd=home, timeout=300)

        yield base, image, user
    finally:
        subprocess.run(["chmod", "-R", "u+rwX", str(base)], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon(world):
    _need("rsync")
    with RsyncDaemon(world[0] / "rsyncd") as d:
        yield d


def _skipped(stderr: str) -> dict[str, str]:
    out = {}
    for line in stderr.splitlines():
        if line.startswith("skipped: "):
            path, _, why = line[len("skipped: "):].partition(": ")
            out[path] = why
    return out


def _files_arrived(got: Path) -> None:
    for name, data in FILES.items():
        assert (got / name).read_bytes() == data, name
    assert os.readlink(got / "srv" / "link") == "data.bin"


def test_rsync_as_a_user_names_each_device_node_it_does_not_send(world, daemon):
    _, image, user = world
    r = user("extract", str(image), "-o", daemon.url("open", "nodev/"))
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    skipped = _skipped(r.stderr)
    assert sorted(skipped) == DEVICES, r.stderr
    assert all(why.startswith("device node not sent (add --devices") for why in skipped.values()), r.stderr
    assert f"{len(DEVICES)} skipped" in r.stderr, r.stderr
    others = [line for line in r.stderr.splitlines() if not line.startswith("skipped: ")]
    assert not any("device" in line for line in others), r.stderr   # named once each, not counted again
    got = daemon.open_dir / "nodev"
    _files_arrived(got)
    assert stat.S_ISFIFO(os.lstat(got / "srv" / "pipe").st_mode)     # a FIFO is no device: it arrives
    assert not (got / "dev" / "null").exists() and not (got / "dev" / "loop0").exists()


def test_rsync_as_a_user_sends_devices_through_fake_super(world, daemon):
    """With --devices and a scratch directory that takes user xattrs, rsync's
    --fake-super carries the device numbers: nothing is skipped."""
    _, image, user = world
    r = user("extract", str(image), "--devices", "-o", daemon.url("open", "withdev/"))
    assert r.returncode == 0, r.stderr
    assert not _skipped(r.stderr), r.stderr
    got = daemon.open_dir / "withdev"
    _files_arrived(got)
    if IS_ROOT:   # the daemon module runs as root (uid = 0): it creates the real nodes
        st = os.lstat(got / "dev" / "null")
        assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3)
        st = os.lstat(got / "dev" / "loop0")
        assert stat.S_ISBLK(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (7, 0)


def test_rsync_as_a_user_without_xattrs_for_fake_super_names_device_nodes(world, daemon):
    """Scratch on ramfs (no user xattrs): a user can neither mknod nor fake it."""
    if not IS_ROOT:
        pytest.skip("needs root to mount a ramfs scratch directory for the user")
    base, image, user = world
    scratch = base / "ramfs"
    scratch.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "-o", "mode=0755", "ramfs", str(scratch)], check=True)
    try:
        os.chown(scratch, *user_ids())
        r = user("extract", str(image), "--devices", "-o", daemon.url("open", "noxattr/"),
                 extra_env={"TMPDIR": str(scratch)})
        left = os.listdir(scratch)
    finally:
        subprocess.run(["umount", str(scratch)], check=True)
    assert r.returncode == 1, r.stderr
    skipped = _skipped(r.stderr)
    assert sorted(skipped) == DEVICES, r.stderr
    assert all("not root, and the scratch directory takes no user xattrs" in why for why in skipped.values())
    _files_arrived(daemon.open_dir / "noxattr")
    assert left == [], "the scratch directory is cleaned up"


def test_rclone_as_a_user_names_each_entry_it_cannot_store(world, tmp_path):
    _need("rclone")
    base, image, user = world
    with RcloneSftp(base / "rclone", name="unprivremote") as server:
        r = user("extract", str(image), "-o", f"rclone:{server.name}:restored/", extra_env=server.env)
        assert r.returncode == 1, r.stderr
        assert server.password not in r.stderr
        skipped = _skipped(r.stderr)
        assert sorted(skipped) == sorted(SPECIALS), r.stderr
        assert all(why.endswith("not sent: rclone stores files only (a tar target keeps it)")
                   for why in skipped.values()), r.stderr
        got = server.root / "restored"
        for name, data in FILES.items():
            assert (got / name).read_bytes() == data, name
        assert (got / "srv" / "link.rclonelink").read_bytes() == b"data.bin"
        assert not (got / "dev" / "null").exists() and not (got / "srv" / "pipe").exists()
