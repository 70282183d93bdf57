"""The tar writer's direct header for members with PAX records (nanosecond
mtimes, text xattrs: every file of an XFS or ext4 volume with sub-second
times) is byte-identical to tarfile's, record lengths across digit
boundaries included; non-UTF-8 values are left to tarfile."""

from __future__ import annotations

import random
import string
import tarfile

from rescue.extract.tar_sink import fast_header

NAME_CHARS = string.ascii_letters + string.digits + "._-/"
TEXT = string.ascii_letters + string.digits + " =\n/:" + "äöü€中"


def _member(rnd: random.Random) -> tarfile.TarInfo:
    name = "".join(rnd.choice(NAME_CHARS) for _ in range(rnd.randint(1, 99))).strip("/") or "x"
    ti = tarfile.TarInfo(name)
    ti.type = rnd.choice([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE])
    ti.mode = rnd.randrange(0o10000)
    ti.uid, ti.gid = rnd.choice([0, 1000]), rnd.choice([0, 100])
    ti.uname, ti.gname = rnd.choice(["", "root", "www-data"]), rnd.choice(["", "root"])
    ti.mtime = rnd.choice([0, 1_700_000_000])
    if ti.type == tarfile.REGTYPE:
        ti.size = rnd.choice([0, 1, 4096, 10_000])
    if ti.type == tarfile.SYMTYPE:
        ti.linkname = "".join(rnd.choice(NAME_CHARS) for _ in range(rnd.randint(1, 100)))
    return ti


def test_pax_members_equal_tarfile():
    rnd = random.Random(23)
    for _ in range(3000):
        ti = _member(rnd)
        pax: dict[str, str] = {}
        if rnd.random() < 0.9:
            pax["mtime"] = f"{ti.mtime}.{rnd.randrange(10 ** 9):09d}"
        for _ in range(rnd.choice([0, 0, 1, 3])):
            key = "SCHILY.xattr.user." + "".join(rnd.choice(string.ascii_lowercase) for _ in range(rnd.randint(1, 20)))
            # value lengths chosen so the record length crosses 9/10, 99/100 and 999/1000
            length = rnd.choice([0, 1, 5, 60, 75, 80, 82, 85, 950, 965, 975, 980, 990, 5000])
            pax[key] = "".join(rnd.choice(TEXT) for _ in range(length))
        if not pax:
            pax["mtime"] = "1.5"
        ti.pax_headers = pax
        want = ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        assert fast_header(ti) == want, (ti.name, pax)


def test_every_record_length_from_1_to_1100_equals_tarfile():
    # short keys so the record length itself walks through every value
    for n in range(0, 1100):
        ti = tarfile.TarInfo("f")
        ti.pax_headers = {"k": "v" * n}
        assert fast_header(ti) == ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"), n


def test_bytes_that_are_not_utf8_go_to_tarfile():
    ti = tarfile.TarInfo("f")
    ti.pax_headers = {"SCHILY.xattr.user.bin": b"\xff\x00\xfe".decode("utf-8", "surrogateescape")}
    assert fast_header(ti) is None


def test_the_archive_reads_back_with_tarfile(tmp_path):
    ti = tarfile.TarInfo("dir/file")
    ti.size = 3
    ti.mtime = 1_700_000_000
    ti.pax_headers = {"mtime": "1700000000.123456789", "SCHILY.xattr.user.note": "héllo"}
    path = tmp_path / "t.tar"
    path.write_bytes(fast_header(ti) + b"abc" + bytes(509) + bytes(1024))
    with tarfile.open(path) as tar:
        member = tar.getmember("dir/file")
        assert member.pax_headers["mtime"] == "1700000000.123456789"
        assert member.pax_headers["SCHILY.xattr.user.note"] == "héllo"
        assert tar.extractfile(member).read() == b"abc"
