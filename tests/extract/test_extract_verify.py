"""`rescue extract --manifest` and `rescue verify`: a target untouched passes,
and a flipped byte, a missing file, a changed mode and a changed symlink target
are each found, in a tarball, a directory, an rsync daemon and an rclone remote.

The snapshot is the committed sample (made by real mkfs, scripts/make-fixtures);
the targets are written by `rescue extract` itself, then damaged with ordinary
file operations (or by rewriting the tarball with tarfile)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from common_support import SAMPLE, explain, rescue

VOLS = "/var/lib/docker/volumes"
DATA = "var/lib/docker/volumes/myapp_uploads/_data"
FILE = f"{DATA}/docs/readme.txt"
GONE = f"{DATA}/images/photo 1.jpg"
MODE = f"{DATA}/docs/upload.log"
LINK = f"{DATA}/latest.jpg"
SPARSE = f"{DATA}/disk.sparse"

pytestmark = pytest.mark.skipif(not SAMPLE.exists(), reason="fixtures/sample-vps.disk is missing")


def _extract(out: str, *extra: str, code: int = 0):
    res = rescue("extract", str(SAMPLE), "--path", VOLS, "-o", out, *extra, "--keep-setuid")
    assert res.returncode == code, explain(res)
    return res


def _verify(*args: str, json_out: bool = True):
    res = rescue("verify", *(["--json"] if json_out else []), *args, check_readonly=False)
    assert b"Traceback" not in res.stderr, explain(res)
    return res, (json.loads(res.stdout) if json_out and res.stdout.strip() else None)


# -- the manifest ------------------------------------------------------------------

def test_manifest_lists_every_entry_with_the_sha256_of_what_was_written(tmp_path):
    out, man = tmp_path / "v.tar", tmp_path / "v.manifest.jsonl"
    _extract(str(out), "--manifest", str(man))
    lines = [json.loads(line) for line in man.read_text().splitlines()]
    header, end, records = lines[0], lines[-1], {r["path"]: r for r in lines[1:-1]}
    assert header["rescue_manifest"] == 1 and header["paths"] == [VOLS]
    assert end == {"end": True, "entries": len(records), "skipped": 0}
    with tarfile.open(out) as tf:
        members = {m.name: m for m in tf.getmembers()}
        assert set(members) == set(records)
        for name, m in members.items():
            rec = records[name]
            assert int(rec["mode"], 8) == m.mode and (rec["uid"], rec["gid"]) == (m.uid, m.gid), name
            if m.isfile():
                data = tf.extractfile(m).read()
                assert rec["sha256"] == hashlib.sha256(data).hexdigest() and rec["size"] == len(data), name
            if m.issym():
                assert rec["link_target"] == m.linkname
    # the sparse file is hashed with its holes (read through the sparse path, not twice)
    assert records[SPARSE]["size"] == 8 << 20
    assert records[f"{DATA}/images/logo.png"]["hardlink_to"] in records or \
        records[f"{DATA}/images/logo-hardlink.png"].get("hardlink_to") in records


def test_embedded_manifest_is_the_last_tar_member_and_verify_uses_it(tmp_path):
    out = tmp_path / "v.tar.zst"
    _extract(str(out), "--embed-manifest")
    res, rep = _verify(str(out))
    assert res.returncode == 0, explain(res)
    assert rep["equal"] and rep["expected_from"].startswith(".rescue-manifest.jsonl") and rep["compared"] > 30


# -- tar targets ---------------------------------------------------------------------

def _rewrite_tar(src: Path, dst: Path, change) -> None:
    """Copy a tarball member by member; change(member, data) -> (member, data) or None to drop."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read() if m.isfile() else None
            got = change(m, data)
            if got is None:
                continue
            m, data = got
            # written back dense: the sparse map of the original does not apply
            m.pax_headers = {k: v for k, v in m.pax_headers.items() if not k.startswith("GNU.sparse.")}
            m.sparse = None
            if data is not None:
                m.size = len(data)
            tout.addfile(m, io.BytesIO(data) if data is not None else None)


def _flip(m, data):
    if m.name == FILE:
        data = bytes([data[0] ^ 1]) + data[1:]
    return m, data


def _drop(m, data):
    return None if m.name == GONE else (m, data)


def _chmod(m, data):
    if m.name == MODE:
        m.mode = 0o600
    return m, data


def _relink(m, data):
    if m.name == LINK:
        m.linkname = "images/other.jpg"
    return m, data


TAR_DAMAGE = {"flipped byte": (_flip, "different", FILE, "content"),
              "missing file": (_drop, "missing", GONE, None),
              "changed mode": (_chmod, "different", MODE, "mode 0644 != 0600"),
              "changed symlink target": (_relink, "different", LINK, "link target")}


@pytest.fixture(scope="module")
def tarball(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("tar")
    out, man = base / "v.tar", base / "m.jsonl"
    _extract(str(out), "--manifest", str(man))
    return out, man


def test_untouched_tarball_passes_against_snapshot_and_manifest(tarball):
    out, man = tarball
    res, rep = _verify(str(SAMPLE), str(out), "--path", VOLS)
    assert res.returncode == 0 and rep["equal"] and rep["expected_from"] == "snapshot", explain(res)
    res, rep = _verify("--manifest", str(man), str(out))
    assert res.returncode == 0 and rep["equal"] and rep["compared"] == rep["compared"] > 30, explain(res)


@pytest.mark.parametrize("damage", list(TAR_DAMAGE))
def test_verify_finds_damage_in_a_tarball(tarball, tmp_path, damage):
    out, man = tarball
    change, where, name, detail = TAR_DAMAGE[damage]
    bad = tmp_path / "bad.tar"
    _rewrite_tar(out, bad, change)
    for args in ((str(SAMPLE), str(bad), "--path", VOLS), ("--manifest", str(man), str(bad))):
        res, rep = _verify(*args)
        assert res.returncode == 1, explain(res)
        _assert_found(rep, where, name, detail)


def _assert_found(rep: dict, where: str, name: str, detail: str | None) -> None:
    if where == "missing":
        assert rep["missing"] == [name] and not rep["different"], rep
    else:
        assert [d["path"] for d in rep["different"]] == [name] and not rep["missing"], rep
        assert any(detail in f for f in rep["different"][0]["fields"]), rep
    assert not rep["extra"], rep


def test_verify_human_output_names_the_damage(tarball, tmp_path):
    out, man = tarball
    bad = tmp_path / "bad.tar"
    _rewrite_tar(out, bad, _drop)
    res, _ = _verify("--manifest", str(man), str(bad), json_out=False)
    assert res.returncode == 1
    assert f"missing:   {GONE}".encode() in res.stdout
    assert b"NOT equal: 1 missing" in res.stderr


# -- directory targets -------------------------------------------------------------------

def _damage_dir(root: Path, damage: str) -> None:
    """One change, with the parent directory's mtime put back (only the damage itself shows)."""
    parent = (root / {"missing file": GONE, "changed symlink target": LINK}.get(damage, FILE)).parent
    st = parent.stat()
    _damage_dir_entry(root, damage)
    os.utime(parent, ns=(st.st_atime_ns, st.st_mtime_ns))


def _damage_dir_entry(root: Path, damage: str) -> None:
    if damage == "flipped byte":
        p = root / FILE
        data = p.read_bytes()
        st = p.stat()
        p.write_bytes(bytes([data[0] ^ 1]) + data[1:])
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))   # a silent corruption keeps the mtime
    elif damage == "missing file":
        (root / GONE).unlink()
    elif damage == "changed mode":
        os.chmod(root / MODE, 0o600)
    elif damage == "changed symlink target":
        p = root / LINK
        st = os.lstat(p)
        p.unlink()
        p.symlink_to("images/other.jpg")
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


@pytest.mark.parametrize("damage", [None] + list(TAR_DAMAGE))
def test_verify_directory_target(tmp_path, damage):
    out, man = tmp_path / "out", tmp_path / "m.jsonl"
    _extract(f"{out}/", "--manifest", str(man), "--embed-manifest")
    assert (out / ".rescue-manifest.jsonl").read_bytes() == man.read_bytes()   # one manifest, two copies
    if damage:
        _damage_dir(out, damage)
    for args in ((str(SAMPLE), str(out), "--path", VOLS), ("--manifest", str(man), str(out)), (str(out),)):
        res, rep = _verify(*args)
        if damage is None:
            assert res.returncode == 0 and rep["equal"], explain(res) + json.dumps(rep)
        else:
            assert res.returncode == 1, explain(res)
            _, where, name, detail = TAR_DAMAGE[damage]
            _assert_found(rep, where, name, detail)


def test_an_extra_file_in_the_target_is_listed(tmp_path):
    out = tmp_path / "out"
    _extract(f"{out}/", "--embed-manifest")
    (out / DATA / "intruder.txt").write_text("x")
    res, rep = _verify(str(out))
    assert res.returncode == 1 and rep["extra"] == [f"{DATA}/intruder.txt"], rep


def test_verify_needs_something_to_compare_with(tmp_path):
    out = tmp_path / "out"
    _extract(f"{out}/")
    res = rescue("verify", str(out), check_readonly=False)
    assert res.returncode == 2 and b"nothing to compare with" in res.stderr, explain(res)
    assert len(res.stderr.decode().strip().splitlines()) == 1


def test_verify_of_a_missing_target_is_one_line(tmp_path):
    res = rescue("verify", str(SAMPLE), str(tmp_path / "nope.tar"), check_readonly=False)
    assert res.returncode == 2 and b"does not exist" in res.stderr, explain(res)


# -- rsync and rclone targets (real servers on 127.0.0.1, see remote_servers.py) ----------

def _remote_fixtures():
    import remote_servers
    return remote_servers


@pytest.mark.skipif(not shutil.which("rsync"), reason="rsync is not installed")
@pytest.mark.parametrize("damage", [None, "flipped byte", "changed symlink target"])
def test_verify_rsync_daemon_target(tmp_path, damage):
    rs = _remote_fixtures()
    with rs.RsyncDaemon(tmp_path / "rsyncd") as daemon:
        url = daemon.url("open", "v/")
        man = tmp_path / "m.jsonl"
        _extract(url, "--manifest", str(man), "--devices")
        if damage:
            _damage_dir(daemon.open_dir / "v", damage)
        res, rep = _verify("--manifest", str(man), url)
        if damage is None:
            assert res.returncode == 0 and rep["equal"] and rep["kind"] == "rsync", explain(res) + json.dumps(rep)
        else:
            _, where, name, detail = TAR_DAMAGE[damage]
            assert res.returncode == 1, explain(res)
            _assert_found(rep, where, name, detail)


@pytest.mark.skipif(not shutil.which("rclone"), reason="rclone is not installed")
@pytest.mark.parametrize("damage", [None, "missing file", "flipped byte"])
def test_verify_rclone_target(tmp_path, monkeypatch, damage):
    rs = _remote_fixtures()
    with rs.RcloneSftp(tmp_path / "rclone") as server:
        server.use(monkeypatch)
        url = f"rclone:{server.name}:v/"
        res = _extract(url, "--embed-manifest", code=1)   # the volumes' one FIFO: named as skipped
        assert b"skipped: " in res.stderr and b"events.fifo: FIFO not sent" in res.stderr, explain(res)
        if damage:
            _damage_dir(server.root / "v", damage)
        res, rep = _verify(str(SAMPLE), url)
        if damage is None:
            assert res.returncode == 0 and rep["equal"] and rep["kind"] == "rclone", explain(res) + json.dumps(rep)
        else:
            _, where, name, detail = TAR_DAMAGE[damage]
            assert res.returncode == 1, explain(res)
            _assert_found(rep, where, name, detail)


@pytest.mark.skipif(not shutil.which("rclone"), reason="rclone is not installed")
def test_verify_rclone_tarball_streamed_with_rclone_cat(tmp_path, monkeypatch):
    rs = _remote_fixtures()
    with rs.RcloneSftp(tmp_path / "rclone") as server:
        server.use(monkeypatch)
        url = f"rclone:{server.name}:v.tar"
        _extract(url, "--embed-manifest")
        res, rep = _verify(str(SAMPLE), url)
        assert res.returncode == 0 and rep["equal"] and rep["kind"] == "tar", explain(res) + json.dumps(rep)
        good = server.root / "v.tar"
        bad = tmp_path / "bad.tar"
        _rewrite_tar(good, bad, _flip)
        shutil.copy(bad, good)
        res, rep = _verify(str(SAMPLE), url)
        assert res.returncode == 1, explain(res)
        _assert_found(rep, "different", FILE, "content")
