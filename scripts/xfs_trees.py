"""What goes into the XFS test images, and how the kernel sees them.

Shared by scripts/make-xfs-fixtures (committed fixtures) and the tests that
build images at run time (tests/fs/test_fs_xfs_kernel.py). `populate()` writes
through a real loop mount (root only); `kernel_view()` reads a (read-only)
mount back into the record shape the tests compare with the native reader.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import stat
import subprocess
from pathlib import Path
from typing import Iterator

MiB = 1 << 20

# name -> (mkfs.xfs arguments, image size, what the variant proves)
VARIANTS: dict[str, tuple[list[str], int, str]] = {
    "v5": ([], 64 * MiB, "default v5: crc, ftype, sparse inodes, bigtime, reflink, finobt"),
    "v4": (["-m", "crc=0", "-n", "ftype=0"], 64 * MiB, "v4 superblock, v2 inodes, no ftype, no CRCs"),
    "noftype": (["-m", "crc=0", "-n", "ftype=0", "-i", "size=256"], 64 * MiB, "v4, 256-byte inodes"),
    "b1k": (["-b", "size=1024", "-m", "reflink=0"], 64 * MiB, "1 KiB blocks: remote symlinks, deep bmbt"),
    "dir16k": (["-n", "size=16384"], 64 * MiB, "directory blocks 4x the block size"),
    "nrext64": (["-i", "nrext64=1", "-m", "bigtime=1"], 64 * MiB, "64-bit extent counters"),
    "nobigtime": (["-m", "bigtime=0,reflink=0"], 64 * MiB, "classic timestamps, no reflink"),
    "b64k": (["-b", "size=65536"], 512 * MiB, "64 KiB blocks (larger than the page)"),
    "rmapbt": (["-m", "rmapbt=1"], 64 * MiB, "reverse-mapping btree"),
}

ODD_NAMES = [bytes(range(1, 47)), bytes(range(48, 128)), bytes(range(128, 256)),
             b"\xff\xfe not utf-8 \x80", "caf\u00e9 \u65e5\u672c".encode(), b" lead and trail ", b"-dash",
             b"new\nline", b"tab\there"]


def mkfs(image: Path, args: list[str], size: int, label: str = "xfstest") -> str | None:
    """Make an XFS image; None, or why mkfs refused (old/new xfsprogs, v4 disabled)."""
    with open(image, "wb") as f:
        f.truncate(size)
    # xfsprogs >= 5.19 refuses filesystems under 300 MiB outside fstests; these
    # variables are its documented way to allow small test filesystems.
    env = dict(os.environ, TEST_DIR="1", TEST_DEV="1", QA_CHECK_FS="1")
    proc = subprocess.run(["mkfs.xfs", "-q", "-f", "-L", label, *args, str(image)], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        return (proc.stderr.strip().splitlines() or ["mkfs.xfs failed"])[0]
    return None


@contextlib.contextmanager
def mounted(image: Path, mnt: Path, readonly: bool = False) -> Iterator[Path]:
    mnt.mkdir(parents=True, exist_ok=True)
    opts = "loop,ro,norecovery" if readonly else "loop"
    proc = subprocess.run(["mount", "-t", "xfs", "-o", opts, str(image), str(mnt)], capture_output=True, text=True)
    if proc.returncode:
        raise OSError(f"mount {image}: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _write_at(path: Path, pieces: list[tuple[int, bytes]], size: int | None = None) -> None:
    with open(path, "wb") as f:
        for off, data in pieces:
            f.seek(off)
            f.write(data)
        if size is not None:
            f.truncate(size)


def text_bytes(rnd: random.Random, n: int) -> bytes:
    """Compressible but position-unique bytes (committed fixtures stay small): a misplaced
    sector still shows."""
    start = rnd.randrange(1 << 40)
    tag = b"%015x\n" + bytes(512 - 16)   # every 512-byte sector names itself
    return b"".join(tag % (start + i) for i in range(n // 512 + 1))[:n]


def populate(root: Path, *, block_size: int = 4096, bigtime: bool = True, big_dirs: tuple[int, ...] = (),
             fragments: int = 300, seed: int = 1, compressible: bool = False) -> None:
    """Fill a mounted XFS with every shape the reader must handle."""
    rnd = random.Random(seed)
    if compressible:
        rnd.randbytes = lambda n: text_bytes(rnd, n)  # type: ignore[method-assign]
    # directories in each form: shortform (5), block (40), leaf/node (500), more on request
    for n in (0, 5, 40, 500, *big_dirs):
        d = root / f"dir{n}"
        d.mkdir()
        for i in range(n):
            (d / f"entry-{i:06d}-{'x' * (i % 37)}").write_bytes(b"%d\n" % i if i % 50 == 0 else b"")
    # files: empty, tiny, one block, many blocks of random data
    files = root / "files"
    files.mkdir()
    (files / "empty").write_bytes(b"")
    (files / "tiny").write_bytes(b"hello\n")
    (files / "random-1m").write_bytes(rnd.randbytes(MiB + 123))
    # sparse: data islands in a large hole, and a file that is only a hole
    _write_at(files / "sparse", [(0, b"start"), (5 * MiB, rnd.randbytes(70000)), (9 * MiB + 17, b"end")])
    _write_at(files / "all-hole", [], size=3 * MiB)
    # fragmented: every other block written -> `fragments` extents (btree fork, multi-level with 1 KiB blocks)
    _write_at(files / "fragmented", [(2 * i * block_size, rnd.randbytes(block_size // 2 + 1))
                                     for i in range(fragments)])
    # preallocated (unwritten) ranges, inside and beyond EOF
    with open(files / "fallocated", "wb") as f:
        f.write(rnd.randbytes(10000))
        os.posix_fallocate(f.fileno(), 64 * 1024, 256 * 1024)
        f.seek(600 * 1024)
        f.write(b"after the preallocation")
    with open(files / "prealloc-keep-size", "wb") as f:
        f.write(b"small file with blocks reserved past EOF")
        subprocess.run(["fallocate", "-n", "-o", "4096", "-l", "1M", f.name], check=True)
    # punched holes in random data
    pf = files / "punched"
    pf.write_bytes(rnd.randbytes(40 * block_size))
    for i in range(1, 40, 3):
        subprocess.run(["fallocate", "-p", "-o", str(i * block_size), "-l", str(block_size), str(pf)], check=True)
    # a reflinked copy (shared extents) where the filesystem has reflink
    subprocess.run(["cp", "--reflink=always", str(files / "random-1m"), str(files / "reflinked")],
                   stderr=subprocess.DEVNULL)
    # owners, modes
    own = root / "owners"
    own.mkdir()
    for name, uid, gid, mode in (("root", 0, 0, 0o644), ("user", 1000, 1000, 0o600),
                                 ("big-ids", 4_000_000_000, 3_999_999_999, 0o640),
                                 ("setuid", 0, 0, 0o4755), ("setgid", 0, 50, 0o2711),
                                 ("nothing", 5, 5, 0o000)):
        p = own / name
        p.write_bytes(name.encode())
        os.chown(p, uid, gid)
        os.chmod(p, mode)
    sticky = own / "sticky-dir"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    # special files
    sp = root / "special"
    sp.mkdir()
    os.mkfifo(sp / "fifo")
    os.mknod(sp / "chardev", 0o620 | stat.S_IFCHR, os.makedev(4, 64))
    os.mknod(sp / "blockdev", 0o660 | stat.S_IFBLK, os.makedev(259, 70000))
    os.mknod(sp / "bigdev", 0o600 | stat.S_IFCHR, os.makedev(511, 262143))
    # symlinks of 1 .. 1023 bytes (inline, remote, multi-block remote with 1 KiB blocks)
    ln = root / "links"
    ln.mkdir()
    for n in (1, 2, 59, 60, 100, 250, 500, 1000, 1023):
        target = ("t" * n)[:n]
        os.symlink(target, ln / f"len{n}")
    os.symlink("../files/tiny", ln / "relative")
    os.symlink("/etc/passwd", ln / "absolute")
    os.symlink(os.fsdecode(b"odd-\xff-target"), ln / "odd-target")
    # hard links
    hl = root / "hardlinks"
    hl.mkdir()
    (hl / "a").write_bytes(b"shared content\n")
    os.link(hl / "a", hl / "b")
    os.link(hl / "a", root / "files" / "c-elsewhere")
    # odd names (every byte 0x01-0xff except '/')
    on = root / "names"
    on.mkdir()
    for name in ODD_NAMES:
        (on / os.fsdecode(name.replace(b"/", b"_"))).write_bytes(name)
    # xattrs tiny to 64 KiB; many (leaf/node attr forks); namespaces; ACLs
    xa = root / "xattrs"
    xa.mkdir()
    small = xa / "small"
    small.write_bytes(b"x")
    os.setxattr(small, "user.a", b"1")
    os.setxattr(small, "user.empty", b"")
    os.setxattr(small, "trusted.t", b"trusted value")
    os.setxattr(small, "security.s", b"security value")
    large = xa / "large"
    large.write_bytes(b"y")
    for i, n in enumerate((100, 1000, 3000, 4000, 5000, 20000, 65536)):
        os.setxattr(large, f"user.v{i}-{n}", rnd.randbytes(n))
    many = xa / "many"
    many.write_bytes(b"z")
    for i in range(300):
        os.setxattr(many, f"user.attr-{i:04d}-{'n' * (i % 50)}", b"v" * (i % 200))
    os.setxattr(xa, "user.on-a-dir", b"dir value")
    acl = xa / "acl-file"
    acl.write_bytes(b"acl")
    subprocess.run(["setfacl", "-m", "u:1000:rw,g:50:r,u:4000000000:x", str(acl)], check=True)
    acld = xa / "acl-dir"
    acld.mkdir()
    subprocess.run(["setfacl", "-m", "u:1000:rwx", "-d", "-m", "u:1000:rx,g::r", str(acld)], check=True)
    (acld / "inherits").write_bytes(b"inherited ACL\n")
    # timestamps with nanoseconds, before 1970, after 2038 (bigtime only)
    ts = root / "times"
    ts.mkdir()
    stamps = {"ns": 1_600_000_000_123_456_789, "pre-1970": -86_400 * 365 * 10 * 10**9 + 5,
              "y2038": (2**31 - 1) * 10**9 + 999_999_999}
    if bigtime:
        stamps["y2100"] = 4_102_444_800 * 10**9 + 42
    for name, ns in stamps.items():
        p = ts / name
        p.write_bytes(name.encode())
        os.utime(p, ns=(ns, ns))
    os.utime(ts / "ns", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789), follow_symlinks=False)


def kernel_view(root: Path, with_data: bool = True) -> dict[str, tuple]:
    """path -> (kind, mode, uid, gid, size, mtime_ns, ctime_ns, nlink, inode, link target,
    rdev, xattrs, sha256) for everything under a mount, as the kernel reports it."""
    out: dict[str, tuple] = {}
    base = os.fsencode(root)

    def visit(rel: bytes) -> None:
        full = base + rel if rel else base
        st = os.lstat(full)
        mode = st.st_mode
        kind = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFIFO: "fifo",
                stat.S_IFCHR: "char", stat.S_IFBLK: "block", stat.S_IFSOCK: "socket"}[stat.S_IFMT(mode)]
        try:
            names = os.listxattr(full, follow_symlinks=False)
        except OSError:
            names = []
        # The kernel shows an XFS ACL twice to root: as system.posix_acl_* and as the raw
        # trusted.SGI_ACL_* attribute behind it. The reader gives the portable one only.
        xattrs = {n: os.getxattr(full, n, follow_symlinks=False) for n in names
                  if n not in ("trusted.SGI_ACL_FILE", "trusted.SGI_ACL_DEFAULT")}
        target = os.fsdecode(os.readlink(full)) if kind == "symlink" else None
        rdev = (os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("char", "block") else None
        digest = None
        if kind == "file" and with_data:
            h = hashlib.sha256()
            with open(full, "rb") as f:
                for chunk in iter(lambda: f.read(MiB), b""):
                    h.update(chunk)
            digest = h.hexdigest()
        path = os.fsdecode(rel) or "/"
        out[path] = (kind, stat.S_IMODE(mode), st.st_uid, st.st_gid, st.st_size if kind in ("file", "dir", "symlink") else 0,
                     st.st_mtime_ns, st.st_ctime_ns, st.st_nlink, st.st_ino, target, rdev, xattrs, digest)
        if kind == "dir":
            for name in sorted(os.listdir(full)):
                visit(rel + b"/" + name)

    visit(b"")
    return out


def to_json(view: dict[str, tuple]) -> dict:
    """A view as JSON (xattr values hex) for the fixtures' manifest."""
    out = {}
    for path, rec in view.items():
        rec = list(rec)
        rec[10] = list(rec[10]) if rec[10] else None
        rec[11] = {k: v.hex() for k, v in rec[11].items()}
        out[path] = rec
    return out


def from_json(data: dict) -> dict[str, tuple]:
    out = {}
    for path, rec in data.items():
        rec = list(rec)
        rec[10] = tuple(rec[10]) if rec[10] else None
        rec[11] = {k: bytes.fromhex(v) for k, v in rec[11].items()}
        out[path] = tuple(rec)
    return out


def proto_tree(workdir: Path) -> tuple[str, dict[str, tuple]]:
    """A mkfs.xfs -p prototype file (for v4 images, which this kernel may refuse to
    mount) and the view it must produce; fields mkfs chooses (times, inode
    numbers, nlink) are None. Names in a prototype cannot hold spaces."""
    rnd = random.Random(4)
    lines = ["/dev/null", "0 0", "d--755 0 0"]
    view: dict[str, tuple] = {"/": ("dir", 0o755, 0, 0, None, None, None, None, None, None, None, {}, None)}
    workdir.mkdir(parents=True, exist_ok=True)

    def file(path: str, name: str, data: bytes, mode: str = "---644", uid: int = 0, gid: int = 0) -> None:
        src = workdir / f"src{len(view)}"
        src.write_bytes(data)
        lines.append(f"{name} -{mode[1:]} {uid} {gid} {src}")
        perm = int(mode[3:], 8) | (0o4000 if mode[1] == "u" else 0) | (0o2000 if mode[2] == "g" else 0)
        view[f"{path}/{name}".replace("//", "/")] = ("file", perm, uid, gid, len(data), None, None, None, None,
                                                     None, None, {}, hashlib.sha256(data).hexdigest())

    def directory(path: str, name: str, mode: int = 0o755) -> str:
        lines.append(f"{name} d--{mode:03o} 0 0")
        full = f"{path}/{name}".replace("//", "/")
        view[full] = ("dir", mode, 0, 0, None, None, None, None, None, None, None, {}, None)
        return full

    for n in (5, 40, 500, 1000):
        d = directory("/", f"dir{n}")
        for i in range(n):
            file(d, f"entry-{i:06d}-{'x' * (i % 37)}", b"%d\n" % i if i % 50 == 0 else b"")
        lines.append("$")
    d = directory("/", "files")
    file(d, "empty", b"")
    file(d, "data", text_bytes(rnd, 300_000))
    file(d, "setuid", b"s", "-u-755")
    file(d, "setgid", b"g", "--g750", 1000, 50)
    file(d, "owned", b"o", "---600", 4_000_000_000, 3_999_999_999)
    for kind, name, extra, rdev in (("c", "chardev", "4 64", (4, 64)), ("b", "blockdev", "259 3", (259, 3)),
                                    ("p", "fifo", "", None)):
        lines.append(f"{name} {kind}--640 0 6 {extra}".rstrip())
        view[f"{d}/{name}"] = ({"c": "char", "b": "block", "p": "fifo"}[kind], 0o640, 0, 6, 0, None, None,
                               None, None, None, rdev, {}, None)
    for n in (1, 60, 200, 1023):
        lines.append(f"len{n} l--777 0 0 {'t' * n}")
        view[f"{d}/len{n}"] = ("symlink", 0o777, 0, 0, n, None, None, None, None, "t" * n, None, {}, None)
    lines.append("$")
    lines.append("$")
    return "\n".join(lines) + "\n", view
