"""Snapshot archives read in place: the disk inside a .tar/.tar.gz/.zip/... reads
byte for byte like the bare disk, without unpacking it anywhere."""

from __future__ import annotations

import gzip
import hashlib
import os
import random
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from repo_paths import REPO
from rescue.errors import SourceError
from rescue.source import open_relative, open_source, runs
from rescue.source.codecs import base as compressed
from rescue.source.codecs.gzip import GzipSource
from rescue.source.archives import list_members

MiB = 1 << 20


def _need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


def _run(*cmd: str, cwd: Path | None = None) -> None:
    subprocess.run(cmd, check=True, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("RESCUE_CACHE_DIR", str(path))
    return path


@pytest.fixture(scope="session")
def disk(tmp_path_factory) -> Path:
    """A 16 MiB GPT disk with an ext4 partition holding a small tree, with holes."""
    _need("sfdisk", "mkfs.ext4")
    root = tmp_path_factory.mktemp("archive-disk")
    tree = root / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("dead-vps\n")
    (tree / "var" / "www").mkdir(parents=True)
    rng = random.Random(4)
    (tree / "var" / "www" / "blob.bin").write_bytes(rng.randbytes(3 * MiB))
    for i in range(20):
        (tree / "var" / "www" / f"page{i}.html").write_text(f"<h1>page {i}</h1>\n" * (i + 1))
    path = root / "vps.disk"
    with open(path, "wb") as f:
        f.truncate(16 * MiB)
    subprocess.run(["sfdisk", "-q", str(path)], input=b"label: gpt\nstart=2048, type=linux\n", check=True,
        stdout=subprocess.DEVNULL)
    _run("mkfs.ext4", "-q", "-F", "-d", str(tree), "-E", f"offset={MiB}", str(path), "14M")
    return path


@pytest.fixture(scope="session")
def archives(disk, tmp_path_factory) -> dict[str, Path]:
    """The same disk packed the ways providers and users pack it."""
    _need("tar", "gzip", "zstd", "xz", "bzip2")
    out = tmp_path_factory.mktemp("archives")
    d, name = str(disk.parent), disk.name
    made: dict[str, Path] = {}

    def tar(kind: str, *flags: str) -> None:
        made[kind] = out / f"{kind}.tar"
        _run("tar", "-cf", str(made[kind]), *flags, "-C", d, name)

    tar("tar")
    tar("gnu-sparse", "--format=gnu", "-S")
    for version in ("0.0", "0.1", "1.0"):
        tar(f"pax-sparse-{version}", "--format=pax", "-S", f"--sparse-version={version}")
    # tar.* through a pipe (no content size in the zstd header, as `tar --zstd` writes);
    # bare disks from the file (zstd records the size). xz: the tar.xz is
    # multi-block (2 MiB blocks), the bare .xz one block (-T1), to cover both seek paths.
    for codec, cmd in (("gz", ["gzip", "-6"]), ("zst", ["zstd", "-q"]), ("xz", ["xz", "-0"]),
                       ("bz2", ["bzip2", "-1"])):
        src = made["gnu-sparse"] if codec == "gz" else made["tar"]
        made[f"tar.{codec}"] = out / f"snap.tar.{codec}"
        threads = ["-T2", "--block-size=2MiB"] if codec == "xz" else []
        with open(src, "rb") as fin, open(made[f"tar.{codec}"], "wb") as fout:
            subprocess.run(cmd + threads + ["-c"], stdin=fin, stdout=fout, check=True)
        made[codec] = out / f"{name}.{codec}"
        threads = ["-T1"] if codec == "xz" else []
        with open(made[codec], "wb") as fout:
            subprocess.run(cmd + threads + ["-c", str(disk)], stdout=fout, check=True)
    # Several zstd frames (what pzstd or a seekable-zstd tool writes).
    made["zst-frames"] = out / f"{name}.frames.zst"
    data = disk.read_bytes()
    with open(made["zst-frames"], "wb") as fout:
        for i in range(0, len(data), 3 * MiB):
            fout.write(subprocess.run(["zstd", "-q", "-c"], input=data[i:i + 3 * MiB],
                                      stdout=subprocess.PIPE, check=True).stdout)
    made["zip-stored"] = out / "stored.zip"
    made["zip-deflated"] = out / "deflated.zip"
    made["zip64"] = out / "zip64.zip"
    for key, method, z64 in (("zip-stored", zipfile.ZIP_STORED, False),
                             ("zip-deflated", zipfile.ZIP_DEFLATED, False),
                             ("zip64", zipfile.ZIP_DEFLATED, True)):
        with zipfile.ZipFile(made[key], "w", method) as zf:
            zf.writestr("README.txt", "provider export\n")
            with zf.open(f"export/{name}", "w", force_zip64=z64) as fout, open(disk, "rb") as fin:
                shutil.copyfileobj(fin, fout)
    if shutil.which("zip"):
        made["zip-infozip"] = out / "infozip.zip"
        _run("zip", "-q", "-9", str(made["zip-infozip"]), name, cwd=disk.parent)
    return made


def _assert_same(source, disk: Path, samples: int = 40) -> None:
    want = disk.read_bytes()
    assert source.size == len(want)
    rng = random.Random(len(want))
    for _ in range(samples):
        offset = rng.randrange(0, len(want))
        length = rng.choice([1, 512, 4096, 65536, 3 * MiB])
        assert source.read(offset, length) == want[offset:offset + length], (offset, length)
    assert source.read(len(want) - 10, 100) == want[-10:]
    assert hashlib.sha256(source.read(0, len(want))).digest() == hashlib.sha256(want).digest()


KINDS = ["tar", "gnu-sparse", "pax-sparse-0.0", "pax-sparse-0.1", "pax-sparse-1.0", "tar.gz",
         "tar.zst", "tar.xz", "tar.bz2", "gz", "zst", "zst-frames", "xz", "bz2", "zip-stored", "zip-deflated",
         "zip64", "zip-infozip"]


@pytest.mark.parametrize("kind", KINDS)
def test_disk_inside_archive_reads_like_the_bare_disk(kind, archives, disk):
    if kind not in archives:
        pytest.skip(f"{kind}: tool missing")
    source = open_source(archives[kind])
    try:
        # bzip2 and one-block xz can only decode forward: fewer random probes.
        _assert_same(source, disk, samples=8 if kind in ("bz2", "tar.bz2", "xz") else 40)
    finally:
        source.close()


def test_sparse_tar_member_reports_its_holes(archives, disk):
    source = open_source(archives["gnu-sparse"])
    try:
        found = list(runs(source))
        assert sum(r.length for r in found) == disk.stat().st_size
        zero = [r for r in found if r.kind == "zero"]
        assert zero, "tar -S stored holes, the member should report them"
        for r in zero[:5]:
            assert source.read(r.offset, min(r.length, MiB)) == bytes(min(r.length, MiB))
    finally:
        source.close()


def test_snapshot_file_is_never_modified(archives):
    path = archives["tar.gz"]
    before = hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns
    source = open_source(path)
    source.read(0, 1 << 20)
    source.close()
    assert (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns) == before


def test_seek_index_is_cached_and_reused(archives, disk, cache_dir):
    path = archives["tar.gz"]
    seen = []
    builds = compressed.STATS["index_builds"]
    first = open_source(path, progress=lambda done, total: seen.append((done, total)))
    first.close()
    assert compressed.STATS["index_builds"] == builds + 1
    assert seen and seen[-1] == (path.stat().st_size, path.stat().st_size)
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))
    second = open_source(path)
    try:
        assert compressed.STATS["index_builds"] == builds + 1, "second open rebuilt the index"
        _assert_same(second, disk, samples=10)
    finally:
        second.close()
    # A changed archive (other mtime) must not reuse the old index.
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    open_source(path).close()
    assert compressed.STATS["index_builds"] == builds + 2


@pytest.mark.parametrize("kind", ["tar.gz", "tar.zst", "zip-deflated", "gz"])
def test_scratch_space_stays_small(kind, archives, disk, cache_dir):
    source = open_source(archives[kind])
    source.read(0, source.size)
    source.close()
    used = sum(p.stat().st_size for p in cache_dir.rglob("*") if p.is_file())
    assert 0 < used < disk.stat().st_size // 16, f"cache holds {used} bytes for a {kind}"


def test_zstd_member_table_is_cached(archives, cache_dir):
    builds = compressed.STATS["index_builds"]
    open_source(archives["tar.zst"]).close()
    open_source(archives["tar.zst"]).close()
    assert compressed.STATS["index_builds"] == builds + 1


def test_lists_members_for_inspect(archives, disk):
    from rescue.source.base import FileSource
    source = FileSource(archives["zip-deflated"])
    try:
        members = {m.name: m for m in list_members(source)}
    finally:
        source.close()
    assert members[f"export/{disk.name}"].size == disk.stat().st_size
    assert members[f"export/{disk.name}"].type == "file"
    assert members["README.txt"].size == len("provider export\n")
    sparse = FileSource(archives["gnu-sparse"])
    try:
        (only,) = list_members(sparse)
    finally:
        sparse.close()
    assert (only.name, only.type, only.size) == (disk.name, "sparse", disk.stat().st_size)


@pytest.fixture(scope="session")
def two_disks(disk, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two")
    shutil.copy(disk, out / "root.img")
    shutil.copy(disk, out / "data.img")
    (out / "notes.txt").write_text("two disks\n")
    path = out / "two.tar.gz"
    _run("tar", "-czf", str(path), "-C", str(out), "root.img", "data.img", "notes.txt")
    return path


def test_several_disks_need_member(two_disks):
    with pytest.raises(SourceError) as err:
        open_source(two_disks)
    text = str(err.value)
    assert "root.img" in text and "data.img" in text and "--member NAME" in text


def test_member_picks_one_of_several(two_disks, disk):
    source = open_source(two_disks, member="data.img")
    try:
        assert source.size == disk.stat().st_size
        assert source.read(MiB, 4096) == disk.read_bytes()[MiB:MiB + 4096]
    finally:
        source.close()


def test_member_not_found_lists_members(two_disks):
    with pytest.raises(SourceError) as err:
        open_source(two_disks, member="nope.raw")
    assert "nope.raw" in str(err.value) and "root.img" in str(err.value)


def test_member_on_a_bare_disk_is_an_error(disk):
    with pytest.raises(SourceError, match="not an archive"):
        open_source(disk, member="x")


def test_truncated_tar_gz_is_a_clear_error(archives, tmp_path):
    data = archives["tar.gz"].read_bytes()
    bad = tmp_path / "cut.tar.gz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match="ends early|truncated"):
        open_source(bad)


def test_truncated_plain_tar_is_a_clear_error(archives, tmp_path):
    data = archives["tar"].read_bytes()
    bad = tmp_path / "cut.tar"
    bad.write_bytes(data[: 5 * MiB])
    with pytest.raises(SourceError, match="truncated"):
        open_source(bad)


def test_truncated_zstd_is_a_clear_error(archives, tmp_path):
    data = archives["tar.zst"].read_bytes()
    bad = tmp_path / "cut.tar.zst"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match="truncated"):
        open_source(bad)


def test_corrupt_gzip_is_a_clear_error(archives, tmp_path):
    data = bytearray(archives["tar.gz"].read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)
    bad = tmp_path / "corrupt.tar.gz"
    bad.write_bytes(bytes(data))
    with pytest.raises(SourceError, match="corrupt|damaged"):
        open_source(bad)


def test_gzip_of_text_is_not_mistaken_for_an_archive(tmp_path):
    path = tmp_path / "notes.gz"
    path.write_bytes(gzip.compress(b"hello\n" * 1000))
    source = open_source(path)
    try:
        assert source.read(0, 12) == b"hello\nhello\n"
    finally:
        source.close()


@pytest.fixture(scope="session")
def vmdk_tar(disk, tmp_path_factory) -> Path:
    _need("qemu-img")
    out = tmp_path_factory.mktemp("vmdk")
    _run("qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicFlat",
         str(disk), str(out / "server.vmdk"))
    (out / "server.ovf").write_text("<Envelope/>\n")
    path = out / "export.tar"
    _run("tar", "-cf", str(path), "-C", str(out), "server.ovf", "server.vmdk", "server-flat.vmdk")
    return path


def test_vmdk_descriptor_is_chosen_and_opens_its_extent(vmdk_tar, disk):
    source = open_source(vmdk_tar)
    try:
        assert source.name.endswith("::server.vmdk")
        assert source.read(0, 21) == b"# Disk DescriptorFile"
        extent = open_relative(source, "server-flat.vmdk")
        assert extent.read(MiB, 4096) == disk.read_bytes()[MiB:MiB + 4096]
    finally:
        source.close()


def test_qcow2_inside_tar_gz_reads_as_the_disk(disk, tmp_path):
    from rescue import disk as disklayer
    if "qcow2" not in disklayer.FORMATS:
        pytest.skip("the qcow2 reader is not registered yet")
    _need("qemu-img")
    _run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(disk), str(tmp_path / "vm.qcow2"))
    _run("tar", "-czf", str(tmp_path / "vm.tar.gz"), "-C", str(tmp_path), "vm.qcow2")
    source = open_source(tmp_path / "vm.tar.gz")
    try:
        image = disklayer.open_disk(source)
        assert image.info.format == "qcow2"
        _assert_same(image, disk, samples=10)
    finally:
        source.close()


def _tar_entries(path: Path) -> dict[str, tuple]:
    import tarfile
    out = {}
    with tarfile.open(path) as tf:
        for info in tf:
            data = tf.extractfile(info).read() if info.isreg() else b""
            out[info.name] = (info.type, info.size, info.mode, info.mtime, info.uid, info.gid,
                              info.linkname, hashlib.sha256(data).hexdigest())
    return out


@pytest.fixture(scope="session")
def bare_extract(disk, tmp_path_factory) -> Path:
    rescue = REPO / ".venv" / "bin" / "rescue"
    if not rescue.exists():
        pytest.skip("the rescue command is not installed in .venv")
    out = tmp_path_factory.mktemp("extract") / "bare.tar"
    subprocess.run([str(rescue), "extract", str(disk), "--path", "/var/www", "--path", "/etc",
                    "-o", str(out)], check=True, capture_output=True)
    return out


@pytest.mark.parametrize("kind", ["tar.gz", "tar.zst", "pax-sparse-1.0"])
def test_extract_through_archive_equals_extract_from_bare_disk(kind, archives, bare_extract,
                                                               tmp_path):
    out = tmp_path / f"{kind}.tar"
    cmd = [str(REPO / ".venv" / "bin" / "rescue"), "extract",
           str(archives[kind]), "--path", "/var/www", "--path", "/etc", "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    want = _tar_entries(bare_extract)
    assert len(want) > 20
    assert _tar_entries(out) == want


def test_concatenated_gzip_members_read_as_one_disk(disk, tmp_path):
    data = disk.read_bytes()
    path = tmp_path / "parts.gz"
    path.write_bytes(gzip.compress(data[:5 * MiB]) + gzip.compress(data[5 * MiB:]))
    source = open_source(path)
    try:
        _assert_same(source, disk, samples=10)
    finally:
        source.close()
    cut = tmp_path / "parts-cut.gz"
    cut.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(SourceError, match="truncated"):
        open_source(cut)


def test_compressed_disk_inside_a_tar_is_unwrapped_too(archives, disk, tmp_path, cache_dir):
    """A `.disk.gz` packed in a tar, and a `.tar.gz` packed in a zip."""
    nested_tar = tmp_path / "nested.tar"
    _run("tar", "-cf", str(nested_tar), "-C", str(archives["gz"].parent), archives["gz"].name)
    nested_zip = tmp_path / "nested.zip"
    with zipfile.ZipFile(nested_zip, "w", zipfile.ZIP_STORED) as zf:
        zf.write(archives["tar.gz"], "backup/snap.tar.gz")
    for path in (nested_tar, nested_zip):
        builds = compressed.STATS["index_builds"]
        source = open_source(path)
        try:
            _assert_same(source, disk, samples=10)
        finally:
            source.close()
        assert compressed.STATS["index_builds"] == builds + 1
        open_source(path).close()  # the inner index is cached under the outer identity
        assert compressed.STATS["index_builds"] == builds + 1


def test_overlapping_sparse_map_is_refused(archives, tmp_path):
    import re
    data = archives["pax-sparse-0.1"].read_bytes()
    found = re.search(rb"GNU\.sparse\.map=([0-9,]+)\n", data)
    numbers = found.group(1).split(b",")
    assert len(numbers) >= 4
    # Second run starts where the first does (same widths: zero-padded, so the
    # pax record keeps its length).
    numbers[2] = numbers[0].rjust(len(numbers[2]), b"0")
    bad = data[:found.start(1)] + b",".join(numbers) + data[found.end(1):]
    path = tmp_path / "overlap.tar"
    path.write_bytes(bad)
    with pytest.raises(SourceError, match="inconsistent sparse map"):
        open_source(path)


def test_inspect_summary_names_the_archive_and_member(archives, two_disks, disk):
    import json
    source = open_source(two_disks, member="data.img")
    try:
        info = source.archive_info()
    finally:
        source.close()
    assert json.loads(json.dumps(info))["member"] == "data.img"
    assert {m["name"] for m in info["members"]} == {"root.img", "data.img", "notes.txt"}
    assert str(info) == "tar.gz, member data.img (of 3 files)"
    bare = open_source(archives["zst"])
    try:
        assert str(bare.archive_info()) == "zstd-compressed disk"
        assert bare.archive_info()["size"] == disk.stat().st_size
    finally:
        bare.close()


def test_tar_gz_over_http_reads_like_the_bare_disk(archives, disk):
    """A provider's .tar.gz behind a URL (Range requests; streamed once to index)."""
    pytest.importorskip("urllib3")
    import threading

    from http_test_server import Server
    server = Server()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        url = server.serve("/snap.tar.gz", archives["tar.gz"])
        builds = compressed.STATS["index_builds"]
        source = open_source(url + "?X-Amz-Signature=one")
        try:
            assert source.name.endswith("::vps.disk")
            _assert_same(source, disk, samples=10)
        finally:
            source.close()
        # A fresh pre-signed link to the same object reuses the index (same ETag).
        open_source(url + "?X-Amz-Signature=two").close()
        assert compressed.STATS["index_builds"] == builds + 1
    finally:
        server.shutdown()
        server.server_close()


def test_gzip_index_widens_its_spacing_when_the_disk_is_bigger_than_guessed(archives, disk,
                                                                              monkeypatch):
    """Memory stays bounded: more seek points than allowed -> rebuilt wider."""
    monkeypatch.setattr(GzipSource, "MAX_POINTS", 1)
    builds = compressed.STATS["index_builds"]
    source = open_source(archives["gz"])
    try:
        assert source._spacing >= disk.stat().st_size  # one point for the whole disk
        assert compressed.STATS["index_builds"] > builds + 1
        _assert_same(source, disk, samples=10)
    finally:
        source.close()


def test_gzip_spacing_comes_from_the_tar_header_not_the_compressed_size(tmp_path):
    """An empty 16 GiB disk packs into a few KiB: the tar header tells its size."""
    (tmp_path / "empty.disk").touch()
    os.truncate(tmp_path / "empty.disk", 16 << 30)
    path = tmp_path / "empty.tar.gz"
    _run("tar", "-cSzf", str(path), "-C", str(tmp_path), "empty.disk")
    assert path.stat().st_size < 64 * 1024
    source = open_source(path)
    try:
        gz = source.archive.inner
        assert source.size == 16 << 30
        assert gz._spacing == (16 << 30) // GzipSource.TARGET_POINTS
        assert source.read(5 << 30, 4096) == bytes(4096)
    finally:
        source.close()
