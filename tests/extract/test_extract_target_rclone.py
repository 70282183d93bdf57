"""rclone targets against a real `rclone serve sftp` on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from rescue.errors import TargetError
from remote_servers import (IS_ROOT, RcloneSftp, add_collecting_damaged, free_port, have, items_from_tree,
                            send_items, snapshot, tmpfs)

pytestmark = pytest.mark.skipif(not have("rclone"), reason="rclone is not installed")
pytest_plugins = ["remote_servers"]   # the shared fixtures: src, reference, servers


@pytest.fixture
def remote_env(rclone_server, monkeypatch):
    return rclone_server.use(monkeypatch)


send = send_items


def tree_sink(target, **kw):
    from rescue.extract.rclone_sink import RcloneSink
    return RcloneSink(target, **kw)


def expected_tree(src: Path) -> dict:
    """What an rclone tree keeps: contents and mtimes (seconds over sftp),
    symlinks as NAME.rclonelink, hard links as copies, empty dirs."""
    out = {}
    for p in src.rglob("*"):
        rel = str(p.relative_to(src))
        if p.is_symlink():
            out[rel + ".rclonelink"] = (hashlib.sha256(os.readlink(p).encode()).hexdigest(), None)
        elif p.is_dir():
            out[rel] = ("dir", None)
        elif p.is_file():
            out[rel] = (hashlib.sha256(p.read_bytes()).hexdigest(), os.stat(p).st_mtime_ns // 10**9)
    return out


def got_tree(root: Path) -> dict:
    out = {}
    for p in root.rglob("*"):
        rel = str(p.relative_to(root))
        if p.is_dir():
            out[rel] = ("dir", None)
        else:
            mt = None if rel.endswith(".rclonelink") else os.stat(p).st_mtime_ns // 10**9
            out[rel] = (hashlib.sha256(p.read_bytes()).hexdigest(), mt)
    return out


def test_sends_tree_with_contents_mtimes_symlinks_and_empty_dirs(src, remote_env):
    sink = tree_sink(f"rclone:{remote_env.name}:rescued/vols/")
    result = send(sink, items_from_tree(src))
    assert got_tree(remote_env.root / "rescued" / "vols") == expected_tree(src)
    # what rclone cannot store is named as skipped (the engine then exits 1)
    assert sorted(name for name, _ in result.not_written) == (["fifo", "null-dev"] if IS_ROOT else ["fifo"])
    assert all("rclone stores files only" in why for _, why in result.not_written)
    assert result.files == sum(1 for p in src.rglob("*") if p.is_file() and not p.is_symlink())


def test_small_scratch_limit_batches_and_hard_links_become_copies(src, remote_env):
    sink = tree_sink(f"rclone:{remote_env.name}:batched", scratch_limit=50_000)
    result = send(sink, items_from_tree(src))
    got = remote_env.root / "batched"
    assert got_tree(got) == expected_tree(src)
    assert sink.batches >= 3 and sink.peak_scratch <= 300_000
    assert any("big.bin" in w and "scratch limit" in w for w in result.warnings)
    assert any("hard links stored as separate copies" in w for w in result.warnings)


def test_rerun_sends_only_what_is_missing_or_changed(src, remote_env):
    target = f"rclone:{remote_env.name}:rerun/"
    send(tree_sink(target), items_from_tree(src))
    got = remote_env.root / "rerun"
    kept = os.stat(got / "db" / "_data" / "big.bin").st_ino
    (got / "web" / "html" / "index.html").unlink()
    sink = tree_sink(target)
    send(sink, items_from_tree(src))
    assert sink.sent_files == 1
    assert os.stat(got / "db" / "_data" / "big.bin").st_ino == kept
    assert got_tree(got) == expected_tree(src)


def test_damaged_file_is_left_out(src, remote_env):
    raised = add_collecting_damaged(tree_sink(f"rclone:{remote_env.name}:damaged/"),
                                    items_from_tree(src, fail={"db/_data/big.bin"}))
    assert raised == ["db/_data/big.bin", "web/big-link.bin"]     # its hard link has nothing to copy
    assert not (remote_env.root / "damaged" / "db" / "_data" / "big.bin").exists()
    assert not (remote_env.root / "damaged" / "web" / "big-link.bin").exists()
    assert (remote_env.root / "damaged" / "db" / "_data" / "pg.conf").exists()


def test_wrong_password_is_one_clear_error_without_secrets(src, remote_env, monkeypatch):
    server = remote_env
    bad = subprocess.run(["rclone", "obscure", "not-the-Pa55word"], capture_output=True, text=True).stdout.strip()
    monkeypatch.setenv(f"RCLONE_CONFIG_{server.name.upper()}_PASS", bad)
    with pytest.raises(TargetError) as exc:
        send(tree_sink(f"rclone:{server.name}:nope/"), items_from_tree(src)[:4])
    msg = exc.value.one_line()
    assert "refused the login" in msg and "\n" not in msg
    assert bad not in msg and "not-the-Pa55word" not in msg and server.password not in msg


def test_unreachable_remote_and_unknown_remote(src, remote_env, monkeypatch, tmp_path):
    server = remote_env
    monkeypatch.setenv(f"RCLONE_CONFIG_{server.name.upper()}_PORT", str(free_port()))
    with pytest.raises(TargetError, match="cannot reach"):
        send(tree_sink(f"rclone:{server.name}:x/"), items_from_tree(src)[:4])
    with pytest.raises(TargetError, match="no remote named 'nosuch'"):
        tree_sink("rclone:nosuch:x/")


def test_missing_rclone_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(TargetError, match="rclone is not installed"):
        tree_sink("rclone:any:x/")


# -- streamed tarball --------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".tar.zst", ".tar.gz", ".tar"])
def test_streams_one_tarball_without_a_local_copy(src, remote_env, tmp_path, suffix):
    if not have("tar") or (suffix == ".tar.zst" and not have("zstd")):
        pytest.skip("needs GNU tar and zstd")
    from rescue.extract.rclone_sink import RcloneTarSink
    sink = RcloneTarSink(f"rclone:{remote_env.name}:tarballs/vols{suffix}")
    result = send(sink, items_from_tree(src))
    tarball = remote_env.root / "tarballs" / f"vols{suffix}"
    assert tarball.exists() and result.files >= 5
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["tar", "-x", "-f", str(tarball), "-C", str(out), "--xattrs", "--xattrs-include=*",
                    "--numeric-owner", "-p"], check=True, capture_output=True)
    assert snapshot(out, owners=IS_ROOT) == snapshot(src, owners=IS_ROOT)


def test_existing_tarball_is_refused_and_failed_upload_leaves_nothing(src, remote_env):
    from rescue.extract.rclone_sink import RcloneTarSink
    target = f"rclone:{remote_env.name}:tarballs/once.tar.zst"
    send(RcloneTarSink(target), items_from_tree(src)[:5])
    with pytest.raises(TargetError, match="exists already"):
        RcloneTarSink(target)
    partial = f"rclone:{remote_env.name}:tarballs/aborted.tar"
    sink = RcloneTarSink(partial)
    for item in items_from_tree(src)[:8]:
        sink.add(item)
    sink.abort()
    assert not (remote_env.root / "tarballs" / "aborted.tar").exists()


# -- end to end: `rescue extract ... -o rclone:` -------------------------------------

from remote_servers import VOLUMES, rescue_extract, without_implied_mtimes  # noqa: E402


def test_cli_extract_to_rclone_tree_matches_directory_extract(rclone_server, reference):
    server = rclone_server
    r = rescue_extract(f"rclone:{server.name}:cli-vols/", "--scratch-limit", "1M", env=server.env)
    # the one FIFO of the volumes cannot be stored: named as skipped, exit 1
    assert r.returncode == 1, r.stderr
    skipped = [line for line in r.stderr.splitlines() if line.startswith("skipped: ")]
    assert skipped == [f"skipped: {VOLUMES}/myapp_uploads/_data/events.fifo: FIFO not sent: rclone stores "
                       "files only (a tar target keeps it)"], r.stderr
    assert got_tree(server.root / "cli-vols") == expected_tree(reference)
    assert server.password not in r.stderr


def test_cli_streams_tarball_to_rclone_remote(rclone_server, reference, tmp_path):
    server = rclone_server
    r = rescue_extract(f"rclone:{server.name}:cli/vols.tar.zst", env=server.env)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "x"
    out.mkdir()
    # the engine lists a directory's subtrees after all its children: GNU tar must delay dir times
    subprocess.run(["tar", "-x", "-f", str(server.root / "cli" / "vols.tar.zst"), "-C", str(out), "--xattrs",
                    "--xattrs-include=*", "--numeric-owner", "-p", "--delay-directory-restore"],
                   check=True, capture_output=True)
    assert without_implied_mtimes(snapshot(out)) == without_implied_mtimes(snapshot(reference))


def test_cli_rclone_login_refused_is_exit_2_one_line_without_secrets(rclone_server):
    server = rclone_server
    bad = subprocess.run(["rclone", "obscure", "Wr0ng-secret-value"], capture_output=True, text=True).stdout.strip()
    env = {**server.env, f"RCLONE_CONFIG_{server.name.upper()}_PASS": bad}
    r = rescue_extract(f"rclone:{server.name}:nope/", env=env)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "refused the login" in lines[0], r.stderr
    assert bad not in r.stderr and "Wr0ng-secret-value" not in r.stderr


def test_full_remote_is_one_clear_error(src, tmp_path, monkeypatch):
    with tmpfs(tmp_path / "s" / "served", "128k"), RcloneSftp(tmp_path / "s", name="tinyremote") as s:
        s.use(monkeypatch)
        monkeypatch.setenv("RCLONE_RETRIES", "1")          # a full disk will not empty itself
        monkeypatch.setenv("RCLONE_LOW_LEVEL_RETRIES", "1")
        with pytest.raises(TargetError) as exc:
            send(tree_sink("rclone:tinyremote:x/"), items_from_tree(src))
        msg = exc.value.one_line()
        # rclone's sftp server usually answers ENOSPC ("no space left": we say "is full"); now
        # and then it drops the write channel first and rclone reports only SSH_FX_FAILURE.
        assert "is full" in msg or "SSH_FX_FAILURE" in msg, msg
        assert "nothing arrived" in msg and "\n" not in msg, msg


def test_interrupted_tree_upload_completes_on_rerun(src, tmp_path, monkeypatch):
    with RcloneSftp(tmp_path / "s", name="flaky") as s:
        s.use(monkeypatch)
        monkeypatch.setenv("RCLONE_RETRIES", "1")
        monkeypatch.setenv("RCLONE_LOW_LEVEL_RETRIES", "1")
        items = [i for i in items_from_tree(src) if i.entry.kind not in ("fifo", "char", "block")]   # not held
        sink = tree_sink("rclone:flaky:vols/", scratch_limit=1000)
        with pytest.raises(TargetError) as exc:
            for item in items:
                sink.add(item)
                if sink.batches == 2 and s.proc is not None:
                    s.stop()                          # the server goes away between batches
            sink.close()
        sink.abort()
        assert "cannot reach" in str(exc.value) and "arrived before that" in str(exc.value)
        arrived = sink.result.files
        got = s.root / "vols"
        first = {p: os.stat(p).st_ino for p in got.rglob("*") if p.is_file()}
        assert arrived == sum(1 for p in first if not p.name.endswith(".rclonelink")) > 0
        s.start()
        sink2 = tree_sink("rclone:flaky:vols/", scratch_limit=1000)
        result = send(sink2, items)
        assert got_tree(got) == expected_tree(src)
        assert all(os.stat(p).st_ino == ino for p, ino in first.items())   # not sent again
        after = sum(1 for p in got.rglob("*") if p.is_file())
        copies = 2                                    # the two hard links: server-side copies, not uploads
        assert after - len(first) - copies <= sink2.sent_files <= after - len(first)
