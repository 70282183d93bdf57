"""KiwiVM snapshots against a local server speaking the list endpoint's JSON."""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import subprocess
import sys

import pytest

from repo_paths import REPO
from http_test_server import http_server  # noqa: F401 (fixture)
from rescue.download import ChecksumMismatch
from rescue.providers.kiwivm import (KiwiVMError, choose_snapshot, download_snapshot,
                                     list_snapshots)

KEY = "private_Zk9sEcReT4pi"
VEID = "1234567"


@pytest.fixture
def kiwi(http_server, tmp_path):
    """A fake api.64clouds.com: two snapshots, served files, KiwiVM-style errors."""
    files = {}
    for name, seed, size in (("old.tar.gz", 1, 300_000), ("new.tar.gz", 2, 2_500_000)):
        path = tmp_path / "srv" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(random.Random(seed).randbytes(size))
        http_server.serve(f"snap/{name}", path)
        files[name] = path
    state = {"md5_override": {}, "names": {}}

    def entry(name: str, purges: int, sticky: bool = False) -> dict:
        path = files[name]
        md5 = state["md5_override"].get(name) or hashlib.md5(path.read_bytes()).hexdigest()
        shown = state["names"].get(name, name)
        return {"fileName": shown, "os": "debian-12-x86_64", "description": f"before {name}",
                "size": str(path.stat().st_size), "md5": md5, "sticky": sticky,
                "purgesIn": purges, "downloadLink": http_server.url(f"snap/{name}"),
                "downloadLinkSSL": http_server.url(f"snap/{name}")}

    def snapshot_list(query):
        if query.get("api_key") != [KEY]:
            # KiwiVM style: HTTP 200 with an error code; the message echoes the key.
            body = {"error": 700005, "message": f"Authentication failure (api_key="
                                                f"{query.get('api_key', [''])[0]})"}
            return 200, "application/json", json.dumps(body).encode()
        if query.get("veid") != [VEID]:
            return 200, "application/json", b'{"error":700001,"message":"Invalid veid"}'
        body = {"error": 0, "snapshots": [entry("old.tar.gz", 86400 * 3),
                                          entry("new.tar.gz", 86400 * 9)]}
        return 200, "application/json", json.dumps(body).encode()

    http_server.routes["/v1/snapshot/list"] = snapshot_list
    return http_server, files, state


def test_lists_snapshots_with_the_documented_fields(kiwi):
    server, files, _ = kiwi
    snaps = list_snapshots(VEID, KEY, server.base)
    assert [s.file_name for s in snaps] == ["old.tar.gz", "new.tar.gz"]
    new = snaps[1]
    assert new.size == files["new.tar.gz"].stat().st_size
    assert new.md5 == hashlib.md5(files["new.tar.gz"].read_bytes()).hexdigest()
    assert new.purges_in == 86400 * 9 and new.sticky is False and new.os.startswith("debian")
    assert new.to_json()["downloadLinkSSL"].endswith("/snap/new.tar.gz")
    assert choose_snapshot(snaps, latest=True) is new
    assert choose_snapshot(snaps, "old.tar.gz") is snaps[0]
    with pytest.raises(KiwiVMError, match="--latest"):
        choose_snapshot(snaps)


def test_api_errors_are_clear_and_never_show_the_key(kiwi, monkeypatch):
    server, _, _ = kiwi
    with pytest.raises(KiwiVMError, match="API error 700005: Authentication failure") as e:
        list_snapshots(VEID, KEY + "x", server.base)
    assert KEY not in str(e.value)
    assert "API key" in e.value.hint
    with pytest.raises(KiwiVMError, match="700001: Invalid veid"):
        list_snapshots("999", KEY, server.base)
    with pytest.raises(KiwiVMError, match="numeric"):
        list_snapshots("12; rm", KEY, server.base)
    monkeypatch.delenv("RESCUE_KIWIVM_API_KEY", raising=False)
    with pytest.raises(KiwiVMError, match="no API key") as e:
        list_snapshots(VEID, None, server.base)
    assert "RESCUE_KIWIVM_API_KEY" in e.value.hint


def test_unreachable_api_error_masks_the_key_in_the_url():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(Exception) as e:
        list_snapshots(VEID, KEY, f"http://127.0.0.1:{port}", retries=0)
    assert "connection refused" in str(e.value) and KEY not in str(e.value)
    assert "api_key=***" in str(e.value)


def test_downloads_the_latest_snapshot_and_checks_its_md5(kiwi, tmp_path, monkeypatch):
    server, files, _ = kiwi
    monkeypatch.setenv("RESCUE_KIWIVM_API_KEY", KEY)
    monkeypatch.setenv("RESCUE_KIWIVM_API_URL", server.base)
    snap, res = download_snapshot(VEID, tmp_path / "dl", latest=True)
    assert snap.file_name == "new.tar.gz"
    assert (tmp_path / "dl" / "new.tar.gz").read_bytes() == files["new.tar.gz"].read_bytes()
    assert res.digests["md5"] == snap.md5


def test_a_listed_md5_that_does_not_match_keeps_the_part(kiwi, tmp_path):
    server, files, state = kiwi
    state["md5_override"]["old.tar.gz"] = "f" * 32
    with pytest.raises(ChecksumMismatch):
        download_snapshot(VEID, tmp_path, api_key=KEY, api_url=server.base, snapshot="old.tar.gz")
    assert not (tmp_path / "old.tar.gz").exists() and (tmp_path / "old.tar.gz.part").exists()


def test_a_hostile_file_name_from_the_api_is_refused(kiwi, tmp_path):
    server, _, state = kiwi
    state["names"]["new.tar.gz"] = "../../etc/cron.d/x"
    with pytest.raises(KiwiVMError, match="refusing"):
        download_snapshot(VEID, tmp_path / "d", api_key=KEY, api_url=server.base,
                          snapshot="../../etc/cron.d/x")
    assert not any(tmp_path.rglob("x"))


def _rescue(*args, env=None):
    full = dict(os.environ, **(env or {}))
    full["PYTHONPATH"] = str(REPO) + os.pathsep + full.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "rescue", *args], capture_output=True,
                          text=True, env=full, cwd=REPO, timeout=120)


def test_cli_lists_and_downloads_without_ever_printing_the_key(kiwi, tmp_path):
    server, files, _ = kiwi
    env = {"RESCUE_KIWIVM_API_KEY": KEY}
    r = _rescue("snapshots", "kiwivm", "--veid", VEID, "--api-url", server.base, "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert [s["fileName"] for s in json.loads(r.stdout)] == ["old.tar.gz", "new.tar.gz"]
    r2 = _rescue("snapshots", "kiwivm", "--veid", VEID, "--api-url", server.base, env=env)
    assert r2.returncode == 0 and "new.tar.gz" in r2.stdout
    r3 = _rescue("download", "kiwivm", "--veid", VEID, "--latest", "-o", str(tmp_path / "out"),
                 "--api-url", server.base, "--json", env=env)
    assert r3.returncode == 0, r3.stderr
    assert json.loads(r3.stdout)["verified"]["md5"]
    assert (tmp_path / "out" / "new.tar.gz").read_bytes() == files["new.tar.gz"].read_bytes()
    r4 = _rescue("snapshots", "kiwivm", "--veid", VEID, "--api-url", server.base,
                 "--api-key", KEY + "wrong")
    assert r4.returncode == 2 and "700005" in r4.stderr and len(r4.stderr.strip().splitlines()) == 1
    for r in (r, r2, r3, r4):
        assert KEY not in r.stdout + r.stderr
