"""A tar from `rescue extract` restores with the standard tools (issue 14):
GNU tar (--xattrs --acls), bsdtar and Python's tarfile read every member without
a warning and give back ACLs, xattrs, sparse files, owners, times and names
that are not UTF-8, compared with the source tree the image was made from."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from common_support import rescue
from rescue.extract.tar_sink import acl_text, without_hdrcharset

ODD = os.fsdecode(b"caf\xe9-latin1")      # a name that is not UTF-8
LONG_ODD = os.fsdecode(b"\xe9" * 120)     # too long for the ustar name field
TOOLS = ("mkfs.ext4", "setfacl", "getfacl", "setfattr")


def _need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} (apt: e2fsprogs acl attr tar libarchive-tools)")


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, Path]:
    """A source tree with ACLs, xattrs, owners, a sparse file and odd names; an
    ext4 image of it (mkfs.ext4 -d copies xattrs and ACLs); our tar of the image."""
    _need(*TOOLS)
    base = tmp_path_factory.mktemp("tarrestore")
    src = base / "src"
    (src / "shared").mkdir(parents=True)
    (src / "plain").write_bytes(b"hello\n")
    (src / "acl").write_bytes(b"acl file\n")
    subprocess.run(["setfacl", "-m", "u:1234:r--,g:99:rw-", str(src / "acl")], check=True)
    subprocess.run(["setfacl", "-d", "-m", "u:1234:rwx,g:99:r-x", str(src / "shared")], check=True)
    subprocess.run(["setfacl", "-m", "u:1234:rwx", str(src / "shared")], check=True)
    subprocess.run(["setfattr", "-n", "user.binary", "-v", "0xff00fe01", str(src / "plain")], check=True)
    subprocess.run(["setfattr", "-n", "user.text", "-v", "hello", str(src / "acl")], check=True)
    with open(src / "sparse", "wb") as f:
        f.truncate(8 << 20)
        f.seek(4 << 20)
        f.write(b"middle")
    (src / ODD).write_bytes(b"latin-1 name\n")
    (src / LONG_ODD).write_bytes(b"long latin-1 name\n")
    os.chown(src / "acl", 1234, 99)
    os.utime(src / "plain", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    image = base / "fs.img"
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(src), str(image)], check=True)
    out = base / "out.tar"
    res = rescue("extract", str(image), "-o", str(out))
    assert res.returncode == 0, res.stderr
    return src, out


def _acls(path: Path) -> str:
    res = subprocess.run(["getfacl", "-n", "-p", "--omit-header", str(path)], capture_output=True, check=True)
    return res.stdout.decode()


def _compare(src: Path, got: Path, *, acls: bool, xattrs: bool) -> None:
    for name in ("plain", "acl", "sparse", ODD, LONG_ODD, "shared"):
        a, b = src / name, got / name
        assert b.exists() or b.is_symlink(), f"{name!r} not restored"
        sa, sb = a.lstat(), b.lstat()
        assert (sa.st_mode, sa.st_uid, sa.st_gid) == (sb.st_mode, sb.st_uid, sb.st_gid), name
        if a.is_file():
            assert a.read_bytes() == b.read_bytes(), name
            # mkfs.ext4 -d keeps whole seconds only
            assert sa.st_mtime_ns // 10**9 == sb.st_mtime_ns // 10**9, name
        if acls:
            assert _acls(a) == _acls(b), name
        if xattrs:
            for key in os.listxattr(a):
                if key.startswith("user."):
                    assert os.getxattr(b, key) == os.getxattr(a, key), (name, key)
    assert (got / "sparse").stat().st_blocks * 512 < (1 << 20), "the sparse file was filled in"


def test_gnu_tar_restores_acls_xattrs_and_names_without_warnings(made, tmp_path):
    _need("tar")
    src, tar = made
    res = subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--acls", "-xpf", str(tar), "-C", str(tmp_path)],
                         capture_output=True)
    assert res.returncode == 0 and res.stderr == b"", res.stderr.decode(errors="replace")
    _compare(src, tmp_path, acls=True, xattrs=True)


def test_bsdtar_restores_acls_xattrs_and_names_without_warnings(made, tmp_path):
    _need("bsdtar")
    src, tar = made
    res = subprocess.run(["bsdtar", "--acls", "--xattrs", "-xpf", str(tar), "-C", str(tmp_path)], capture_output=True)
    assert res.returncode == 0 and res.stderr == b"", res.stderr.decode(errors="replace")
    _compare(src, tmp_path, acls=True, xattrs=True)


def test_python_tarfile_reads_every_member_and_xattr(made, tmp_path):
    src, tar = made
    with tarfile.open(tar) as tf:
        members = {m.name: m for m in tf.getmembers()}
        tf.extractall(tmp_path, filter="fully_trusted")
    _compare(src, tmp_path, acls=False, xattrs=False)   # tarfile sets neither xattrs nor ACLs
    plain = members["plain"].pax_headers
    assert os.fsencode(plain["SCHILY.xattr.user.binary"]) == b"\xff\x00\xfe\x01"
    acl = members["acl"].pax_headers
    assert acl["SCHILY.acl.access"] == "user::rw-,user:1234:r--,group::r--,group:99:rw-,mask::rw-,other::r--"
    assert members["shared"].pax_headers["SCHILY.acl.default"].startswith("user::rwx,user:1234:rwx,group::")


def test_no_hdrcharset_marker_even_for_undecodable_names(made):
    _, tar = made
    data = tar.read_bytes()
    assert b"hdrcharset" not in data and b"\xe9" * 120 in data   # LONG_ODD as a GNU long-name record


def test_acl_text_of_the_kernel_xattr_format():
    blob = bytes.fromhex("02000000" "01000600ffffffff" "02000400d2040000" "04000400ffffffff"
                         "10000600ffffffff" "20000400ffffffff")
    assert acl_text(blob) == "user::rw-,user:1234:r--,group::r--,mask::rw-,other::r--"
    assert acl_text(b"\x01\x00\x00\x00") is None and acl_text(b"junk") is None


def test_without_hdrcharset_keeps_what_tarfile_reads():
    ti = tarfile.TarInfo(os.fsdecode(b"n\xe9"))
    ti.size = 3
    ti.pax_headers = {"SCHILY.xattr.user.x": os.fsdecode(b"\xff\x00")}
    raw = ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    fixed = without_hdrcharset(raw)
    assert b"hdrcharset" in raw and b"hdrcharset" not in fixed
    for blob in (raw, fixed):
        with tarfile.open(fileobj=io.BytesIO(blob + b"abc".ljust(512, b"\0") + bytes(1024))) as tf:
            member = tf.next()
            assert os.fsencode(member.name) == b"n\xe9"
            assert os.fsencode(member.pax_headers["SCHILY.xattr.user.x"]) == b"\xff\x00"


# An owner's name that is not UTF-8 (a guest's /etc/passwd in Latin-1), short and over 32 bytes.
ODD_USERS = [(os.fsdecode(b"caf\xe9"), os.fsdecode(b"gr\xfcppe"), 1234, 99),
             (os.fsdecode(b"\xe9" * 40), "staff", 1235, 50)]


@pytest.fixture(scope="module")
def odd_owners(tmp_path_factory) -> Path:
    """A tar written by the tar target for members whose user/group names are not UTF-8."""
    from rescue.extract.base import Content, Item
    from rescue.extract.tar_sink import TarSink
    from rescue.fs.base import FILE, Entry
    out = tmp_path_factory.mktemp("odd-owners") / "owners.tar"
    sink = TarSink(str(out))
    for number, (user, group, uid, gid) in enumerate(ODD_USERS):
        data = f"file {number}\n".encode()
        entry = Entry(path=f"/f{number}", kind=FILE, mode=0o640, uid=uid, gid=gid, size=len(data),
                      mtime_ns=1_600_000_000_000_000_000, xattrs={"user.bin": b"\xff\x00"})
        sink.add(Item(f"f{number}", entry, Content(len(data), lambda data=data: iter([data])),
                      user=user, group=group))
    sink.close()
    return out


def test_undecodable_owner_names_restore_by_id_without_warnings(odd_owners, tmp_path):
    """GNU tar 1.34 warns about a 'hdrcharset' record; bsdtar warns about a PAX
    uname that is not UTF-8. So such a name goes raw into the 32-byte ustar
    field (or is dropped when longer: the numeric id stays) and every tool
    restores the numeric owners without a word."""
    data = odd_owners.read_bytes()
    assert b"hdrcharset" not in data and b"caf\xe9\0" in data and b"gr\xfcppe\0" in data
    assert b"\xe9" * 40 not in data
    runs = {"gnu": ["tar", "--xattrs", "--xattrs-include=*", "--acls", "-xpf"], "bsd": ["bsdtar", "--xattrs", "-xpf"]}
    for tool, argv in runs.items():
        _need(argv[0])
        dest = tmp_path / tool
        dest.mkdir()
        res = subprocess.run([*argv, str(odd_owners), "-C", str(dest)], capture_output=True)
        assert res.returncode == 0 and res.stderr == b"", (tool, res.stderr.decode(errors="replace"))
        for number, (_, _, uid, gid) in enumerate(ODD_USERS):
            st = (dest / f"f{number}").lstat()
            assert (st.st_mode & 0o7777, st.st_size) == (0o640, len(f"file {number}\n")), tool
            if os.geteuid() == 0:   # no such names here: restored by the ids
                assert (st.st_uid, st.st_gid) == (uid, gid), tool
            assert os.getxattr(dest / f"f{number}", "user.bin") == b"\xff\x00", tool
    with tarfile.open(odd_owners) as tf:
        members = tf.getmembers()
    assert [(m.uname, m.gname, m.uid, m.gid) for m in members] == [
        (ODD_USERS[0][0], ODD_USERS[0][1], 1234, 99), ("", "staff", 1235, 50)]
    assert all(os.fsencode(m.pax_headers["SCHILY.xattr.user.bin"]) == b"\xff\x00" for m in members)
