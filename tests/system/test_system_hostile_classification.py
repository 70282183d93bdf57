"""Damaged bytes end in one line naming the file, the layer and the problem
(exit 2), never in "internal error": each class of library exception that
issue 14 met, reproduced from our own minimal inputs."""

from __future__ import annotations

import gzip
import io
import lzma
import struct
import tarfile
import zipfile
from pathlib import Path

import construct
import pytest

from repo_paths import REPO
from common_support import rescue
from rescue.disk import open_disk
from rescue.errors import (DamagedRange, DiskFormatError, FilesystemError, RescueError, SourceError,
                           classify, describe)
from rescue.source import open_source
from rescue.source.archives import list_members
from rescue.source.base import BytesSource, FileSource

SAMPLE = REPO / "fixtures" / "sample-vps.disk"
DMG = REPO / "fixtures" / "moreformats" / "made.dmg.gz"


def _one_line_exit_2(path: Path, layer: str, *words: str, command: str = "inspect") -> str:
    res = rescue(command, str(path))
    stderr = res.stderr.decode("utf-8", "replace")
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert res.returncode == 2, stderr
    assert len(lines) == 1, stderr
    assert "internal error" not in stderr and "Traceback" not in stderr
    line = lines[0]
    assert path.name in line and f": {layer}: " in line, line
    for word in words:
        assert word in line, line
    return line


def _xz(data: bytes, **kw) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, **kw)


def _disk_head() -> bytes:
    return SAMPLE.read_bytes()[:3 << 20]


def test_a_corrupt_xz_block_is_one_source_line(tmp_path):
    data = bytearray(_xz(_disk_head()))
    for i in range(200, 260):   # inside the first (only) block's compressed data
        data[i] ^= 0x55
    bad = tmp_path / "corrupt.img.xz"
    bad.write_bytes(bytes(data))
    _one_line_exit_2(bad, "disk", "damaged data", "xz data at 0", "Corrupt")


def test_an_xz_cut_after_8_bytes_is_one_source_line(tmp_path):
    cut = tmp_path / "cut.img.xz"
    cut.write_bytes(_xz(b"x" * 4096)[:8])
    _one_line_exit_2(cut, "source", "xz stream is truncated")


def test_a_damaged_later_xz_block_is_a_damaged_range_not_a_crash(tmp_path):
    # Several blocks: the stream opens, and only reads of the damaged block fail.
    import xz
    raw = SAMPLE.read_bytes()
    buf = io.BytesIO()
    with xz.open(buf, "w") as out:   # one xz block per MiB, as `xz -T0` writes
        for i in range(0, len(raw), 1 << 20):
            out.write(raw[i:i + (1 << 20)])
            out.change_block()
    data = bytearray(buf.getvalue())
    middle = len(data) // 2
    for i in range(middle, middle + 200):
        data[i] ^= 0x55
    bad = tmp_path / "late.img.xz"
    bad.write_bytes(bytes(data))
    src = open_source(str(bad))
    damaged, good = [], []
    try:
        for offset in range(0, src.size, 1 << 20):
            try:
                good.append(src.read(offset, 1 << 20) == raw[offset:offset + (1 << 20)])
            except DamagedRange as exc:
                damaged.append(str(exc))
    finally:
        src.close()
    assert damaged and all("xz data at" in d for d in damaged)
    assert good and all(good)   # the blocks before and after still read


def _zip_with(name: str, payload: bytes = b"x" * 100) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(name, payload)
    return buf.getvalue()


def test_a_zip_member_with_an_empty_name_is_one_source_line(tmp_path):
    data = bytearray(_zip_with("a"))
    cd = data.rfind(b"PK\x01\x02")
    struct.pack_into("<H", data, cd + 28, 0)    # central directory: name length 0
    del data[cd + 46]
    eocd = data.rfind(b"PK\x05\x06")
    struct.pack_into("<I", data, eocd + 12, struct.unpack_from("<I", data, eocd + 12)[0] - 1)
    bad = tmp_path / "empty-name.zip"
    bad.write_bytes(bytes(data))
    assert zipfile.ZipFile(bad).infolist()[0].filename == ""   # the stdlib accepts it
    _one_line_exit_2(bad, "source", "empty name")


def test_a_zip_claiming_a_newer_version_is_one_source_line(tmp_path):
    data = bytearray(_zip_with("disk.img", b"a" * 1000))
    cd = data.rfind(b"PK\x01\x02")
    data[cd + 6:cd + 8] = struct.pack("<H", 99)   # version needed to extract: 9.9
    bad = tmp_path / "newer.zip"
    bad.write_bytes(bytes(data))
    with pytest.raises(NotImplementedError):
        zipfile.ZipFile(bad)
    _one_line_exit_2(bad, "source", "zip", "9.9")


def test_a_damaged_zip_with_a_negative_window_raises_source_error_in_the_python_api(tmp_path):
    data = bytearray(_zip_with("disk.img", b"a" * 4000))
    eocd = data.rfind(b"PK\x05\x06")
    offset = struct.unpack_from("<I", data, eocd + 16)[0]
    struct.pack_into("<I", data, eocd + 16, offset + 100)   # members now appear 100 bytes before byte 0
    bad = tmp_path / "negative.zip"
    bad.write_bytes(bytes(data))
    assert zipfile.ZipFile(bad).infolist()[0].header_offset < 0
    with pytest.raises(SourceError, match="before the start"):
        list_members(FileSource(str(bad)))
    with pytest.raises(SourceError, match="before the start"):
        open_source(str(bad))
    _one_line_exit_2(bad, "source", "before the start")


def test_a_tar_member_with_a_negative_size_is_one_source_line(tmp_path):
    info = tarfile.TarInfo("disk.img")
    info.size = 0
    header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    header[124:136] = b"\xff" * 12   # base-256: -1
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}\0 ".encode()
    bad = tmp_path / "negative.tar.gz"
    bad.write_bytes(gzip.compress(bytes(header) + bytes(1024)))
    line = _one_line_exit_2(bad, "source")
    assert "negative" in line or "damaged" in line


def test_a_dmg_whose_property_list_is_damaged_is_one_disk_line(tmp_path):
    data = bytearray(gzip.decompress(DMG.read_bytes()))
    koly = len(data) - 512
    assert data[koly:koly + 4] == b"koly"
    xml_offset, xml_length = struct.unpack_from(">QQ", data, koly + 0xD8)
    broken = b"<plist><key>a</key></plist>"   # plistlib: IndexError
    data[xml_offset:xml_offset + xml_length] = broken.ljust(xml_length)
    bad = tmp_path / "plist.dmg"
    bad.write_bytes(bytes(data))
    with pytest.raises(DiskFormatError, match="dmg"):
        open_disk(FileSource(str(bad)))
    _one_line_exit_2(bad, "disk", "dmg", "IndexError")


def test_a_four_byte_file_holding_xfsb_is_one_line(tmp_path):
    bad = tmp_path / "xfsb.img"
    bad.write_bytes(b"XFSB")
    line = _one_line_exit_2(bad, "volume", "not a disk image")
    assert "StreamError" not in line


def test_classify_turns_a_construct_error_into_the_layers_one_line():
    with pytest.raises(FilesystemError) as caught:
        with classify(FilesystemError, "superblock", file="x.img"):
            construct.Struct("magic" / construct.Bytes(4), "blocksize" / construct.Int32ub).parse(b"XFSB")
    line = caught.value.one_line()
    assert "\n" not in line and line.startswith("x.img: fs: superblock: field blocksize")


def test_classify_leaves_bugs_and_damaged_ranges_alone():
    with pytest.raises(TypeError):
        with classify(SourceError, "x"):
            raise TypeError("a bug stays a bug")
    with pytest.raises(DamagedRange):
        with classify(SourceError, "x"):
            raise DamagedRange("skip this range")
    with pytest.raises(SourceError):
        with classify(SourceError, "x"):
            raise SourceError("already classified")


def test_describe_names_builtin_exceptions_by_type():
    assert describe(IndexError("string index out of range")) == "IndexError: string index out of range"
    assert describe(OSError(22, "negative seek position")) == "OSError: [Errno 22] negative seek position"
    assert isinstance(RescueError("x"), Exception)


def test_every_disk_reader_error_on_random_bytes_is_classified():
    # Each registered container's magic followed by garbage: a clean refusal or a disk, never a crash.
    magics = [b"QFI\xfb", b"<<< Oracle VM VirtualBox Disk Image >>>\n", b"KDMV", b"vhdxfile",
              b"WithoutFreeSpace", b"Bochs Virtual HD Image", b"#!/bin/sh\n#V2.0 Format", b"VMA\0"]
    for magic in magics:
        for size in (len(magic), 512, 4096):
            blob = (magic + bytes(range(256)) * 16)[:size]
            try:
                open_disk(BytesSource(blob, name="garbage")).close()
            except RescueError:
                pass
