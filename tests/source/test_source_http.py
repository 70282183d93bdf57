"""Remote images read lazily over HTTP, against a real server on 127.0.0.1."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess

import pytest

from http_test_server import DENIED_BODY, EXPIRED_BODY, http_server  # noqa: F401 (fixture)
from rescue.errors import SourceError
from rescue.source.base import FileSource
from rescue.source.http import HttpSource
from rescue.source.http_client import ChangedError, redact_url

MiB = 1 << 20


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """An 8 MiB raw disk with varied content, and (when qemu-img exists) the
    same disk as qcow2 made by the real tool."""
    d = tmp_path_factory.mktemp("httpimg")
    rnd = random.Random(4)
    raw = d / "disk.raw"
    with open(raw, "wb") as f:
        for i in range(8):
            f.write(rnd.randbytes(MiB) if i % 3 else b"\0" * MiB)
    out = {"raw": raw}
    if shutil.which("qemu-img"):
        qcow = d / "disk.qcow2"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow)],
                       check=True)
        out["qcow2"] = qcow
    sparse = d / "big-sparse.img"
    with open(sparse, "wb") as f:
        f.truncate(256 * MiB)
        for off in (0, 100 * MiB, 255 * MiB):
            f.seek(off)
            f.write(rnd.randbytes(64 << 10))
    out["sparse"] = sparse
    return out


def test_remote_raw_and_qcow2_read_the_same_bytes_as_the_local_file(http_server, images):
    for kind in ("raw", "qcow2"):
        if kind not in images:
            continue
        local = FileSource(images[kind])
        remote = HttpSource(http_server.serve(kind, images[kind]), block_size=256 << 10,
                            cache_size=2 * MiB)
        assert remote.size == local.size
        rnd = random.Random(kind)
        for _ in range(200):
            off = rnd.randrange(0, local.size + 1000)
            n = rnd.choice([1, 511, 4096, 65536, 300_000, 1_500_000])
            assert remote.read(off, n) == local.read(off, n), (kind, off, n)
        assert remote.read(local.size - 3, 100) == local.read(local.size - 3, 3)
        assert remote.read(local.size, 10) == b""
        local.close()
    if "qcow2" not in images:
        pytest.skip("qemu-img not installed: qcow2 over HTTP not compared")


def test_qcow2_over_http_opens_through_the_disk_layer(http_server, images):
    from rescue import disk
    if "qcow2" not in images:
        pytest.skip("qemu-img not installed")
    if "qcow2" not in disk.FORMATS:
        pytest.skip("no qcow2 reader registered in rescue.disk yet")
    img = disk.open_disk(HttpSource(http_server.serve("d.qcow2", images["qcow2"])))
    raw = images["raw"].read_bytes()
    assert img.size == len(raw)
    for off in range(0, len(raw), 3 * MiB // 2):
        assert img.read(off, 100_000) == raw[off:off + 100_000]


def test_reading_a_few_kib_of_a_256_mib_image_fetches_a_small_fraction(http_server, images):
    src = HttpSource(http_server.serve("big", images["sparse"]))
    data = src.read(100 * MiB + 1000, 4096)
    with open(images["sparse"], "rb") as f:
        f.seek(100 * MiB + 1000)
        assert data == f.read(4096)
    assert src.bytes_fetched == http_server.body_bytes_sent("big")
    assert src.bytes_fetched <= 2 * MiB
    assert src.bytes_fetched / src.size < 0.01
    again = src.requests
    src.read(100 * MiB, 8192)  # same block: served from the cache
    assert src.requests == again


def test_sequential_reads_grow_the_read_ahead_into_few_large_requests(http_server, images):
    src = HttpSource(http_server.serve("seq", images["sparse"]))
    before = src.requests
    for off in range(0, 32 * MiB, 64 << 10):
        src.read(off, 64 << 10)
    made = src.requests - before
    # 512 reads of 64 KiB; one request per 1 MiB block would be 32.
    assert made < 12, made
    assert src.bytes_fetched <= 32 * MiB + 16 * MiB + MiB


def test_server_without_range_support_suggests_download_first(http_server, images):
    http_server.modes.no_range = True
    with pytest.raises(SourceError) as e:
        HttpSource(http_server.serve("norange", images["raw"]))
    assert "Range" in e.value.problem and "rescue download" in e.value.hint
    # The probe must not have pulled the whole file.
    assert http_server.body_bytes_sent("norange") < os.path.getsize(images["raw"])


def test_missing_denied_and_expired_links_are_told_apart(http_server, images):
    with pytest.raises(SourceError, match="not found.*404"):
        HttpSource(http_server.url("nothing-here.qcow2"), retries=0)
    url = http_server.serve("private", images["raw"])
    http_server.modes.status, http_server.modes.body = 403, DENIED_BODY
    with pytest.raises(SourceError, match="access denied") as e:
        HttpSource(url, retries=0)
    assert "expired" not in str(e.value)
    http_server.modes.body = EXPIRED_BODY
    with pytest.raises(SourceError, match="expired") as e:
        HttpSource(url + "?X-Amz-Signature=deadbeefsecret&X-Amz-Expires=60", retries=0)
    assert "deadbeefsecret" not in str(e.value)
    assert "fresh link" in e.value.hint


def test_connection_refused_is_a_clear_error():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(SourceError, match="connection refused") as e:
        HttpSource(f"http://127.0.0.1:{port}/disk.qcow2", retries=1, backoff=0.01)
    assert "server up" in e.value.hint


def test_a_file_replaced_mid_read_is_an_error_not_spliced_data(http_server, images, tmp_path):
    path = tmp_path / "changing.img"
    shutil.copy(images["raw"], path)
    src = HttpSource(http_server.serve("changing", path), block_size=256 << 10, cache_size=MiB)
    first = src.read(0, 1000)
    new = tmp_path / "new.img"
    new.write_bytes(b"X" * os.path.getsize(path))
    os.replace(new, path)  # a new inode and mtime: a new ETag
    assert src.read(0, 1000) == first  # cached: still the version we opened
    with pytest.raises(ChangedError, match="changed on the server"):
        src.read(5 * MiB, 1000)


def test_dropped_connections_and_503s_are_retried_and_resumed(http_server, images):
    url = http_server.serve("flaky", images["raw"])
    src = HttpSource(url, backoff=0.01)
    http_server.modes.drop_after = 300 << 10   # every response dies after 300 KiB
    http_server.modes.fail_times = 2
    data = src.read(2 * MiB, MiB)
    assert data == images["raw"].read_bytes()[2 * MiB:3 * MiB]
    ranged = [e for e in http_server.log if e.range and e.status == 206]
    assert len(ranged) >= 4  # 1 MiB in 300 KiB pieces, each resuming where the last stopped
    assert src.bytes_fetched <= MiB + 4 * (300 << 10)


def test_open_relative_resolves_a_sibling_url(http_server, images):
    http_server.serve("dir/base.raw", images["raw"])
    http_server.serve("dir/other.raw", images["sparse"])
    src = HttpSource(http_server.url("dir/base.raw"))
    sib = src.open_relative("other.raw")
    assert sib.size == os.path.getsize(images["sparse"])
    assert sib.url == http_server.url("dir/other.raw")


def test_open_source_accepts_a_url(http_server, images):
    from rescue.source import open_source
    src = open_source(http_server.serve("via-open", images["raw"]))
    try:
        assert src.read(MiB, 10) == images["raw"].read_bytes()[MiB:MiB + 10]
    finally:
        src.close()


def test_redacted_urls_hide_signatures_and_passwords():
    url = ("https://user:pw@bucket.s3.amazonaws.com/disk.vmdk?X-Amz-Credential=AKIA1&"
           "X-Amz-Signature=abc123&X-Amz-Expires=3600&api_key=SECRET")
    shown = redact_url(url)
    for secret in ("pw", "AKIA1", "abc123", "SECRET"):
        assert secret not in shown
    assert "bucket.s3.amazonaws.com/disk.vmdk" in shown and "X-Amz-Expires=3600" in shown


def test_extracting_docker_volumes_from_a_remote_qcow2_fetches_a_small_share(http_server,
                                                                             tmp_path):
    """The user's story: a 64 MiB ext4 disk as qcow2 in object storage; rescuing one
    small Docker volume must not pull the big file next to it."""
    for tool in ("mkfs.ext4", "qemu-img"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} not installed")
    from rescue.extract.run import ExtractOptions, extract
    from rescue.extract.targets import TargetOptions, open_sink
    from rescue.guest import SnapshotOptions, open_snapshot
    root = tmp_path / "root"
    vol = root / "var/lib/docker/volumes/db/_data"
    vol.mkdir(parents=True)
    (vol / "pg.dat").write_bytes(random.Random(1).randbytes(200_000))
    (root / "data").mkdir()
    (root / "data/big.bin").write_bytes(random.Random(2).randbytes(32 * MiB))
    raw, qcow = tmp_path / "disk.raw", tmp_path / "disk.qcow2"
    with open(raw, "wb") as f:
        f.truncate(64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-d", str(root), str(raw)], check=True)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow)],
                   check=True)
    tars = {}
    for where, spec in (("local", str(qcow)), ("remote", http_server.serve("disk.qcow2", qcow))):
        with open_snapshot(spec, SnapshotOptions()) as snap:
            out = tmp_path / f"{where}.tar"
            extract(snap.filesystem(), open_sink(str(out), TargetOptions()),
                    ExtractOptions(paths=["/var/lib/docker/volumes"]))
            tars[where] = out.read_bytes()
            fetched = getattr(snap.source, "bytes_fetched", None)
    assert tars["remote"] == tars["local"] and len(tars["local"]) > 200_000
    assert fetched == http_server.body_bytes_sent("disk.qcow2")
    share = fetched / os.path.getsize(qcow)
    assert share < 0.15, f"fetched {fetched} bytes = {share:.0%} of the image"


def test_a_provider_style_tar_gz_is_read_over_http_and_its_cost_reported(http_server, images,
                                                                         tmp_path):
    """KiwiVM/Google style: a .tar.gz holding one raw disk, read by URL."""
    import tarfile
    from rescue.source import open_source
    from rescue.source.stats import bytes_fetched
    arch = tmp_path / "snap.tar.gz"
    with tarfile.open(arch, "w:gz") as tar:
        tar.add(images["raw"], arcname="disk.raw")
    src = open_source(http_server.serve("snap.tar.gz", arch))
    try:
        raw = images["raw"].read_bytes()
        assert src.size == len(raw)
        assert src.read(3 * MiB + 5, 70_000) == raw[3 * MiB + 5:3 * MiB + 70_005]
        assert bytes_fetched(src) == http_server.body_bytes_sent("snap.tar.gz") > 0
    finally:
        src.close()
    assert bytes_fetched(FileSource(images["raw"])) is None


def test_a_stalled_server_times_out_with_a_clear_error_instead_of_hanging(http_server, images):
    url = http_server.serve("stalled", images["raw"])
    src = HttpSource(url, timeout=0.3, retries=1, backoff=0.01)
    http_server.modes.slow = 1.0  # 64 KiB per second: each read waits longer than the timeout
    with pytest.raises(SourceError, match="failed after 2 attempts.*Timeout"):
        src.read(0, 512 << 10)


def test_redirected_links_are_followed_with_their_ranges(http_server, images):
    """Provider links often redirect (a CDN, a signed object-store URL)."""
    target = http_server.serve("real/disk.raw", images["raw"])
    http_server.routes["/dl"] = lambda q: (302, "text/plain", b"", {"Location": target})
    src = HttpSource(http_server.url("dl"))
    assert src.size == os.path.getsize(images["raw"])
    assert src.read(5 * MiB, 1000) == images["raw"].read_bytes()[5 * MiB:5 * MiB + 1000]
    assert any(e.path == "/real/disk.raw" and e.status == 206 for e in http_server.log)
