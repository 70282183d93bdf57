"""The trees the foundation fixtures are built from, and the ground truth the tests check.

`scripts/make-fixtures` materializes these trees (as root, so owners, modes,
device nodes and xattrs are real) and hands them to the real tools
(`mkfs.ext4 -d`, `mcopy`, `ntfs-3g`, ...). The tests import this module to know
what each fixture must contain without needing root or a mount.

A tree is a list of `Node`s. Directories named only as parents of other nodes
get `DEFAULT_DIR` metadata. Times are fixed so every build describes the same tree.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from dataclasses import dataclass, field

EPOCH = 1700000000  # 2023-11-14T22:13:20Z: every mtime below is relative to it

# Fixed identities so fstab, blkid and `inspect` agree build after build.
ROOT_UUID = "3f1c2a4e-8d5b-4c61-9e0a-7b2d1f6c5a90"
ROOT_LABEL = "cloudimg-rootfs"
EFI_VOLID = "A1B2C3D4"             # mkfs.vfat -i; blkid shows "A1B2-C3D4"
EFI_UUID = "A1B2-C3D4"
EFI_LABEL = "UEFI"
DISK_GUID = "6a1e3c55-0b1f-4f4e-8a55-3d2c1b0a9f11"
HOSTILE_SENTINEL = "/tmp/rescue-hostile-sentinel"  # hostile symlinks point here


@dataclass
class Node:
    path: str                      # absolute guest path
    kind: str = "file"             # file, dir, symlink, fifo, char, block, hardlink
    mode: int = -1                 # default: 0o755 for dirs, 0o777 symlinks, 0o644 others
    uid: int = 0
    gid: int = 0
    mtime: float | int = 0         # seconds after EPOCH (int) ...
    mtime_ns: int | None = None    # ... or an exact ns timestamp
    data: bytes = b""
    size: int | None = None        # sparse files: apparent size; data goes at `chunks`
    chunks: list[tuple[int, bytes]] = field(default_factory=list)
    target: str = ""               # symlink target / hardlink: first path of the group
    rdev: tuple[int, int] = (0, 0)
    xattrs: dict[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode == -1:
            self.mode = {"dir": 0o755, "symlink": 0o777}.get(self.kind, 0o644)

    @property
    def mtime_ns_exact(self) -> int:
        if self.mtime_ns is not None:
            return self.mtime_ns
        return (EPOCH + int(self.mtime)) * 10**9

    @property
    def content(self) -> bytes:
        """The file's full bytes (sparse files materialized; keep them small)."""
        if self.size is None:
            return self.data
        buf = bytearray(self.size)
        for off, chunk in self.chunks:
            buf[off:off + len(chunk)] = chunk
        return bytes(buf)

    @property
    def apparent_size(self) -> int:
        return self.size if self.size is not None else len(self.data)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()


DEFAULT_DIR = dict(mode=0o755, uid=0, gid=0, mtime=0)


def pattern(n: int, seed: str) -> bytes:
    """n bytes of text that differ every line, so chunking bugs show up as hash mismatches."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += f"{seed} line {i:08d} {hashlib.md5(f'{seed}{i}'.encode()).hexdigest()}\n".encode()
        i += 1
    return bytes(out[:n])


def _png() -> bytes:
    # A real 1x1 PNG: magic, IHDR, IDAT, IEND (content only matters for the hash).
    return bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360f8cfc0f01f0005000201a5f6"
        "e7e30000000049454e44ae426082")


def _cap_net_raw() -> bytes:
    # struct vfs_cap_data v2: magic_etc (rev 2 | effective), permitted/inheritable lo+hi.
    return struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


PASSWD = b"""root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
www-data:x:33:33:www-data:/var/www:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
postgres:x:999:999:PostgreSQL administrator:/var/lib/postgresql:/bin/bash
alice:x:1000:1000:Alice,,,:/home/alice:/bin/bash
"""
GROUP = b"""root:x:0:
daemon:x:1:
shadow:x:42:
www-data:x:33:
docker:x:998:alice
postgres:x:999:
alice:x:1000:
nogroup:x:65534:
"""
OS_RELEASE = b'''PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
VERSION="12 (bookworm)"
VERSION_CODENAME=bookworm
ID=debian
HOME_URL="https://www.debian.org/"
SUPPORT_URL="https://www.debian.org/support"
BUG_REPORT_URL="https://bugs.debian.org/"
'''
FSTAB = f"""# /etc/fstab: static file system information.
# <file system> <mount point>   <type>  <options>       <dump>  <pass>
UUID={ROOT_UUID} /               ext4    errors=remount-ro 0       1
UUID={EFI_UUID}  /boot/efi       vfat    umask=0077      0       1
""".encode()
OS_PRETTY_NAME = "Debian GNU/Linux 12 (bookworm)"
OS_ID = "debian"

V = "/var/lib/docker/volumes"
PG = f"{V}/myapp_pgdata/_data"
UP = f"{V}/myapp_uploads/_data"

SAMPLE_TREE: list[Node] = [
    # --- /etc: what identifies the guest
    Node("/etc", "dir", mtime=50),
    Node("/etc/os-release", data=OS_RELEASE, mtime=1),
    Node("/etc/hostname", data=b"web-01\n", mtime=2),
    Node("/etc/hosts", data=b"127.0.0.1\tlocalhost\n127.0.1.1\tweb-01\n", mtime=2),
    Node("/etc/fstab", data=FSTAB, mtime=3),
    Node("/etc/passwd", data=PASSWD, mtime=4),
    Node("/etc/group", data=GROUP, mtime=4),
    Node("/etc/shadow", mode=0o640, gid=42, mtime=4,
         data=b"root:*:19675:0:99999:7:::\nalice:$y$j9T$abc$def:19675:0:99999:7:::\n"),
    Node("/etc/docker/daemon.json", data=b'{"log-driver": "json-file"}\n', mtime=5),
    # --- /boot/efi is the EFI partition's mount point (empty on the root fs)
    Node("/boot", "dir", mtime=6),
    Node("/boot/efi", "dir", mtime=6),
    # --- /home/alice with dotfiles and non-ASCII names
    Node("/home/alice", "dir", mode=0o750, uid=1000, gid=1000, mtime=40),
    Node("/home/alice/.bashrc", uid=1000, gid=1000, mtime=7, data=b"alias ll='ls -l'\nexport EDITOR=vim\n"),
    Node("/home/alice/.profile", uid=1000, gid=1000, mtime=7, data=b"[ -f ~/.bashrc ] && . ~/.bashrc\n"),
    Node("/home/alice/.ssh", "dir", mode=0o700, uid=1000, gid=1000, mtime=8),
    Node("/home/alice/.ssh/authorized_keys", mode=0o600, uid=1000, gid=1000, mtime=8,
         data=b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTests alice@laptop\n"),
    Node("/home/alice/café.txt", uid=1000, gid=1000, mtime=9, data="déjà vu\n".encode()),
    Node("/home/alice/Документы", "dir", uid=1000, gid=1000, mtime=10),
    Node("/home/alice/Документы/отчёт 2023.txt", uid=1000, gid=1000, mtime=10,
         data="квартальный отчёт\n".encode()),
    Node("/home/alice/name with\nnewline.txt", uid=1000, gid=1000, mtime=11, data=b"odd name\n"),
    # --- /var/www
    Node("/var/www/html", "dir", uid=33, gid=33, mtime=12),
    Node("/var/www/html/index.html", uid=33, gid=33, mtime=12,
         data=b"<!doctype html><title>web-01</title><h1>It works</h1>\n",
         xattrs={"user.origin": b"deploy-42", "user.checksum": b"sha1:0123abcd"}),
    Node("/var/log/syslog.log", mode=0o640, mtime=13, data=pattern(5000, "syslog")),
    Node("/var/log/nginx", "dir", mtime=13),
    Node("/var/log/nginx/access.log", mode=0o640, uid=33, gid=33, mtime=13, data=pattern(3000, "access")),
    # --- Docker volumes: the precious part
    Node(V, "dir", mode=0o701, mtime=30),
    Node(f"{V}/metadata.db", mode=0o600, mtime=30, data=pattern(4096, "boltdb")),
    Node(f"{V}/myapp_pgdata", "dir", mode=0o755, mtime=20),
    Node(PG, "dir", mode=0o700, uid=999, gid=999, mtime=20),
    Node(f"{PG}/PG_VERSION", mode=0o600, uid=999, gid=999, mtime=14, data=b"15\n"),
    Node(f"{PG}/postgresql.auto.conf", mode=0o600, uid=999, gid=999, mtime=14,
         data=b"# Do not edit this file manually!\nlisten_addresses = '*'\n"),
    Node(f"{PG}/base", "dir", mode=0o700, uid=999, gid=999, mtime=15),
    Node(f"{PG}/base/1", "dir", mode=0o700, uid=999, gid=999, mtime=15),
    Node(f"{PG}/base/1/PG_VERSION", mode=0o600, uid=999, gid=999, mtime=15, data=b"15\n"),
    Node(f"{PG}/base/1/1259", mode=0o600, uid=999, gid=999, mtime=15, data=pattern(8192 * 3, "pg_class")),
    Node(f"{PG}/base/1/2608", mode=0o600, uid=999, gid=999, mtime=15, data=b""),
    Node(f"{PG}/global", "dir", mode=0o700, uid=999, gid=999, mtime=16),
    Node(f"{PG}/global/pg_control", mode=0o600, uid=999, gid=999, mtime=16, data=pattern(8192, "pg_control")),
    Node(f"{PG}/pg_wal", "dir", mode=0o700, uid=999, gid=999, mtime=17),
    # big-ish file: exercises chunked reads (several 1 MiB chunks, uneven tail)
    Node(f"{PG}/pg_wal/000000010000000000000001", mode=0o600, uid=999, gid=999, mtime=17,
         data=pattern(3 * 1024 * 1024 + 12345, "wal")),
    Node(f"{PG}/log", "dir", mode=0o700, uid=999, gid=999, mtime=18),
    Node(f"{PG}/log/postgresql-2023-11-14.log", mode=0o600, uid=999, gid=999, mtime=18,
         data=pattern(2000, "pglog")),
    Node(f"{PG}/pg_tblspc", "dir", mode=0o700, uid=999, gid=999, mtime=19),   # empty directory
    Node(f"{V}/myapp_uploads", "dir", mode=0o755, mtime=21),
    Node(UP, "dir", mode=0o755, uid=33, gid=33, mtime=29),
    Node(f"{UP}/images", "dir", uid=33, gid=33, mtime=22),
    Node(f"{UP}/images/logo.png", uid=33, gid=33, mtime=22, data=_png()),
    Node(f"{UP}/images/logo-hardlink.png", "hardlink", target=f"{UP}/images/logo.png"),
    Node(f"{UP}/images/photo 1.jpg", uid=33, gid=33, mtime=22, data=b"\xff\xd8\xff\xe0" + pattern(20000, "jpeg")),
    Node(f"{UP}/latest.jpg", "symlink", uid=33, gid=33, mtime=23, target="images/photo 1.jpg"),
    Node(f"{UP}/site", "symlink", uid=33, gid=33, mtime=23, target="/var/www/html"),
    Node(f"{UP}/docs", "dir", uid=33, gid=33, mtime=24),
    Node(f"{UP}/docs/readme.txt", uid=33, gid=33, mtime=24, data=b"uploaded files live here\n"),
    Node(f"{UP}/docs/empty.txt", uid=33, gid=33, mtime=24, data=b""),
    Node(f"{UP}/docs/upload.log", uid=33, gid=33, mtime=24, data=b"2023-11-14 upload ok\n"),
    Node(f"{UP}/docs/précis ✓.txt", uid=33, gid=33, mtime=24, data="ünïcödé\n".encode()),
    Node(f"{UP}/docs/precise-mtime.txt", uid=33, gid=33, mtime_ns=(EPOCH + 25) * 10**9 + 123456789,
         data=b"sub-second mtime\n"),
    Node(f"{UP}/cache", "dir", uid=33, gid=33, mtime=26),                  # empty directory
    Node(f"{UP}/tmp", "dir", mode=0o1777, mtime=27),                       # sticky
    Node(f"{UP}/disk.sparse", uid=33, gid=33, mtime=28, size=8 * 1024 * 1024,
         chunks=[(4 * 1024 * 1024, b"DATA-IN-THE-MIDDLE" * 100)]),
    Node(f"{UP}/events.fifo", "fifo", mode=0o600, uid=33, gid=33, mtime=28),
    # --- special files elsewhere
    Node("/dev", "dir", mtime=31),
    Node("/dev/null", "char", mode=0o666, rdev=(1, 3), mtime=31),
    Node("/dev/sda1", "block", mode=0o660, gid=6, rdev=(8, 1), mtime=31),
    Node("/usr/local/bin/suidtool", mode=0o4755, mtime=32, data=b"#!/bin/sh\necho suid\n"),
    Node("/usr/local/bin/pingtool", mode=0o755, mtime=32, data=b"#!/bin/sh\necho ping\n",
         xattrs={"security.capability": _cap_net_raw()}),
    Node("/tmp", "dir", mode=0o1777, mtime=33),
    Node("/root", "dir", mode=0o700, mtime=34),
    Node("/root/.bash_history", mode=0o600, mtime=34, data=b"docker compose up -d\n"),
]

# The EFI system partition (vfat): no owners, 2-second times.
EFI_TREE: list[Node] = [
    Node("/EFI", "dir", mtime=100),
    Node("/EFI/debian", "dir", mtime=100),
    Node("/EFI/debian/grubx64.efi", mtime=100, data=b"MZ" + pattern(30000, "grub")),
    Node("/EFI/debian/grub.cfg", mtime=100, data=f"search.fs_uuid {ROOT_UUID} root\n".encode()),
    Node("/EFI/BOOT", "dir", mtime=100),
    Node("/EFI/BOOT/BOOTX64.EFI", mtime=100, data=b"MZ" + pattern(20000, "shim")),
]

# Small generic tree for the per-filesystem fixtures (ext2/3, FAT, exFAT, NTFS).
# Only what every one of them stores: names, content, dirs, mtimes (even seconds).
SIMPLE_TREE: list[Node] = [
    Node("/readme.txt", mtime=200, data=b"hello from a small filesystem\n"),
    Node("/empty.bin", mtime=202, data=b""),
    Node("/Long File Name.txt", mtime=204, data=b"long names survive\n"),
    Node("/docs", "dir", mtime=220),
    Node("/docs/notes ä.txt", mtime=206, data="umlaut ä\n".encode()),
    Node("/docs/big.dat", mtime=208, data=pattern(70000, "big")),
    Node("/docs/sub", "dir", mtime=210),
    Node("/docs/sub/deep.txt", mtime=210, data=b"deep\n"),
    Node("/emptydir", "dir", mtime=212),
]

# ext2/ext3 also keep owners, modes, links and special files.
EXT_EXTRA: list[Node] = [
    Node("/owned", "dir", mode=0o750, uid=1000, gid=1000, mtime=230),
    Node("/owned/secret", mode=0o600, uid=1000, gid=1000, mtime=231, data=b"s3cret\n"),
    Node("/owned/link", "symlink", mtime=232, target="secret"),
    Node("/owned/abs", "symlink", mtime=232, target="/readme.txt"),
    Node("/owned/hard", "hardlink", target="/owned/secret"),
    Node("/owned/suid", mode=0o4755, mtime=233, data=b"#!/bin/sh\n"),
    Node("/owned/fifo", "fifo", mode=0o644, mtime=234),
    Node("/owned/xattr.txt", mtime=235, data=b"x\n", xattrs={"user.note": b"kept"}),
]
EXT_TREE = SIMPLE_TREE + EXT_EXTRA

# NTFS also stores files compressed (LZNT1) when their directory asks for it:
# scripts/make-fixtures sets FILE_ATTRIBUTE_COMPRESSED on these directories first.
NTFS_COMPRESSED_DIRS = {"/compressed"}
NTFS_TREE = SIMPLE_TREE + [
    Node("/compressed", "dir", mtime=250),
    Node("/compressed/big-compressed.dat", mtime=251, data=pattern(200000, "ntfscomp")),
    Node("/compressed/small.txt", mtime=252, data=b"compressed dir, small file\n"),
]


def with_marker(tree: list[Node], text: str) -> list[Node]:
    """A tree plus /volume.txt naming the volume, so tests can tell volumes apart."""
    return tree + [Node("/volume.txt", mtime=240, data=f"{text}\n".encode())]


def all_nodes(tree: list[Node]) -> dict[str, Node]:
    """Every path of the tree, implicit parent directories included (not '/')."""
    out: dict[str, Node] = {}
    for node in tree:
        parts = node.path.strip("/").split("/")
        for i in range(1, len(parts)):
            parent = "/" + "/".join(parts[:i])
            if parent not in out and not any(n.path == parent for n in tree):
                out[parent] = Node(parent, "dir", **DEFAULT_DIR)
        out[node.path] = node
    return out


def resolved(tree: list[Node]) -> dict[str, Node]:
    """all_nodes with hard links replaced by their group's first node (same metadata),
    keyed by every name."""
    nodes = all_nodes(tree)
    return {p: (nodes[n.target] if n.kind == "hardlink" else n) for p, n in nodes.items()}


def hardlink_groups(tree: list[Node]) -> list[set[str]]:
    groups: dict[str, set[str]] = {}
    for n in tree:
        if n.kind == "hardlink":
            groups.setdefault(n.target, {n.target}).add(n.path)
    return list(groups.values())


def materialize(tree: list[Node], root: str, *, owners: bool = True, specials: bool = True,
                xattrs: bool = True) -> None:
    """Create the tree under `root` (run as root for owners, devices, security.* xattrs)."""
    nodes = all_nodes(tree)
    for path, node in nodes.items():
        host = os.path.join(root, path.lstrip("/"))
        os.makedirs(os.path.dirname(host), exist_ok=True)
        if node.kind == "dir":
            os.makedirs(host, exist_ok=True)
        elif node.kind == "file":
            with open(host, "wb") as f:
                if node.size is None:
                    f.write(node.data)
                else:
                    f.truncate(node.size)          # holes everywhere but the chunks
                    for off, chunk in node.chunks:
                        f.seek(off)
                        f.write(chunk)
        elif node.kind == "symlink":
            os.symlink(node.target, host)
        elif node.kind == "hardlink":
            os.link(os.path.join(root, node.target.lstrip("/")), host)
            continue
        elif node.kind == "fifo":
            if not specials:
                continue
            os.mkfifo(host)
        elif node.kind in ("char", "block"):
            if not specials:
                continue
            kind = stat.S_IFCHR if node.kind == "char" else stat.S_IFBLK
            os.mknod(host, kind | node.mode, os.makedev(*node.rdev))
        if owners:
            os.lchown(host, node.uid, node.gid)
        if node.kind != "symlink":
            os.chmod(host, node.mode)   # after chown: chown clears setuid
        if xattrs:                      # after chown: chown drops security.capability
            for name, value in node.xattrs.items():
                os.setxattr(host, name, value, follow_symlinks=False)
    # Times last, deepest first, so creating children does not bump a parent's mtime.
    for path in sorted(nodes, key=lambda p: -p.count("/")):
        node = nodes[path]
        if node.kind == "hardlink":
            continue
        host = os.path.join(root, path.lstrip("/"))
        if not specials and node.kind in ("fifo", "char", "block"):
            continue
        t = node.mtime_ns_exact
        os.utime(host, ns=(t, t), follow_symlinks=False)
    os.utime(root, ns=((EPOCH + 60) * 10**9,) * 2)
