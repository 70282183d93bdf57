"""`rescue download` against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys

import pytest

from repo_paths import REPO
from http_test_server import DENIED_BODY, EXPIRED_BODY, http_server  # noqa: F401 (fixture)
from rescue.download import ChecksumMismatch, download
from rescue.errors import RescueError, SourceError, TargetError

MiB = 1 << 20


@pytest.fixture
def snapshot(tmp_path):
    """An 8 MiB 'snapshot' with distinct content in every MiB."""
    path = tmp_path / "srv" / "vps.tar.gz"
    path.parent.mkdir()
    path.write_bytes(random.Random(8).randbytes(8 * MiB))
    return path


def digests(path):
    data = path.read_bytes()
    return hashlib.md5(data).hexdigest(), hashlib.sha256(data).hexdigest()


def test_downloads_and_verifies_md5_and_sha256(http_server, snapshot, tmp_path):
    url = http_server.serve("vps.tar.gz", snapshot)
    out = tmp_path / "vps.tar.gz"
    md5, sha = digests(snapshot)
    seen = []
    res = download(url, out, md5=md5.upper(), sha256=sha, progress=lambda d, t: seen.append((d, t)))
    assert out.read_bytes() == snapshot.read_bytes()
    assert res.digests == {"md5": md5, "sha256": sha} and res.resumed_from == 0
    assert not (tmp_path / "vps.tar.gz.part").exists()
    assert not (tmp_path / "vps.tar.gz.part.meta").exists()
    assert seen[-1] == (8 * MiB, 8 * MiB)


def test_resumes_a_killed_transfer_and_fetches_only_the_remainder(http_server, snapshot, tmp_path):
    url = http_server.serve("vps.tar.gz", snapshot)
    out = tmp_path / "vps.tar.gz"
    http_server.modes.drop_after = 3 * MiB + 12345
    with pytest.raises(SourceError, match="failed after"):
        download(url, out, retries=0)
    part = tmp_path / "vps.tar.gz.part"
    have = part.stat().st_size
    assert 0 < have < 8 * MiB and not out.exists()
    assert snapshot.read_bytes()[:have] == part.read_bytes()
    meta = json.loads((tmp_path / "vps.tar.gz.part.meta").read_text())
    assert meta["etag"] and meta["size"] == 8 * MiB

    http_server.reset()
    md5, _ = digests(snapshot)
    res = download(url, out, md5=md5)
    assert out.read_bytes() == snapshot.read_bytes()
    assert res.resumed_from == have
    sent = http_server.body_bytes_sent()
    assert sent == 8 * MiB - have + 1  # the rest, plus the probe's one byte
    ranged = [e for e in http_server.log if e.range == f"bytes={have}-"]
    assert ranged and ranged[0].if_range and ranged[0].status == 206


def test_dropped_connections_within_one_run_are_resumed_with_backoff(http_server, snapshot,
                                                                      tmp_path):
    url = http_server.serve("vps.tar.gz", snapshot)
    http_server.modes.drop_after = 700 << 10
    http_server.modes.fail_times = 2
    md5, _ = digests(snapshot)
    out = tmp_path / "vps.tar.gz"
    res = download(url, out, md5=md5, retries=3, backoff=0.01)
    assert out.read_bytes() == snapshot.read_bytes()
    assert res.fetched <= 8 * MiB + 1
    assert len([e for e in http_server.log if e.status == 206]) >= 8 * MiB // (700 << 10)


def test_checksum_mismatch_keeps_the_part_and_never_renames(http_server, snapshot, tmp_path):
    url = http_server.serve("vps.tar.gz", snapshot)
    out = tmp_path / "vps.tar.gz"
    with pytest.raises(ChecksumMismatch, match="md5 mismatch") as e:
        download(url, out, md5="0" * 32)
    assert isinstance(e.value, RescueError)  # the CLI turns it into exit 2
    assert not out.exists()
    assert (tmp_path / "vps.tar.gz.part").read_bytes() == snapshot.read_bytes()
    assert "kept" in e.value.hint
    with pytest.raises(ChecksumMismatch):  # parallel path hashes at the end
        download(url, tmp_path / "other", sha256="ab" * 32, connections=3, piece_size=MiB)
    assert not (tmp_path / "other").exists() and (tmp_path / "other.part").exists()


def test_missing_denied_and_expired_links(http_server, snapshot, tmp_path):
    with pytest.raises(SourceError, match="not found.*404"):
        download(http_server.url("gone.tar.gz"), tmp_path / "x", retries=0)
    url = http_server.serve("vps.tar.gz", snapshot)
    http_server.modes.status, http_server.modes.body = 403, EXPIRED_BODY
    with pytest.raises(SourceError, match="expired") as e:
        download(url + "?OSSAccessKeyId=LTAIsecret&Signature=s3cr3t&Expires=1", tmp_path / "x")
    assert "s3cr3t" not in str(e.value) and "LTAIsecret" not in str(e.value)
    http_server.modes.body = DENIED_BODY
    with pytest.raises(SourceError, match="access denied"):
        download(url, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_server_ignoring_range_restarts_from_zero_with_a_warning(http_server, snapshot, tmp_path):
    url = http_server.serve("vps.tar.gz", snapshot)
    out = tmp_path / "vps.tar.gz"
    http_server.modes.drop_after = 2 * MiB
    with pytest.raises(SourceError):
        download(url, out, retries=0)
    assert (tmp_path / "vps.tar.gz.part").stat().st_size > 0
    http_server.reset()
    http_server.modes.no_range = True
    warned = []
    res = download(url, out, md5=digests(snapshot)[0], warn=warned.append)
    assert out.read_bytes() == snapshot.read_bytes()
    assert any("Range" in w and "from zero" in w for w in warned), warned
    assert res.resumed_from == 0


def test_a_resume_answered_with_the_whole_file_restarts_from_zero(http_server, snapshot, tmp_path):
    """The probe got a 206, but the resume request gets 200 and the whole file."""
    url = http_server.serve("vps.tar.gz", snapshot)
    out = tmp_path / "vps.tar.gz"
    http_server.modes.drop_after = 2 * MiB
    with pytest.raises(SourceError):
        download(url, out, retries=0)
    http_server.reset()
    http_server.modes.probe_range_only = True
    warned = []
    res = download(url, out, sha256=digests(snapshot)[1], warn=warned.append)
    assert out.read_bytes() == snapshot.read_bytes()
    assert any("ignored the Range request" in w for w in warned), warned
    assert http_server.body_bytes_sent() == 8 * MiB + 1


def test_a_file_changed_between_attempts_is_fetched_again_not_spliced(http_server, snapshot,
                                                                      tmp_path):
    url = http_server.serve("vps.tar.gz", snapshot)
    out = tmp_path / "vps.tar.gz"
    http_server.modes.drop_after = 3 * MiB
    with pytest.raises(SourceError):
        download(url, out, retries=0)
    new = snapshot.with_name("new")
    new.write_bytes(random.Random(9).randbytes(8 * MiB))  # same size, other bytes
    os.replace(new, snapshot)
    http_server.reset()
    warned = []
    res = download(url, out, warn=warned.append)
    assert out.read_bytes() == snapshot.read_bytes()
    assert any("changed on the server" in w and "ETag" in w for w in warned), warned
    assert res.resumed_from == 0 and res.fetched >= 8 * MiB


def test_parallel_ranges_and_their_resume(http_server, snapshot, tmp_path):
    url = http_server.serve("vps.tar.gz", snapshot)
    out = tmp_path / "vps.tar.gz"
    md5, sha = digests(snapshot)
    http_server.modes.budget = 3 * MiB + 1000  # the server dies after ~3 MiB
    with pytest.raises(SourceError):
        download(url, out, connections=3, piece_size=MiB, retries=0)
    meta = json.loads((tmp_path / "vps.tar.gz.part.meta").read_text())
    saved = sum(b - a for a, b in meta["done"])
    assert meta["mode"] == "ranges" and saved >= MiB
    http_server.reset()
    res = download(url, out, sha256=sha, connections=1)  # gaps filled with one connection
    assert out.read_bytes() == snapshot.read_bytes()
    assert res.resumed_from == saved
    assert http_server.body_bytes_sent() <= 8 * MiB - saved + 1
    out.unlink()
    http_server.reset()
    res = download(url, out, md5=md5, connections=4, piece_size=MiB)
    assert out.read_bytes() == snapshot.read_bytes()
    assert len([e for e in http_server.log if e.status == 206]) >= 8


def test_refuses_to_overwrite_unless_forced(http_server, snapshot, tmp_path):
    url = http_server.serve("vps.tar.gz", snapshot)
    out = tmp_path / "keep.me"
    out.write_bytes(b"precious")
    with pytest.raises(TargetError, match="already exists") as e:
        download(url, out)
    assert "--force" in e.value.hint and out.read_bytes() == b"precious"
    download(url, out, force=True)
    assert out.read_bytes() == snapshot.read_bytes()


def test_bad_checksum_argument_is_rejected_before_any_request(http_server, snapshot, tmp_path):
    url = http_server.serve("vps.tar.gz", snapshot)
    with pytest.raises(RescueError, match="32 hex digits"):
        download(url, tmp_path / "x", md5="xyz")
    assert http_server.log == []


def test_full_disk_is_a_clear_error_and_the_part_resumes(http_server, snapshot, tmp_path):
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a tiny tmpfs")
    small = tmp_path / "small"
    small.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(small)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount tmpfs: {r.stderr.strip()}")
    try:
        url = http_server.serve("vps.tar.gz", snapshot)
        out = small / "vps.tar.gz"
        with pytest.raises(TargetError, match="disk full") as e:
            download(url, out)
        assert "resumes" in e.value.hint
        part = small / "vps.tar.gz.part"
        have = part.stat().st_size
        assert have > MiB and not out.exists()
        assert part.read_bytes() == snapshot.read_bytes()[:have]
        subprocess.run(["mount", "-o", "remount,size=12m", str(small)], check=True)
        http_server.reset()
        res = download(url, out, md5=digests(snapshot)[0])
        assert res.resumed_from == have
        assert out.read_bytes() == snapshot.read_bytes()
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_cli_download_exit_codes_and_kept_part(http_server, snapshot, tmp_path):
    url = http_server.serve("vps.tar.gz", snapshot)
    repo = REPO
    env = dict(os.environ, PYTHONPATH=str(repo))

    def rescue(*args):
        return subprocess.run([sys.executable, "-m", "rescue", *args], capture_output=True,
                              text=True, env=env, cwd=repo, timeout=120)

    bad = rescue("download", url, "-o", str(tmp_path / "a.tgz"), "--md5", "0" * 32)
    assert bad.returncode == 2 and "md5 mismatch" in bad.stderr
    assert (tmp_path / "a.tgz.part").exists() and not (tmp_path / "a.tgz").exists()
    good = rescue("download", url, "-o", str(tmp_path / "b.tgz"), "--sha256",
                  digests(snapshot)[1], "--connections", "3", "--json")
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["verified"]["sha256"] == digests(snapshot)[1]
    assert (tmp_path / "b.tgz").read_bytes() == snapshot.read_bytes()
    again = rescue("download", url, "-o", str(tmp_path / "b.tgz"))
    assert again.returncode == 2 and "--force" in again.stderr
    neither = rescue("download", "ftp://x/y", "-o", str(tmp_path / "c"))
    assert neither.returncode == 2 and "kiwivm" in neither.stderr
