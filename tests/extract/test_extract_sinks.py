"""The tar and directory sinks, checked against GNU tar and the filesystem.

Images are made with mkfs.ext4 -d from a tree built here; the sinks' output is
read back with GNU tar (the reference reader) and compared with that tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile

import pytest

from rescue.extract.base import Content, Item
from rescue.extract.dir_sink import DirectorySink
from rescue.extract.run import ExtractOptions, extract, plan
from rescue.extract.tar_sink import TarSink
from rescue.fs.base import DIR, FILE, SYMLINK, Entry, FileReadError
from rescue.fs.tsk import TskFileSystem
from rescue.source import FileSource

ROOT = os.geteuid() == 0
needs_mkfs = pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="mkfs.ext4 (e2fsprogs) not installed")


@pytest.fixture(scope="module")
def ext4_image(tmp_path_factory):
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 (e2fsprogs) not installed")
    base = tmp_path_factory.mktemp("sinks")
    tree = base / "tree"
    (tree / "data" / "sub").mkdir(parents=True)
    (tree / "data" / "hello.txt").write_bytes(b"hello\n")
    (tree / "data" / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    with open(tree / "data" / "sparse.img", "wb") as f:
        f.truncate(16 << 20)
        f.seek(5 << 20)
        f.write(b"middle" * 1000)
    os.link(tree / "data" / "hello.txt", tree / "data" / "sub" / "hello-again.txt")
    os.symlink("../hello.txt", tree / "data" / "sub" / "link")
    (tree / "data" / "app.log").write_text("noise\n")
    (tree / "data" / "empty").mkdir()
    (tree / "data" / "empty.txt").write_bytes(b"")
    if ROOT:
        os.chown(tree / "data" / "hello.txt", 1234, 5678)
    os.utime(tree / "data" / "big.bin", ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    image = base / "fs.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image)], check=True)
    return tree, image


def _run(image, target, **kw):
    fs = TskFileSystem(FileSource(str(image)))
    sink = TarSink(str(target)) if str(target).endswith((".tar", ".gz", ".zst")) else DirectorySink(str(target))
    return extract(fs, sink, ExtractOptions(**kw))


def test_tar_output_is_read_back_by_gnu_tar_with_the_same_content(ext4_image, tmp_path):
    tree, image = ext4_image
    report = _run(image, tmp_path / "out.tar", paths=["/data"])
    assert report.skipped == []
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    subprocess.run(["tar", "-C", str(unpacked), "-xf", str(tmp_path / "out.tar")], check=True)
    for rel in ("hello.txt", "big.bin", "sparse.img", "empty.txt", "sub/hello-again.txt"):
        assert (unpacked / "data" / rel).read_bytes() == (tree / "data" / rel).read_bytes(), rel
    assert os.readlink(unpacked / "data" / "sub" / "link") == "../hello.txt"
    assert (unpacked / "data" / "empty").is_dir()
    # hard links come back as one inode
    assert os.stat(unpacked / "data" / "hello.txt").st_ino == os.stat(unpacked / "data" / "sub" / "hello-again.txt").st_ino
    assert os.stat(unpacked / "data" / "big.bin").st_mtime_ns == 1_600_000_000_000_000_000


def test_sparse_file_is_a_sparse_tar_member(ext4_image, tmp_path):
    tree, image = ext4_image
    _run(image, tmp_path / "out.tar", paths=["/data/sparse.img"])
    # Only the data is stored: the archive is far smaller than the 16 MiB file.
    assert os.path.getsize(tmp_path / "out.tar") < 1 << 20
    with tarfile.open(tmp_path / "out.tar") as tf:
        (member,) = tf.getmembers()
        assert member.name == "data/sparse.img" and member.size == 16 << 20 and member.issparse()
        assert tf.extractfile(member).read() == (tree / "data" / "sparse.img").read_bytes()


def test_directory_output_keeps_holes_links_and_times(ext4_image, tmp_path):
    tree, image = ext4_image
    out = tmp_path / "restore"
    report = _run(image, str(out) + "/", paths=["/data"])
    assert report.skipped == []
    sparse = out / "data" / "sparse.img"
    assert sparse.read_bytes() == (tree / "data" / "sparse.img").read_bytes()
    assert os.stat(sparse).st_blocks * 512 < 1 << 20   # holes stayed holes
    assert os.path.islink(out / "data" / "sub" / "link")
    assert os.stat(out / "data" / "hello.txt").st_ino == os.stat(out / "data" / "sub" / "hello-again.txt").st_ino
    assert os.stat(out / "data" / "big.bin").st_mtime_ns == 1_600_000_000_000_000_000
    if ROOT:
        st = os.stat(out / "data" / "hello.txt")
        assert (st.st_uid, st.st_gid) == (1234, 5678)


def test_exclude_and_strip_components(ext4_image, tmp_path):
    _, image = ext4_image
    fs = TskFileSystem(FileSource(str(image)))
    names = [p.name for p in plan(fs, ExtractOptions(paths=["/data"], excludes=["*.log", "sub"])).items]
    assert "data/app.log" not in names and not any(n.startswith("data/sub") for n in names)
    assert "data/hello.txt" in names
    stripped = [p.name for p in plan(fs, ExtractOptions(paths=["/data"], strip_components=1)).items]
    assert "hello.txt" in stripped and "sub/link" in stripped and "data" not in stripped


def _entry(path, kind=FILE, **kw):
    return Entry(path=path, kind=kind, mode=kw.pop("mode", 0o644), mtime_ns=1_000_000_000, **kw)


def test_directory_sink_never_writes_outside_its_target(tmp_path):
    target = tmp_path / "target"
    outside = tmp_path / "outside"
    outside.mkdir()
    sink = DirectorySink(str(target) + "/")
    # An image symlink pointing outside, then an entry "inside" that symlink.
    sink.add(Item(name="esc", entry=_entry("/esc", SYMLINK, link_target=str(outside))))
    data = b"pwned"
    content = Content(size=len(data), chunks=lambda: iter([data]))
    for hostile in ("esc/evil", "../evil", "a/../../evil", "/abs/evil", "a//b", "nul\0name"):
        with pytest.raises(FileReadError):
            sink.add(Item(name=hostile, entry=_entry("/x", size=len(data)), content=content))
    sink.close()
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "evil").exists()
    assert os.readlink(target / "esc") == str(outside)   # kept as a link, never followed


def test_damaged_file_leaves_a_valid_tar_and_is_reported(tmp_path):
    def broken():
        yield b"x" * 1000
        raise FileReadError("/bad: unreadable at offset 1000")

    sink = TarSink(str(tmp_path / "out.tar"))
    with pytest.raises(FileReadError):
        sink.add(Item(name="bad", entry=_entry("/bad", size=5000), content=Content(size=5000, chunks=broken)))
    sink.add(Item(name="good", entry=_entry("/good", size=2), content=Content(size=2, chunks=lambda: iter([b"ok"]))))
    sink.close()
    with tarfile.open(tmp_path / "out.tar") as tf:
        assert tf.extractfile("good").read() == b"ok"
        assert tf.getmember("bad").size == 5000   # zero-filled, archive still aligned


def test_tar_sink_refuses_to_leave_a_partial_file_under_the_final_name(tmp_path):
    sink = TarSink(str(tmp_path / "out.tar"))
    sink.add(Item(name="d", entry=_entry("/d", DIR, mode=0o755)))
    sink.abort()
    assert not (tmp_path / "out.tar").exists() and not (tmp_path / "out.tar.part").exists()


@pytest.mark.parametrize("kind,extra", [
    (tarfile.REGTYPE, {"size": 12345, "uname": "www-data", "gname": "www-data", "uid": 33, "gid": 33}),
    (tarfile.DIRTYPE, {"mode": 0o1777}),
    (tarfile.SYMTYPE, {"linkname": "../x/y"}),
    (tarfile.LNKTYPE, {"linkname": "a/first"}),
    (tarfile.CHRTYPE, {"devmajor": 4, "devminor": 5}),
    (tarfile.BLKTYPE, {"devmajor": 259, "devminor": 65535}),
    (tarfile.FIFOTYPE, {"mode": 0o4755}),
])
def test_fast_tar_header_is_byte_identical_to_tarfile(kind, extra):
    from rescue.extract.tar_sink import fast_header
    ti = tarfile.TarInfo("var/lib/docker/volumes/db/_data/file-" + str(kind))
    ti.type, ti.mode, ti.mtime = kind, extra.pop("mode", 0o644), 1_700_000_000
    for key, value in extra.items():
        setattr(ti, key, value)
    assert fast_header(ti) == ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def test_fast_tar_header_leaves_long_or_non_ascii_names_to_tarfile():
    from rescue.extract.tar_sink import fast_header
    assert fast_header(tarfile.TarInfo("x" * 101)) is None
    assert fast_header(tarfile.TarInfo("précis.txt")) is None
    ti = tarfile.TarInfo("ok")
    ti.pax_headers = {"mtime": "1.5"}   # PAX records of plain text: built directly, as tarfile would
    assert fast_header(ti) == ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
