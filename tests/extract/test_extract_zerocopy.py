"""The kernel-copy path of the tar writer (pread for small files, sendfile for
big ones, straight from the image file) writes exactly the bytes the buffered
path writes: to a pipe, to a file, from a raw image and from a qcow2 one, with
holes, and falls back cleanly where the kernel will not copy."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import threading

import pytest

from repo_paths import REPO
from rescue.extract import zerocopy
from rescue.extract.run import ExtractOptions, extract
from rescue.extract.tar_sink import KERNEL_COPY_MIN, TarSink
from rescue.fs import open_filesystem
from rescue.source.base import FileSource, Window
from rescue.disk.base import RawDisk

pytestmark = pytest.mark.skipif(not shutil.which("mkfs.ext4"), reason="mkfs.ext4 is needed to build the image")
MiB = 1 << 20


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, str]:
    """An ext4 volume with small, big, sparse and empty files, as a bare raw
    file, behind 1 MiB of 'partition table' (a Window), and as qcow2."""
    tmp = tmp_path_factory.mktemp("zc")
    tree = tmp / "tree"
    (tree / "d").mkdir(parents=True)
    rnd = os.urandom(3 * MiB + 777)
    (tree / "small.txt").write_bytes(b"hello\n")
    (tree / "empty").write_bytes(b"")
    (tree / "d" / "edge").write_bytes(rnd[:KERNEL_COPY_MIN])          # exactly at the threshold
    (tree / "d" / "below").write_bytes(rnd[:KERNEL_COPY_MIN - 1])
    (tree / "big.bin").write_bytes(rnd)                                # not a multiple of 512
    with open(tree / "holes", "wb") as f:                             # small holes: written densely
        f.write(rnd[:100_000])
        f.seek(100_000 + 8192)
        f.write(rnd[:200_000])
    with open(tree / "sparse", "wb") as f:                            # big hole: a sparse member
        f.write(rnd[:4096])
        f.seek(8 * MiB)
        f.write(rnd[:70_000])
    for i in range(50):
        (tree / "d" / f"f{i:02d}").write_bytes(rnd[i:i + 1000 * i])
    vol = tmp / "vol.raw"
    with open(vol, "wb") as f:
        f.truncate(64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(vol)], check=True)
    disk = tmp / "disk.raw"
    with open(disk, "wb") as out, open(vol, "rb") as src:
        out.write(os.urandom(MiB))    # what lies before the partition
        shutil.copyfileobj(src, out)
    found = {"vol": str(vol), "disk": str(disk)}
    if shutil.which("qemu-img"):
        q = tmp / "vol.qcow2"
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(vol), str(q)], check=True)
        found["qcow2"] = str(q)
    return found


def _open(images: dict[str, str], which: str):
    if which == "qcow2":
        from rescue.guest.snapshot import open_snapshot
        snap = open_snapshot(images["qcow2"])
        return snap.filesystem(), snap
    src = FileSource(images["vol" if which == "vol" else "disk"])
    if which == "disk":
        src = Window(RawDisk(src), MiB, src.size - MiB)
    return open_filesystem(src), src


def _tar_bytes(images, which: str, kernel: bool, monkeypatch, to: str, tmp_path) -> bytes:
    monkeypatch.setattr(zerocopy, "AVAILABLE", kernel)
    fs, owner = _open(images, which)
    try:
        if to == "file":
            out = str(tmp_path / f"{which}-{kernel}.tar")
            extract(fs, TarSink(out), ExtractOptions(paths=["/"]))
            with open(out, "rb") as f:
                return f.read()
        # a real pipe, drained by a thread, as `-o - | cat` is
        r, w = os.pipe()
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(_drain(r)))
        reader.start()
        with open(w, "wb") as stream:
            extract(fs, TarSink(stream), ExtractOptions(paths=["/"]))
        reader.join()
        return got[0]
    finally:
        fs.close()
        owner.close()


def _drain(fd: int) -> bytes:
    with open(fd, "rb") as f:
        return f.read()


@pytest.mark.parametrize("which", ["vol", "disk", "qcow2"])
@pytest.mark.parametrize("to", ["pipe", "file"])
def test_kernel_copy_writes_the_same_tar_as_the_buffered_path(images, which, to, monkeypatch, tmp_path):
    if which not in images:
        pytest.skip("qemu-img is needed for the qcow2 variant")
    fast = _tar_bytes(images, which, True, monkeypatch, to, tmp_path)
    slow = _tar_bytes(images, which, False, monkeypatch, to, tmp_path)
    assert len(fast) == len(slow) and hashlib.sha256(fast).digest() == hashlib.sha256(slow).digest()
    # and it is the tree: the big file's bytes are in it
    import tarfile
    with tarfile.open(fileobj=io.BytesIO(fast)) as t:
        names = t.getnames()
        big = t.extractfile("big.bin").read()
        sparse = t.extractfile("sparse").read()
    assert "d/edge" in names and len(big) == 3 * MiB + 777 and len(sparse) == 8 * MiB + 70_000


def test_the_pieces_are_where_the_file_lies(images):
    fs, src = _open(images, "disk")
    try:
        entry = fs.stat("/big.bin")
        pieces = zerocopy.plain_pieces(fs, entry)
        assert pieces and sum(n for _, _, n in pieces) == entry.size
        data = b"".join(os.pread(fd, n, off) for fd, off, n in pieces)
        assert data == b"".join(fs.read_chunks(entry))
        holes = zerocopy.plain_pieces(fs, fs.stat("/holes"))
        assert any(fd == zerocopy.HOLE for fd, _, _ in holes)
    finally:
        fs.close()
        src.close()


def test_no_pieces_from_a_source_that_is_not_a_local_file(images):
    """An image held in memory (or reached over HTTP, or inside an archive): the usual reads."""
    from rescue.source.base import BytesSource
    with open(images["vol"], "rb") as f:
        fs = open_filesystem(BytesSource(f.read()))
    assert zerocopy.plain_pieces(fs, fs.stat("/big.bin")) is None


def test_an_output_the_kernel_refuses_falls_back_to_the_buffered_path(images, tmp_path):
    """sendfile into an O_APPEND file fails with EINVAL: the member is finished
    through the buffered path and later members follow it; the tar is whole."""
    fs, src = _open(images, "vol")
    out = tmp_path / "appended.tar"
    try:
        with open(out, "ab") as stream:
            sink = TarSink(stream)
            extract(fs, sink, ExtractOptions(paths=["/"]))
        assert sink._out_fd is None   # the kernel said no (EINVAL), and the writer took note
    finally:
        fs.close()
        src.close()
    import tarfile
    with tarfile.open(out) as t:
        assert t.extractfile("big.bin").read() == _file(images, "/big.bin")


def _file(images, path: str) -> bytes:
    fs, src = _open(images, "vol")
    try:
        return b"".join(fs.read_chunks(fs.stat(path)))
    finally:
        fs.close()
        src.close()


def test_a_reader_gone_is_a_target_error(images):
    from rescue.errors import TargetError
    fs, src = _open(images, "vol")
    r, w = os.pipe()
    os.close(r)
    stream = open(w, "wb")
    try:
        with pytest.raises(TargetError, match="broken pipe"):
            extract(fs, TarSink(stream), ExtractOptions(paths=["/big.bin"]))
    finally:
        fs.close()
        src.close()
        try:
            stream.close()
        except BrokenPipeError:
            pass


def _tree(root) -> dict[str, tuple[bytes, int]]:
    """path -> (content, allocated bytes) of every file under root."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = (f.read(), os.stat(p).st_blocks * 512)
    return out


def test_copy_file_range_into_a_directory_target_writes_the_same_files(images, tmp_path, monkeypatch):
    """A directory target gets its files by copy_file_range from the image:
    the same bytes as the buffered path, and holes stay holes."""
    from rescue.extract.dir_sink import DirectorySink
    trees = {}
    calls = []
    real = os.copy_file_range
    monkeypatch.setattr(os, "copy_file_range", lambda *a: calls.append(a) or real(*a))
    for kernel in (True, False):
        monkeypatch.setattr(zerocopy, "AVAILABLE", kernel)
        fs, src = _open(images, "disk")
        out = tmp_path / f"out-{kernel}"
        try:
            extract(fs, DirectorySink(str(out)), ExtractOptions(paths=["/"]))
        finally:
            fs.close()
            src.close()
        trees[kernel] = _tree(out)
    fast, slow = trees[True], trees[False]
    assert len(calls) >= len(fast) - 2   # every file with data went through the kernel (the empty one did not)
    assert {k: v[0] for k, v in fast.items()} == {k: v[0] for k, v in slow.items()}
    assert fast["sparse"][1] < MiB and len(fast["sparse"][0]) == 8 * MiB + 70_000   # the hole stayed one
    assert fast["big.bin"][0] == _file(images, "/big.bin")


def test_files_of_a_guest_tree_of_mounts_go_through_the_kernel_too(images, monkeypatch):
    """A guest whose /etc/fstab mounts a second filesystem (MergedFileSystem):
    the files of both are copied from the image file, byte-identical."""
    from rescue.guest.merged import MergedFileSystem
    from rescue.extract.tar_sink import TarSink as Sink
    outs = {}
    for kernel in (True, False):
        monkeypatch.setattr(zerocopy, "AVAILABLE", kernel)
        root, src1 = _open(images, "vol")
        home, src2 = _open(images, "disk")
        tree = MergedFileSystem(root, {"/d": home})
        try:
            if kernel:
                assert zerocopy.plain_pieces(tree, tree.stat("/d/big.bin")) is not None
                assert zerocopy.plain_pieces(tree, tree.stat("/big.bin")) is not None
            r, w = os.pipe()
            got: list[bytes] = []
            reader = threading.Thread(target=lambda: got.append(_drain(r)))
            reader.start()
            with open(w, "wb") as stream:
                extract(tree, Sink(stream), ExtractOptions(paths=["/"]))
            reader.join()
            outs[kernel] = got[0]
        finally:
            for fs, src in ((root, src1), (home, src2)):
                fs.close()
                src.close()
    assert outs[True] == outs[False] and len(outs[True]) > 6 * MiB


@pytest.mark.parametrize("fixture", ["xfs/b1k.img.zst", "btrfs/subvols-xxhash.img.zst", "btrfs/mixed-4k.img.zst"])
def test_xfs_and_btrfs_files_go_through_the_kernel_byte_identically(fixture, tmp_path, monkeypatch):
    """The committed XFS and btrfs fixtures (compressed btrfs extents fall back
    to the buffered path, plain ones are copied from the image): same tar."""
    import zstandard
    from rescue.guest.snapshot import open_snapshot
    src = os.path.join(str(REPO), "fixtures", fixture)
    image = tmp_path / "image.img"
    with open(src, "rb") as f, open(image, "wb") as out:
        zstandard.ZstdDecompressor().copy_stream(f, out)
    outs, plain = {}, 0
    for kernel in (True, False):
        monkeypatch.setattr(zerocopy, "AVAILABLE", kernel)
        snap = open_snapshot(str(image))
        try:
            fs = snap.filesystem()
            if kernel:
                plain = sum(zerocopy.plain_pieces(fs, e) is not None for e in fs.walk("/") if e.kind == "file" and e.size)
            path = tmp_path / f"out-{kernel}.tar"
            extract(fs, TarSink(str(path)), ExtractOptions(paths=["/"]))
            outs[kernel] = path.read_bytes()
        finally:
            snap.close()
    assert outs[True] == outs[False]
    assert plain > 0   # some files really took the kernel path
