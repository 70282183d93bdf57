"""Shared helpers for the foundation tests: run the CLI, read a tar / a directory /
a kernel mount / the described tree into one record shape, and compare them.

The fixtures and their trees come from scripts/make-fixtures and
scripts/fixture_trees.py (the ground truth)."""

from __future__ import annotations

import contextlib
import decimal
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
import tarfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import pytest

from repo_paths import FIXTURES, REAL_IMAGES, REPO  # noqa: F401 (re-exported)

SAMPLE = FIXTURES / "sample-vps.disk"
FS_DIR = FIXTURES / "fs"
HOSTILE = FIXTURES / "hostile"

sys.path.insert(0, str(REPO / "scripts"))
import fixture_trees as T  # noqa: E402

MANIFEST = json.loads((FS_DIR / "MANIFEST.json").read_text())
TREES = {"EXT_TREE": T.EXT_TREE, "SIMPLE_TREE": T.SIMPLE_TREE, "SAMPLE_TREE": T.SAMPLE_TREE,
         "EFI_TREE": T.EFI_TREE, "NTFS_TREE": T.NTFS_TREE}

IS_ROOT = os.geteuid() == 0


# ------------------------------------------------------------------ running the CLI
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rescue(*args: str, snapshot: Path | None = None, timeout: float = 60, cwd: Path | None = None,
           check_readonly: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m rescue ARGS` with bytes output (`env`: variables added to the
    environment). The snapshot (the first existing file among the arguments
    unless given) must hash the same before and after."""
    if snapshot is None:
        snapshot = next((Path(a) for a in args if not a.startswith("-") and Path(a).is_file()), None)
    before = sha256_file(snapshot) if (check_readonly and snapshot) else None
    # keep the caller's PYTHONPATH after the repo: a user outside the venv's
    # reach runs a system python with the venv's site-packages there
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    res = subprocess.run([sys.executable, "-m", "rescue", *args], capture_output=True, timeout=timeout,
                         env=dict(os.environ, COLUMNS="200", NO_COLOR="1", PYTHONPATH=pythonpath, **(env or {})),
                         cwd=cwd)
    if before is not None:
        assert sha256_file(snapshot) == before, f"{snapshot} changed during: rescue {' '.join(args)}"
    return res


def explain(res: subprocess.CompletedProcess) -> str:
    return (f"rescue {' '.join(map(str, res.args[3:]))} -> exit {res.returncode}\n"
            f"stderr: {res.stderr.decode(errors='replace')[-3000:]}")


def assert_one_line_error(res: subprocess.CompletedProcess) -> None:
    err = res.stderr.decode(errors="replace")
    assert res.returncode == 2, explain(res)
    assert "Traceback" not in err, explain(res)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got {len(lines)}:\n{err}"


# ------------------------------------------------------------------ one record shape
@dataclass
class Rec:
    kind: str                      # file dir symlink fifo char block
    mode: int = 0                  # 07777 bits
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0                  # files only
    sha: str | None = None         # files only
    target: str | None = None      # symlinks
    rdev: tuple[int, int] | None = None
    xattrs: dict[str, bytes] = field(default_factory=dict)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISFIFO, "fifo"), (stat.S_ISCHR, "char"), (stat.S_ISBLK, "block"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "?"


@dataclass
class View:
    """A tree as one reader sees it: records by relative path (no leading '/'),
    hard-link groups (sets of paths sharing an inode), and owner names (tar only)."""
    recs: dict[str, Rec]
    links: list[set[str]] = field(default_factory=list)
    names: dict[str, tuple[str, str]] = field(default_factory=dict)
    sparse_ok: dict[str, bool] = field(default_factory=dict)


def _tar_mtime_ns(member: tarfile.TarInfo) -> int:
    raw = member.pax_headers.get("mtime")
    if raw is not None:
        return int(decimal.Decimal(raw) * 10**9)
    return int(member.mtime) * 10**9


def tar_view(source: Path | bytes) -> View:
    if isinstance(source, bytes):
        import io
        tf = tarfile.open(fileobj=io.BytesIO(source), mode="r:*")
    else:
        tf = tarfile.open(source, mode="r:*")
    recs: dict[str, Rec] = {}
    groups: dict[str, set[str]] = {}
    names: dict[str, tuple[str, str]] = {}
    with tf:
        for m in tf:
            name = m.name.rstrip("/")
            assert name not in recs, f"tar member {name!r} appears twice"
            xattrs = {k[len("SCHILY.xattr."):]: v.encode("utf-8", "surrogateescape")
                      for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")}
            names[name] = (m.uname, m.gname)
            if m.islnk():
                target = m.linkname.rstrip("/")
                assert target in recs, f"hard link {name!r} -> {target!r} before its target"
                recs[name] = replace(recs[target])
                groups.setdefault(target, {target}).add(name)
                continue
            kind = ("file" if m.isreg() else "dir" if m.isdir() else "symlink" if m.issym() else
                    "fifo" if m.isfifo() else "char" if m.ischr() else "block" if m.isblk() else "?")
            rec = Rec(kind, m.mode & 0o7777, m.uid, m.gid, _tar_mtime_ns(m), xattrs=xattrs)
            if kind == "file":
                data = tf.extractfile(m).read()
                rec.size, rec.sha = len(data), hashlib.sha256(data).hexdigest()
            elif kind == "symlink":
                rec.target = m.linkname
            elif kind in ("char", "block"):
                rec.rdev = (m.devmajor, m.devminor)
            recs[name] = rec
    return View(recs, list(groups.values()), names)


def dir_view(root: Path, *, xattrs: bool = True) -> View:
    """The tree under `root` as the kernel shows it (lstat, never following links)."""
    recs: dict[str, Rec] = {}
    inodes: dict[tuple[int, int], set[str]] = {}
    sparse_ok: dict[str, bool] = {}

    def visit(path: Path, rel: str) -> None:
        for entry in sorted(os.scandir(path), key=lambda e: e.name):
            name = f"{rel}/{entry.name}" if rel else entry.name
            st = os.lstat(entry.path)
            rec = Rec(_kind(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns)
            if rec.kind == "file":
                h = hashlib.sha256()
                with open(entry.path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
                rec.size, rec.sha = st.st_size, h.hexdigest()
                sparse_ok[name] = st.st_blocks * 512 < st.st_size
                if st.st_nlink > 1:
                    inodes.setdefault((st.st_dev, st.st_ino), set()).add(name)
            elif rec.kind == "symlink":
                rec.target = os.readlink(entry.path)
            elif rec.kind in ("char", "block"):
                rec.rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
            if xattrs and rec.kind in ("file", "dir"):
                try:
                    rec.xattrs = {k: os.getxattr(entry.path, k, follow_symlinks=False)
                                  for k in os.listxattr(entry.path, follow_symlinks=False)}
                except OSError:
                    rec.xattrs = {}
            recs[name] = rec
            if rec.kind == "dir":
                visit(Path(entry.path), name)

    visit(root, "")
    return View(recs, [g for g in inodes.values() if len(g) > 1], sparse_ok=sparse_ok)


def tree_view(tree: list[T.Node]) -> View:
    recs = {}
    for path, n in T.resolved(tree).items():
        rec = Rec(n.kind, n.mode, n.uid, n.gid, n.mtime_ns_exact, xattrs=dict(n.xattrs))
        if n.kind == "file":
            rec.size, rec.sha = n.apparent_size, n.sha256
        elif n.kind == "symlink":
            rec.target = n.target
        elif n.kind in ("char", "block"):
            rec.rdev = n.rdev
        recs[path.lstrip("/")] = rec
    return View(recs, [{p.lstrip("/") for p in g} for g in T.hardlink_groups(tree)])


# ------------------------------------------------------------------ what each fs keeps
@dataclass
class Caps:
    owners: bool = True            # uid/gid
    modes: bool = True             # permission bits
    mtime_tol_ns: int = 0          # 0 = exact
    dir_mtime: bool = True
    symlinks: bool = True
    xattrs: bool = True
    specials: bool = True          # fifo/char/block
    case_insensitive: bool = False


CAPS = {
    "ext": Caps(),
    # FAT: no owners/modes/links; 2-second mtimes stored as local time (the
    # fixtures were written with TZ=UTC); directory mtimes are kept by mcopy -m
    # but the kernel/tools disagree on them, so only files' mtimes are compared.
    "vfat": Caps(owners=False, modes=False, mtime_tol_ns=2 * 10**9, dir_mtime=False, symlinks=False,
                 xattrs=False, specials=False),
    # exFAT: 10 ms mtimes with a UTC offset; no owners/modes/links.
    "exfat": Caps(owners=False, modes=False, mtime_tol_ns=2 * 10**9, dir_mtime=False, symlinks=False,
                  xattrs=False, specials=False),
    # NTFS (populated through ntfs-3g): 100 ns mtimes; owners/modes are Windows ACLs.
    "ntfs": Caps(owners=False, modes=False, dir_mtime=False, symlinks=False, xattrs=False, specials=False),
}


def caps_for(fstype: str) -> Caps:
    return CAPS["ext"] if fstype.startswith("ext") else CAPS[fstype]


IGNORED_TOP = {"lost+found"}


def compare(got: View, want: View, caps: Caps, *, what: str, ignore: set[str] = IGNORED_TOP,
            sizes_only_for: set[str] = frozenset(), check_links: bool = True,
            skip_kinds: set[str] = frozenset()) -> list[str]:
    """Every difference between two views, as readable lines (empty = equal)."""
    def keep(p: str, r: Rec) -> bool:
        return p != "" and p.split("/")[0] not in ignore and r.kind not in skip_kinds

    g = {p: r for p, r in got.recs.items() if keep(p, r)}
    w = {p: r for p, r in want.recs.items() if keep(p, r)}
    diffs = [f"{what}: missing {p!r} ({w[p].kind})" for p in sorted(set(w) - set(g))]
    diffs += [f"{what}: unexpected {p!r} ({g[p].kind})" for p in sorted(set(g) - set(w))]
    for p in sorted(set(g) & set(w)):
        a, b = g[p], w[p]

        def d(field_: str, x, y) -> None:
            if x != y:
                diffs.append(f"{what}: {p!r} {field_}: got {x!r}, want {y!r}")

        d("kind", a.kind, b.kind)
        if a.kind != b.kind:
            continue
        if caps.modes:
            d("mode", oct(a.mode), oct(b.mode))
        if caps.owners:
            d("uid:gid", (a.uid, a.gid), (b.uid, b.gid))
        if a.kind != "dir" or caps.dir_mtime:
            if abs(a.mtime_ns - b.mtime_ns) > caps.mtime_tol_ns:
                d("mtime_ns", a.mtime_ns, b.mtime_ns)
        if a.kind == "file":
            d("size", a.size, b.size)
            d("sha256", a.sha, b.sha)
        if a.kind == "symlink":
            d("target", a.target, b.target)
        if a.kind in ("char", "block"):
            d("rdev", a.rdev, b.rdev)
        if caps.xattrs and a.kind in ("file", "dir"):
            d("xattrs", a.xattrs, b.xattrs)
    if check_links:
        norm = lambda groups: sorted(sorted(x for x in grp if x in g) for grp in groups)  # noqa: E731
        d_links = (norm(got.links), norm(want.links))
        if d_links[0] != d_links[1]:
            diffs.append(f"{what}: hard-link groups: got {d_links[0]}, want {d_links[1]}")
    return diffs


# ------------------------------------------------------------------ kernel reference
def sfdisk_partitions(image: Path) -> list[dict]:
    out = subprocess.run(["sfdisk", "-J", str(image)], capture_output=True, text=True, check=True).stdout
    parts = json.loads(out)["partitiontable"]["partitions"]
    for p in parts:
        p["number"] = str(int(p["node"][len(str(image)):]))
    return parts


def partition(image: Path, number: str) -> tuple[int, int]:
    """(offset, size) in bytes of partition `number` per sfdisk."""
    p = next(p for p in sfdisk_partitions(image) if p["number"] == number)
    return p["start"] * 512, p["size"] * 512


def can_mount(fstype: str) -> str | None:
    """None when this machine can mount `fstype` read-only, else the reason."""
    if not IS_ROOT:
        return "loop mounts need root"
    if fstype.startswith("ext"):
        fss = Path("/proc/filesystems").read_text()
        return None if fstype in fss.split() else f"kernel has no {fstype} driver"
    if fstype == "ntfs":
        return None if shutil.which("ntfs-3g") and os.path.exists("/dev/fuse") else "no ntfs-3g/FUSE"
    if fstype == "exfat":
        return None if shutil.which("mount.exfat-fuse") and os.path.exists("/dev/fuse") else "no exfat-fuse"
    if fstype == "vfat":
        fss = Path("/proc/filesystems").read_text()
        return None if "vfat" in fss.split() else "kernel has no vfat driver (FAT compared with the described tree)"
    return f"no reference mount for {fstype}"


@contextlib.contextmanager
def loop_device(image: Path, *losetup_args: str) -> Iterator[str]:
    """`image` attached to a free loop device (`-r` for read-only, `-o`, ...); skips the test when losetup cannot."""
    res = subprocess.run(["losetup", "-f", "--show", *losetup_args, str(image)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"losetup failed: {res.stderr.strip()}")
    dev = res.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@contextlib.contextmanager
def mounted(image: Path, fstype: str, mnt: Path, offset: int = 0, size: int | None = None) -> Iterator[Path]:
    """Mount a read-only loop device over (offset, size) of `image` at `mnt`."""
    reason = can_mount(fstype)
    if reason:
        pytest.skip(reason)
    mnt.mkdir(parents=True, exist_ok=True)
    cmd = ["losetup", "-r", "-f", "--show", "-o", str(offset)]
    if size is not None:
        cmd += ["--sizelimit", str(size)]
    loop = subprocess.run(cmd + [str(image)], capture_output=True, text=True, check=True).stdout.strip()
    try:
        if fstype.startswith("ext"):
            mcmd = ["mount", "-t", fstype, "-o", "ro,noload" if fstype != "ext2" else "ro", loop, str(mnt)]
        elif fstype == "ntfs":
            mcmd = ["ntfs-3g", "-o", "ro", loop, str(mnt)]
        elif fstype == "exfat":
            mcmd = ["mount.exfat-fuse", "-o", "ro", loop, str(mnt)]
        else:
            mcmd = ["mount", "-t", fstype, "-o", "ro", loop, str(mnt)]
        res = subprocess.run(mcmd, capture_output=True, text=True)
        if res.returncode:
            pytest.skip(f"cannot mount {fstype}: {res.stderr.strip()}")
        try:
            yield mnt
        finally:
            _umount(mnt)
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)


def _umount(mnt: Path) -> None:
    """umount, retried: a FUSE daemon or a busy machine can hold the mount for
    a moment after the last reader closed it ("target is busy")."""
    for _ in range(20):
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
            return
        time.sleep(0.25)
    subprocess.run(["umount", "-l", str(mnt)], check=True)   # detach it; it goes when no longer busy


def blkid(image: Path, offset: int = 0, size: int | None = None) -> dict[str, str]:
    cmd = ["blkid", "-p", "-o", "export", "-O", str(offset)]
    if size is not None:
        cmd += ["-S", str(size)]
    out = subprocess.run(cmd + [str(image)], capture_output=True, text=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def zstd_decompress(src: Path, dst: Path) -> Path:
    import zstandard
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        zstandard.ZstdDecompressor().copy_stream(fi, fo)
    return dst
