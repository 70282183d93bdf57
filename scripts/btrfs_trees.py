"""What the btrfs tests and fixtures put in a filesystem, and how the kernel sees it.

`populate(root)` fills a mounted btrfs with the cases a reader must get right:
inline and regular files, files bigger than one compressed extent, partial
overwrites (extents referenced with an offset, compressed too), truncation,
sparse files and fallocated ranges (NO_HOLES gaps, prealloc), reflinks, hard
links, symlinks short and long, device nodes, a FIFO and a socket, xattrs,
POSIX ACLs (setfacl), odd names, owners, setuid bits and nanosecond mtimes.
`subvolumes(root)` adds subvolumes, a nested one and snapshots.
`kernel_view(root)` is the os.lstat/listxattr walk the reader is compared with.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import socket
import stat
import subprocess
from pathlib import Path

MTIME = 1_700_000_000_123_456_789


def _write(path: Path, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> None:
    path.write_bytes(data)
    os.chmod(path, mode)
    os.chown(path, uid, gid)


def _text(n: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    words = [b"alpha", b"beta", b"gamma", b"delta", b"server", b"rescue", b"btrfs", b"\n"]
    out = bytearray()
    while len(out) < n:
        out += rnd.choice(words) + b" "
    return bytes(out[:n])


def _random(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def populate(root: Path, seed: int = 1, small: bool = False) -> None:
    """Everything a file tree can hold, written through the kernel (`small`:
    the same cases with less data, for committed fixtures)."""
    root = Path(root)
    big = (600_000 if small else 3 << 20)
    sparse_size = (8 << 20) if small else (64 << 20)
    d = root / "files"
    d.mkdir()
    _write(d / "empty", b"")
    _write(d / "one", b"x")
    _write(d / "inline", _text(1500, seed))                  # inline extent (max_inline 2048)
    _write(d / "sector", _text(4096, seed + 1))
    _write(d / "sector+1", _text(4097, seed + 2))
    _write(d / "text-3m", _text(big, seed + 3))          # many compressed extents
    _write(d / "random-1m", _random(big // 8, seed + 4))      # incompressible: stored plain
    _write(d / "mixed", _text(200_000, seed + 5) + _random(30_000 if small else 70_000, seed + 6)
           + _text(90_000, seed + 7))
    # partial overwrite: the old extent stays referenced on both sides with an offset
    _write(d / "overwritten", _text(1 << 20, seed + 8))
    os.sync()
    with open(d / "overwritten", "r+b") as f:
        f.seek(300_000)
        f.write(_random(50_000, seed + 9))
    _write(d / "truncated", _text(700_000, seed + 10))
    os.sync()
    os.truncate(d / "truncated", 333_333)
    # sparse: data islands in holes (NO_HOLES leaves the gaps implicit)
    with open(d / "sparse", "wb") as f:
        f.truncate(sparse_size)
        for off in (0, sparse_size // 13, sparse_size // 4 + 123, sparse_size - 10):
            f.seek(off)
            f.write(_text(5000, off))
    with open(d / "sparse-tail", "wb") as f:
        f.write(b"head")
        f.truncate(10 << 20)
    with open(d / "fallocated", "wb") as f:
        os.posix_fallocate(f.fileno(), 0, 2 << 20)
        f.seek(1 << 20)
        f.write(_text(10_000, seed + 11))
    subprocess.run(["fallocate", "-l", "1M", "--keep-size", str(d / "sparse-tail")], check=True)
    _write(d / "reflink-src", _random(150_000 if small else 600_000, seed + 12))
    subprocess.run(["cp", "--reflink=always", str(d / "reflink-src"), str(d / "reflink-copy")], check=True)
    with open(d / "reflink-copy", "r+b") as f:
        f.seek(100_000)
        f.write(b"changed in the copy only")
    # links and special files
    os.link(d / "sector", d / "sector-hardlink")
    (root / "elsewhere").mkdir()
    os.link(d / "sector", root / "elsewhere" / "third-name")
    os.symlink("sector", d / "symlink")
    os.symlink("/etc/" + "x" * 3000, d / "symlink-long")
    os.symlink("../nowhere", d / "symlink-dangling")
    os.mkfifo(d / "fifo")
    os.mknod(d / "tty", 0o620 | stat.S_IFCHR, os.makedev(4, 1))
    os.mknod(d / "disk", 0o660 | stat.S_IFBLK, os.makedev(259, 70000))
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(d / "socket"))
    sock.close()
    # owners, modes, xattrs, ACLs
    _write(d / "setuid", b"#!/bin/sh\n", 0o4755, 1000, 1000)
    _write(d / "private", b"secret\n", 0o600, 1001, 27)
    os.setxattr(d / "private", "user.comment", b"hello xattr")
    os.setxattr(d / "private", "user.binary", bytes(range(256)))
    os.setxattr(d / "private", "trusted.overlay", b"y")
    os.setxattr(d / "private", "security.selinux", b"system_u:object_r:admin_home_t:s0\0")
    os.setxattr(d / "private", "user.big", _text(3000, seed + 13))
    os.setxattr(d / "sector", "user.on-hardlink", b"1")
    subprocess.run(["setfacl", "-m", "u:1000:rwx,g:27:r", str(d / "setuid")], check=True)
    (root / "shared").mkdir(mode=0o2775)
    subprocess.run(["setfacl", "-d", "-m", "u:1000:rwx", "-m", "u:1001:rx", str(root / "shared")], check=True)
    _write(root / "shared" / "inherits-acl", b"acl\n")
    # names
    names = root / "names"
    names.mkdir()
    for name in ("with space", "ümlaut-ß", "日本語", "a" * 255, ".hidden", "-dash", "new\nline"):
        _write(names / name, name.encode() + b"\n")
    _write(Path(os.fsdecode(bytes(names).rstrip(b"/") + b"/latin1-\xe9")), b"not utf-8\n")
    deep = root
    for i in range(12):
        deep = deep / f"level{i}"
    deep.mkdir(parents=True)
    _write(deep / "bottom", b"deep\n")
    # a directory with enough names for a multi-leaf DIR_INDEX
    many = root / "many"
    many.mkdir()
    for i in range(120 if small else 1500):
        (many / f"entry-{i:05d}").write_bytes(b"%d\n" % i)
    # fixed times last (writes above moved directory mtimes)
    for i, path in enumerate(sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True)):
        os.utime(path, ns=(MTIME + i * 1_000_003, MTIME + i * 7_777_777), follow_symlinks=False)


def subvolumes(root: Path) -> None:
    """Subvolumes as distributions lay them out, a nested one, and snapshots."""
    root = Path(root)
    run = lambda *a: subprocess.run(["btrfs", *a], check=True, stdout=subprocess.DEVNULL)   # noqa: E731
    run("subvolume", "create", str(root / "@"))
    run("subvolume", "create", str(root / "@home"))
    (root / "@" / "etc").mkdir()
    (root / "@" / "etc" / "hostname").write_text("btrfs-guest\n")
    (root / "@home" / "alice").mkdir()
    (root / "@home" / "alice" / "notes.txt").write_text("alice's notes\n" * 100)
    run("subvolume", "create", str(root / "@" / "var-lib-docker"))
    (root / "@" / "var-lib-docker" / "volume").write_text("nested subvolume\n")
    (root / "@" / ".snapshots").mkdir()
    run("subvolume", "snapshot", "-r", str(root / "@home"), str(root / "@" / ".snapshots" / "home-yesterday"))
    (root / "@home" / "alice" / "notes.txt").write_text("changed after the snapshot\n")
    run("subvolume", "snapshot", str(root / "@"), str(root / "@-snap"))   # holds @/var-lib-docker as an empty dir


def kernel_view(root: Path, with_data: bool = True) -> dict[str, tuple]:
    """path -> (kind, mode, uid, gid, size, mtime_ns, ctime_ns, nlink, link target,
    rdev, xattrs, sha256) as the kernel shows the mounted tree; paths from '/'."""
    root = Path(root)
    out: dict[str, tuple] = {}

    def visit(path: Path, rel: str) -> None:
        st = os.lstat(path)
        kind = _kind(st.st_mode)
        target = os.readlink(path) if kind == "symlink" else None
        rdev = (os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("char", "block") else None
        xattrs = {k: os.getxattr(path, k, follow_symlinks=False) for k in os.listxattr(path, follow_symlinks=False)}
        digest = None
        if kind == "file" and with_data:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            digest = h.hexdigest()
        out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                    st.st_size if kind in ("file", "symlink") else 0, st.st_mtime_ns, st.st_ctime_ns,
                    st.st_nlink, target, rdev, xattrs, digest)
        if kind == "dir":
            for name in os.listdir(path):
                visit(path / name, rel.rstrip("/") + "/" + name)

    visit(root, "/")
    return out


def kernel_links(root: Path) -> set[frozenset[str]]:
    """Groups of paths that are one inode (hard links), as the kernel shows them."""
    groups: dict[tuple[int, int], set[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            groups.setdefault((st.st_dev, st.st_ino), set()).add("/" + str(p.relative_to(root)))
    return {frozenset(g) for g in groups.values() if len(g) > 1}


def _kind(mode: int) -> str:
    return {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFIFO: "fifo",
            stat.S_IFCHR: "char", stat.S_IFBLK: "block", stat.S_IFSOCK: "socket"}[stat.S_IFMT(mode)]


def copy_tree_for_rootdir(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, symlinks=True)
