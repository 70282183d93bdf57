"""The tar writer's direct ustar header (struct-packed, Adler-32 checksum) is
byte-identical to tarfile's, over many random members of every plain kind."""

from __future__ import annotations

import random
import string
import tarfile

from rescue.extract.tar_sink import _byte_sum, fast_header

KINDS = [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE,
         tarfile.BLKTYPE, tarfile.FIFOTYPE]
NAME_CHARS = string.ascii_letters + string.digits + "._-/~@+= "


def test_byte_sum_is_the_sum_of_the_bytes_for_any_block():
    rnd = random.Random(1)
    for block in [bytes(512), b"\xff" * 512] + [rnd.randbytes(512) for _ in range(500)]:
        assert _byte_sum(block) == sum(block)


def test_direct_header_equals_tarfile_for_random_members():
    rnd = random.Random(17)
    checked = 0
    for _ in range(3000):
        name = "".join(rnd.choice(NAME_CHARS) for _ in range(rnd.randint(1, 99))).strip("/") or "x"
        ti = tarfile.TarInfo(name)
        ti.type = rnd.choice(KINDS)
        ti.mode = rnd.randrange(0o10000)
        ti.uid, ti.gid = rnd.choice([0, 33, 1000, 65534, 8 ** 7 - 1]), rnd.choice([0, 100, 2 ** 20])
        ti.uname = "".join(rnd.choice(string.ascii_lowercase) for _ in range(rnd.randint(0, 32)))
        ti.gname = "".join(rnd.choice(string.ascii_lowercase) for _ in range(rnd.randint(0, 32)))
        ti.mtime = rnd.choice([0, 1, 1_700_000_000, 8 ** 11 - 1])
        if ti.type == tarfile.REGTYPE:
            ti.size = rnd.choice([0, 1, 511, 512, 10_000, 8 ** 11 - 1])
        if ti.type in (tarfile.SYMTYPE, tarfile.LNKTYPE):
            ti.linkname = "".join(rnd.choice(NAME_CHARS) for _ in range(rnd.randint(0, 100)))
        if ti.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            ti.devmajor, ti.devminor = rnd.randrange(4096), rnd.randrange(2 ** 20)
        fast = fast_header(ti)
        assert fast is not None and fast == ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"), (name, ti.type)
        checked += 1
    assert checked == 3000
