"""The native XFS reader, differential against the kernel, on images built now.

Each variant: mkfs.xfs with its options, filled through a real read-write loop
mount (scripts/xfs_trees.populate), unmounted, then the kernel's read-only view
(lstat, readlink, listxattr/getxattr, file bytes) must equal the reader's, entry
for entry. One variant also goes through `rescue extract` and is compared with
GNU tar --xattrs --acls --numeric-owner of the read-only mount. The big case
(50 000 entries in one directory) is built here too, never committed.

Needs root (loop mounts) and mkfs.xfs; skips with the reason otherwise. v4
(crc=0) images cannot be filled this way when the kernel lacks
CONFIG_XFS_SUPPORT_V4: those are covered by mkfs.xfs -p (test_v4_prototype_*).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tarfile
from pathlib import Path

import pytest

import xfs_support as S
from common_support import rescue
from rescue.fs.xfs import XfsFileSystem
from rescue.source.base import FileSource

T = S.xfs_trees
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="filling XFS images needs loop mounts (root)"),
    pytest.mark.skipif(shutil.which("mkfs.xfs") is None, reason="mkfs.xfs (xfsprogs) is not installed"),
]


def _block_size(args: list[str]) -> int:
    for flag, value in zip(args, args[1:]):
        if flag == "-b" and value.startswith("size="):
            return int(value[5:])
    return 4096


def _build(tmp: Path, name: str, big_dirs: tuple[int, ...] = (), fragments: int = 300,
           size: int | None = None) -> tuple[Path, dict]:
    args, default_size, _why = T.VARIANTS[name]
    size = size or default_size
    image = tmp / f"{name}.img"
    refused = T.mkfs(image, args, size)
    if refused:
        pytest.skip(f"mkfs.xfs {' '.join(args)} refused here: {refused}")
    try:
        with T.mounted(image, tmp / "mnt"):
            T.populate(tmp / "mnt", block_size=_block_size(args), big_dirs=big_dirs, fragments=fragments,
                       bigtime="bigtime=0" not in " ".join(args))
        with T.mounted(image, tmp / "mnt", readonly=True):
            view = T.kernel_view(tmp / "mnt")
    except OSError as exc:
        also = " (v4 is covered by test_v4_prototype_images)" if "crc=0" in args else ""
        pytest.skip(f"this kernel cannot mount the {name} variant{also}: {exc}")
    return image, view


@pytest.mark.parametrize("name", sorted(T.VARIANTS))
def test_reader_equals_kernel(tmp_path, name):
    image, kernel = _build(tmp_path, name)
    fs = XfsFileSystem(FileSource(image))
    got = S.reader_view(fs)
    assert len(got) == len(kernel) > 600
    assert S.differences(kernel, got) == []


def test_fifty_thousand_entries_and_a_deep_extent_tree(tmp_path):
    """A btree-form directory of 50 000 names and a 6000-extent file (two-level bmbt at 4 KiB)."""
    image, kernel = _build(tmp_path, "v5", big_dirs=(50_000,), fragments=6000, size=512 << 20)
    fs = XfsFileSystem(FileSource(image))
    got = S.reader_view(fs)
    assert len(fs.listdir("/dir50000")) == 50_000
    assert S.differences(kernel, got) == []
    seen = S.forms(fs)
    assert {"dir:btree", "dir:node", "bmbt-levels-2"} <= seen, seen


# -- rescue extract vs GNU tar of the read-only mount ----------------------------------------
_ACL_TAGS = {1: "user", 2: "user", 4: "group", 8: "group", 0x10: "mask", 0x20: "other"}


def _acl_text(blob: bytes) -> str:
    """posix_acl_xattr blob -> the text GNU tar stores in SCHILY.acl.* (numeric ids)."""
    out = []
    for i in range((len(blob) - 4) // 8):
        tag, perm, ident = struct.unpack_from("<HHI", blob, 4 + 8 * i)
        who = str(ident) if tag in (2, 8) else ""
        out.append(f"{_ACL_TAGS[tag]}:{who}:" + "".join(c if perm & b else "-" for c, b in zip("rwx", (4, 2, 1))))
    return ",".join(out)


def _acl_norm(text: str) -> tuple:
    """GNU tar writes ACLs as acl_to_text does (newlines, user names); ours may be
    comma-separated with numeric ids: compare as sorted (tag, numeric id, perms)."""
    import grp
    import pwd

    out = []
    for item in text.replace(",", "\n").splitlines():
        item = item.split("#", 1)[0].strip()
        if not item:
            continue
        tag, qual, perm = item.split(":")
        if qual and not qual.isdigit():
            qual = str(pwd.getpwnam(qual).pw_uid if tag == "user" else grp.getgrnam(qual).gr_gid)
        out.append((tag, qual, perm))
    return tuple(sorted(out))


def _members(path: Path) -> dict[str, tuple]:
    out = {}
    with tarfile.open(path) as tf:
        for m in tf:
            name = m.name.removeprefix("./").rstrip("/")
            if not name or name == ".":
                continue
            pax = m.pax_headers
            xattrs = {k[13:]: v for k, v in pax.items()
                      if k.startswith("SCHILY.xattr.") and not k.startswith("SCHILY.xattr.system.posix_acl")}
            acls = {k[11:]: _acl_norm(v) for k, v in pax.items() if k.startswith("SCHILY.acl.")}
            for key, kind in (("SCHILY.xattr.system.posix_acl_access", "access"),
                              ("SCHILY.xattr.system.posix_acl_default", "default")):
                if key in pax and kind not in acls:
                    acls[kind] = _acl_norm(_acl_text(pax[key].encode("utf-8", "surrogateescape")))
            mtime = pax.get("mtime", str(m.mtime))
            data = None
            if m.isreg():
                data = tf.extractfile(m).read()
            out[name] = (m.type if m.type != tarfile.AREGTYPE else tarfile.REGTYPE, m.mode & 0o7777,
                         m.uid, m.gid, mtime.rstrip("0").rstrip(".") if "." in mtime else mtime,
                         m.linkname if m.issym() or m.islnk() else None,
                         (m.devmajor, m.devminor) if m.ischr() or m.isblk() else None,
                         xattrs, acls, data)
    return out


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar is not installed")
def test_extract_equals_gnu_tar_of_the_mount(tmp_path):
    image, _kernel = _build(tmp_path, "v5")
    ref = tmp_path / "gnu.tar"
    with T.mounted(image, tmp_path / "mnt", readonly=True):
        subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--acls", "--numeric-owner", "--format=posix",
                        "-cf", str(ref), "-C", str(tmp_path / "mnt"), "."], check=True)
    out = tmp_path / "rescue.tar"
    res = rescue("extract", str(image), "-o", str(out), "--keep-setuid", timeout=300)
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    want, got = _members(ref), _members(out)
    assert set(got) == set(want)
    bad = []
    for name in sorted(want):
        w, g = want[name], got[name]
        if w[5] is not None and w[0] == tarfile.LNKTYPE:
            # hard links: which name carries the data is tar's walk order; same group is what counts
            continue
        # GNU tar keeps trusted.SGI_ACL_* (root sees the raw XFS ACL); the reader gives it as the ACL only
        wx = {k: v for k, v in w[7].items() if not k.startswith("trusted.SGI_ACL")}
        fields = ("type", "mode", "uid", "gid", "mtime", "link", "rdev", "xattrs", "acls", "data")
        bad += [f"{name!r} {f}: gnu={a!r:.150} rescue={b!r:.150}"
                for f, a, b in zip(fields, (*w[:7], wx, *w[8:]), g) if a != b]
    assert bad == []


@pytest.mark.parametrize("args", [
    ["-m", "crc=0", "-n", "ftype=0"],
    ["-m", "crc=0", "-n", "ftype=1", "-b", "size=512"],
    ["-m", "crc=0", "-i", "size=512", "-b", "size=2048", "-n", "size=8192"],
], ids=["v4-noftype", "v4-512B-blocks", "v4-2k-dir8k"])
def test_v4_prototype_images(tmp_path, args):
    """v4 filled by mkfs.xfs -p (a real tool, no mount needed): the reader must
    show the prototype's tree; times and inode numbers are mkfs's, not compared."""
    proto, want = T.proto_tree(tmp_path / "src")
    (tmp_path / "proto").write_text(proto)
    image = tmp_path / "v4.img"
    refused = T.mkfs(image, [*args, "-p", str(tmp_path / "proto")], 64 << 20)
    if refused:
        pytest.skip(f"mkfs.xfs {' '.join(args)} refused here: {refused}")
    fs = XfsFileSystem(FileSource(image))
    assert fs.info.details["version"] == 4
    got = {p: tuple(None if w is None else g for g, w in zip(rec, want.get(p, rec)))
           for p, rec in S.reader_view(fs).items()}
    assert S.differences(want, got) == []


def test_dirty_log_after_a_crash_is_read_with_a_warning(tmp_path, caplog):
    """xfs_io's shutdown (the XFS_IOC_GOINGDOWN a dying server amounts to) leaves the
    log dirty: the reader opens it, warns, and sees what the kernel's norecovery
    mount sees: what reached its place on disk (here: what a freeze flushed)."""
    import logging

    if shutil.which("xfs_io") is None or shutil.which("xfs_freeze") is None:
        pytest.skip("xfs_io and xfs_freeze are needed")
    image = tmp_path / "crash.img"
    refused = T.mkfs(image, [], 64 << 20)
    if refused:
        pytest.skip(refused)
    mnt = tmp_path / "mnt"
    with T.mounted(image, mnt):
        (mnt / "before").mkdir()
        for i in range(50):
            (mnt / "before" / f"f{i}").write_bytes(b"flushed before the crash %d\n" % i)
        subprocess.run(["xfs_freeze", "-f", str(mnt)], check=True)    # metadata written in place
        subprocess.run(["xfs_freeze", "-u", str(mnt)], check=True)
        (mnt / "after").write_bytes(b"written, then the server died\n")
        subprocess.run(["sync"], check=True)
        subprocess.run(["xfs_io", "-x", "-c", "shutdown", str(mnt)], check=True)
    with caplog.at_level(logging.WARNING):
        fs = XfsFileSystem(FileSource(image))
    assert fs.info.details["log"] == "dirty"
    assert "log is dirty" in caplog.text
    with T.mounted(image, mnt, readonly=True):     # ro,norecovery: the log is not replayed
        kernel = T.kernel_view(mnt)
    assert len(kernel) > 50 and S.differences(kernel, S.reader_view(fs)) == []


def test_realtime_file_is_skipped_with_the_reason(tmp_path):
    """A file whose data lies on the realtime device: FileReadError naming it; the rest reads."""
    from rescue.fs.base import FileReadError

    if shutil.which("xfs_io") is None or shutil.which("losetup") is None:
        pytest.skip("xfs_io and losetup are needed")
    image, rt = tmp_path / "data.img", tmp_path / "rt.img"
    with open(rt, "wb") as f:
        f.truncate(32 << 20)
    loop = subprocess.run(["losetup", "-f", "--show", str(rt)], capture_output=True, text=True)
    if loop.returncode:
        pytest.skip(f"no loop device for the realtime volume: {loop.stderr.strip()}")
    dev = loop.stdout.strip()
    try:
        refused = T.mkfs(image, ["-r", f"rtdev={dev}"], 64 << 20)
        if refused:
            pytest.skip(refused)
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        mount = subprocess.run(["mount", "-o", f"loop,rtdev={dev}", str(image), str(mnt)],
                               capture_output=True, text=True)
        if mount.returncode:
            pytest.skip(f"this kernel cannot mount a realtime XFS (CONFIG_XFS_RT?): {mount.stderr.strip()}")
        try:
            subprocess.run(["xfs_io", "-f", "-c", "chattr +r", "-c", "pwrite -S 0x61 0 65536", str(mnt / "rt")],
                           check=True, stdout=subprocess.DEVNULL)
            (mnt / "normal").write_bytes(b"on the data device\n")
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)
    fs = XfsFileSystem(FileSource(image))
    with pytest.raises(FileReadError, match="realtime"):
        fs.file_runs(fs.stat("/rt"))
    assert b"".join(fs.read_chunks(fs.stat("/normal"))) == b"on the data device\n"
