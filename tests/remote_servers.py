"""Helpers for the rsync/rclone target tests: a real source tree, Items made
from it (as the extract engine would hand them over), tree comparison, real
servers on 127.0.0.1 (rsync daemon, sshd, rclone serve), and the fixtures both
test modules share (import them by name: pytest finds imported fixtures)."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import contextlib
import time
from pathlib import Path
from typing import Iterator

import pytest

from rescue.extract.base import Content, Item
from rescue.fs.base import BLOCK, CHAR, DIR, FIFO, FILE, SOCKET, SYMLINK, Entry, FileReadError

IS_ROOT = os.geteuid() == 0

_KINDS = {stat.S_IFREG: FILE, stat.S_IFDIR: DIR, stat.S_IFLNK: SYMLINK, stat.S_IFIFO: FIFO,
          stat.S_IFCHR: CHAR, stat.S_IFBLK: BLOCK, stat.S_IFSOCK: SOCKET}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 10) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                pass
        except OSError:
            time.sleep(0.05)
            continue
        time.sleep(0.2)      # someone else on that port? then our server exits for want of it
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} (port {port} taken?)")
        return
    raise RuntimeError(f"server on port {port} did not start")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _set_mtime(p: Path, sec: int) -> None:
    os.utime(p, ns=(sec * 10**9 + 123456789, sec * 10**9 + 123456789), follow_symlinks=False)


def make_tree(root: Path, big: int = 300_000) -> Path:
    """A small server tree with what metadata tests need: owners, setuid,
    symlinks, hard links, empty file/dir, sparse file, xattrs, odd names."""
    root.mkdir(parents=True)
    (root / "db" / "_data").mkdir(parents=True)
    (root / "web" / "html").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "db" / "_data" / "pg.conf").write_text("listen_addresses = '*'\n")
    (root / "db" / "_data" / "big.bin").write_bytes(os.urandom(big))
    (root / "web" / "html" / "index.html").write_text("<h1>hello</h1>\n")
    (root / "web" / "html" / "weird name\nwith newline é").write_text("odd\n")
    (root / "empty").write_bytes(b"")
    with open(root / "sparse.img", "wb") as f:
        f.seek(5 << 20)
        f.write(b"end")
    (root / "web" / "bin").write_bytes(b"#!/bin/sh\necho x\n")
    os.chmod(root / "web" / "bin", 0o4755)
    os.chmod(root / "db" / "_data", 0o700)
    os.link(root / "db" / "_data" / "pg.conf", root / "web" / "pg-link.conf")
    os.link(root / "db" / "_data" / "big.bin", root / "web" / "big-link.bin")
    os.symlink("../db/_data/pg.conf", root / "web" / "conf-symlink")
    os.symlink("/etc/passwd", root / "abs-symlink")
    os.setxattr(root / "web" / "html" / "index.html", "user.mime_type", b"text/html")
    if IS_ROOT:
        os.setxattr(root / "db" / "_data" / "pg.conf", "trusted.overlay.opaque", b"y")
        for p in [root / "db", root / "db" / "_data", root / "db" / "_data" / "pg.conf", root / "db" / "_data" / "big.bin"]:
            os.chown(p, 999, 999)
        os.chown(root / "web" / "html" / "index.html", 33, 33)
        os.chown(root / "web" / "conf-symlink", 33, 34, follow_symlinks=False)
        os.mknod(root / "null-dev", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mkfifo(root / "fifo")
    for i, p in enumerate(sorted(root.rglob("*"), key=lambda p: -len(p.parts))):
        _set_mtime(p, 1_600_000_000 + i * 1000)
    _set_mtime(root, 1_500_000_000)
    return root


def entry_of(path: Path, guest_path: str) -> Entry:
    st = os.lstat(path)
    kind = _KINDS[stat.S_IFMT(st.st_mode)]
    xattrs = {}
    if kind != SYMLINK:
        for k in os.listxattr(path, follow_symlinks=False):
            xattrs[k] = os.getxattr(path, k, follow_symlinks=False)
    return Entry(path=guest_path, kind=kind, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
                 size=st.st_size if kind == FILE else 0, mtime_ns=st.st_mtime_ns, atime_ns=st.st_atime_ns,
                 nlink=st.st_nlink, inode=st.st_ino,
                 link_target=os.readlink(path) if kind == SYMLINK else None,
                 rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in (CHAR, BLOCK) else None,
                 xattrs=xattrs)


def _content(path: Path, size: int, fail_after: int | None = None) -> Content:
    def chunks():
        done = 0
        with open(path, "rb") as f:
            while True:
                b = f.read(65536)
                if not b:
                    return
                done += len(b)
                if fail_after is not None and done > fail_after:
                    raise FileReadError(f"{path}: damaged block at {fail_after}")
                yield b
    return Content(size=size, chunks=chunks)


def items_from_tree(root: Path, prefix: str = "", fail: set[str] | None = None) -> list[Item]:
    """Items in walk order (a directory before its contents), hard-link repeats
    pointing at the first name, like the extract engine produces."""
    out: list[Item] = []
    seen: dict[int, str] = {}

    def visit(path: Path, name: str) -> None:
        e = entry_of(path, "/" + name)
        item = Item(name=name, entry=e)
        if e.kind == FILE:
            if e.nlink > 1 and e.inode in seen:
                item.hardlink_to = seen[e.inode]
            else:
                seen[e.inode] = name
                item.content = _content(path, e.size, 1000 if fail and name in fail else None)
        out.append(item)
        if e.kind == DIR:
            for child in sorted(os.listdir(path)):
                visit(path / child, f"{name}/{child}" if name else child)

    for child in sorted(os.listdir(root)):
        visit(root / child, f"{prefix}{child}")
    return out


def snapshot(root: Path, *, owners=True, xattrs=True, specials=True, dir_mtimes=True,
             hardlinks=True, modes=True) -> dict:
    """Everything comparable about a tree, keyed by relative path."""
    out: dict = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".rescue-partial")]
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            kind = _KINDS[stat.S_IFMT(st.st_mode)]
            if kind in (FIFO, CHAR, BLOCK, SOCKET) and not specials:
                continue
            rec: dict = {"kind": kind}
            if modes and kind != SYMLINK:
                rec["mode"] = oct(stat.S_IMODE(st.st_mode))
            if owners:
                rec["owner"] = (st.st_uid, st.st_gid)
            if kind != DIR or dir_mtimes:
                if kind != SYMLINK or modes:
                    rec["mtime"] = st.st_mtime_ns
            if kind == FILE:
                rec["sha"] = __import__("hashlib").sha256(p.read_bytes()).hexdigest()
                if st.st_nlink > 1:
                    inodes.setdefault(st.st_ino, []).append(rel)
            if kind == SYMLINK:
                rec["target"] = os.readlink(p)
            if kind in (CHAR, BLOCK):
                rec["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
            if xattrs and kind != SYMLINK:
                rec["xattrs"] = {k: os.getxattr(p, k, follow_symlinks=False)
                                 for k in os.listxattr(p, follow_symlinks=False)}
            out[rel] = rec
    if hardlinks:
        out["<hardlinks>"] = sorted(sorted(v) for v in inodes.values() if len(v) > 1)
    return out


class _Server:
    """A server process on 127.0.0.1, started by start(), stopped by stop() or
    at the end of a `with` block. Subclasses set `port` and `argv()`."""

    port: int
    proc: subprocess.Popen | None = None
    start_timeout: float = 10

    def argv(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(self.port, self.proc, timeout=self.start_timeout)
        except RuntimeError:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class RsyncDaemon(_Server):
    """`rsync --daemon --no-detach` on 127.0.0.1 with generated modules."""

    def __init__(self, base: Path, *, tiny: Path | None = None) -> None:
        self.base = base
        self.port = free_port()
        self.open_dir = base / "open"
        self.auth_dir = base / "auth"
        for d in (self.open_dir, self.auth_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.password = "s3cret-Pa55word"
        secrets = base / "secrets"
        secrets.write_text(f"alice:{self.password}\n")
        os.chmod(secrets, 0o600)
        ids = "uid = 0\ngid = 0\n" if IS_ROOT else ""
        conf = (f"pid file = {base}/rsyncd.pid\nuse chroot = {'yes' if IS_ROOT else 'no'}\n"
                "munge symlinks = no\nnumeric ids = yes\n"
                f"log file = {base}/rsyncd.log\n"
                f"[open]\npath = {self.open_dir}\nread only = no\n{ids}"
                f"[auth]\npath = {self.auth_dir}\nread only = no\n{ids}auth users = alice\n"
                f"secrets file = {secrets}\n")
        if tiny is not None:
            conf += f"[tiny]\npath = {tiny}\nread only = no\n{ids}"
        self.conf = base / "rsyncd.conf"
        self.conf.write_text(conf)
        self.start()

    def argv(self) -> list[str]:
        return ["rsync", "--daemon", "--no-detach", f"--config={self.conf}", f"--port={self.port}",
                "--address=127.0.0.1"]

    def url(self, module: str, path: str = "") -> str:
        return f"rsync://127.0.0.1:{self.port}/{module}/{path}"


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


class RcloneSftp(_Server):
    """`rclone serve sftp` of a directory on 127.0.0.1, and the RCLONE_CONFIG_*
    variables that make it the remote `name` for the client."""

    start_timeout = 20

    def __init__(self, base: Path, name: str = "rescuetest") -> None:
        self.base = base
        self.root = base / "served"
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.user, self.password = "rescuer", "rc-Pa55-w0rd-xyz"
        self.name = name
        (base / "rclone.conf").write_text("")
        self.start()
        obscured = subprocess.run(["rclone", "obscure", self.password], capture_output=True, text=True,
                                  check=True).stdout.strip()
        up = name.upper()
        self.env = {"RCLONE_CONFIG": str(base / "rclone.conf"), f"RCLONE_CONFIG_{up}_TYPE": "sftp",
                    f"RCLONE_CONFIG_{up}_HOST": "127.0.0.1", f"RCLONE_CONFIG_{up}_PORT": str(self.port),
                    f"RCLONE_CONFIG_{up}_USER": self.user, f"RCLONE_CONFIG_{up}_PASS": obscured}

    def argv(self) -> list[str]:
        return ["rclone", "serve", "sftp", str(self.root), "--addr", f"127.0.0.1:{self.port}",
                "--user", self.user, "--pass", self.password, "--config", str(self.base / "rclone.conf"),
                "--cache-dir", str(self.base / "cache"), "--dir-cache-time", "0s"]

    def use(self, monkeypatch: pytest.MonkeyPatch) -> "RcloneSftp":
        """Make this server the remote `name` for the rest of the test."""
        for k, v in self.env.items():
            monkeypatch.setenv(k, v)
        return self


class Sshd(_Server):
    """sshd on 127.0.0.1 with its own host key and one client key (key logins
    only); `ssh` is the rsync option that logs in with that key."""

    def __init__(self, base: Path) -> None:
        self.base = base
        for name in ("host", "client"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(base / name)], check=True)
        (base / "authorized_keys").write_text((base / "client.pub").read_text())
        self.port = free_port()
        self.config = base / "sshd_config"
        self.config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {base / 'host'}\nPidFile {base / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {base / 'authorized_keys'}\nStrictModes no\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nPermitRootLogin prohibit-password\n")
        os.makedirs("/run/sshd", exist_ok=True)
        self.ssh = (f"-e ssh -p {self.port} -i {base / 'client'} -o StrictHostKeyChecking=no "
                    "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o BatchMode=yes")
        self.start()

    def argv(self) -> list[str]:
        return ["/usr/sbin/sshd", "-D", "-e", "-f", str(self.config)]


# -- fixtures the rsync and rclone tests share -----------------------------------

@contextlib.contextmanager
def tmpfs(mnt: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` on `mnt` (a remote that fills up); skips unless root may mount."""
    mnt.mkdir(parents=True, exist_ok=True)
    if not IS_ROOT or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                                     capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a tiny tmpfs")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("src") / "vols")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory) -> Iterator[RsyncDaemon]:
    with RsyncDaemon(tmp_path_factory.mktemp("rsyncd")) as d:
        yield d


@pytest.fixture(scope="module")
def rclone_server(tmp_path_factory) -> Iterator[RcloneSftp]:
    with RcloneSftp(tmp_path_factory.mktemp("rclone")) as s:
        yield s


@pytest.fixture(scope="module")
def sshd(tmp_path_factory) -> Iterator[Sshd]:
    if not IS_ROOT or not os.path.exists("/usr/sbin/sshd") or not have("ssh-keygen"):
        pytest.skip("needs root and openssh-server to run a test sshd")
    try:
        server = Sshd(tmp_path_factory.mktemp("sshd"))
    except RuntimeError as e:
        pytest.skip(f"sshd cannot start: {e}")
    with server:
        yield server


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """`rescue extract` of the sample's Docker volumes into a local directory."""
    if not cli_available():
        pytest.skip("needs fixtures/sample-vps.disk and .venv/bin/rescue")
    return reference_extract(tmp_path_factory.mktemp("ref") / "dir")


def send_items(sink, items):
    """Feed a sink as the engine does: an entry the target cannot hold
    (NotWritten: a device node, a FIFO for rclone) is skipped and its name kept
    in `result.not_written`; any other error aborts; else close. The result."""
    from rescue.extract.base import NotWritten
    skipped = []
    try:
        for item in items:
            try:
                sink.add(item)
            except NotWritten as exc:
                skipped.append((item.name, str(exc)))
    except BaseException:
        sink.abort()
        raise
    result = sink.close()
    result.not_written = skipped
    return result


def add_collecting_damaged(sink, items) -> list[str]:
    """Add every item; the names whose FileReadError the sink raised for damage
    (then close); entries the target cannot hold (NotWritten) are not damage."""
    from rescue.extract.base import NotWritten
    raised = []
    try:
        for item in items:
            try:
                sink.add(item)
            except NotWritten:
                pass
            except FileReadError:
                raised.append(item.name)
    finally:
        sink.close()
    return raised


REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "fixtures" / "sample-vps.disk"
RESCUE = REPO / ".venv" / "bin" / "rescue"
VOLUMES = "/var/lib/docker/volumes"
IMPLIED = ("var", "var/lib", "var/lib/docker")   # parents the engine names but does not describe


def rescue_extract(output: str, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(RESCUE), "extract", str(SAMPLE), "--path", VOLUMES, "--devices",
                           "--keep-setuid", "-o", output, *extra],
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=120)


def reference_extract(dest: Path) -> Path:
    r = rescue_extract(str(dest) + "/")
    assert r.returncode == 0, r.stderr
    return dest


def without_implied_mtimes(snap: dict) -> dict:
    for name in IMPLIED:
        if name in snap:
            snap[name].pop("mtime", None)
    return snap


def cli_available() -> bool:
    return SAMPLE.exists() and RESCUE.exists()
