"""rsync targets against a real rsync daemon and a real sshd on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess

import pytest

from rescue.errors import TargetError
from rescue.extract.remote_target import (RCLONE_TAR, RCLONE_TREE, RSYNC_DAEMON, RSYNC_SSH,
                                          parse_remote_target)
from rescue.fs.base import FileReadError
from remote_servers import (IS_ROOT, RsyncDaemon, add_collecting_damaged, free_port, have, items_from_tree,
                            send_items, snapshot, tmpfs)

pytestmark = pytest.mark.skipif(not have("rsync"), reason="rsync is not installed")
pytest_plugins = ["remote_servers"]   # the shared fixtures: src, reference, servers


def RsyncSink(*a, **kw):
    from rescue.extract.rsync_sink import RsyncSink as S
    return S(*a, **kw)


def send(target: str, items, **kw):
    kw.setdefault("devices", True)
    sink = RsyncSink(target, **kw)
    return sink, send_items(sink, items)


# -- target parsing ----------------------------------------------------------

@pytest.mark.parametrize("text,kind,dest", [
    ("rsync://127.0.0.1:8873/mod/vols/", RSYNC_DAEMON, "rsync://127.0.0.1:8873/mod/vols/"),
    ("rsync://backup.example.org/mod", RSYNC_DAEMON, "rsync://backup.example.org/mod/"),
    ("rsync://[::1]:873/mod/a/b", RSYNC_DAEMON, "rsync://[::1]:873/mod/a/b/"),
    ("root@10.0.0.5:/srv/rescued/", RSYNC_SSH, "root@10.0.0.5:/srv/rescued/"),
    ("vagrant@[::1]:/srv/x", RSYNC_SSH, "vagrant@[::1]:/srv/x/"),
    ("newbox:rescued", RSYNC_SSH, "newbox:rescued/"),
    ("rclone:r2:bucket/vols/", RCLONE_TREE, "r2:bucket/vols/"),
    ("rclone:s3:bucket/vols.tar.zst", RCLONE_TAR, "s3:bucket/vols.tar.zst"),
])
def test_recognises_remote_targets(text, kind, dest):
    t = parse_remote_target(text)
    assert t is not None and t.kind == kind and t.dest == dest


@pytest.mark.parametrize("text", ["C:\\out", "C:/out", "d:backup", "out/", "./a:b", "/tmp/x:y",
                                  "volumes.tar.zst", "s3://bucket/x", "https://host/x"])
def test_local_paths_and_windows_drives_are_not_remote(text):
    assert parse_remote_target(text) is None


@pytest.mark.parametrize("text", ["rsync://host", "rsync://host:99999/mod/", "rclone:nocolon"])
def test_malformed_remote_targets_fail_clearly(text):
    with pytest.raises(TargetError):
        parse_remote_target(text)


# -- rsync daemon --------------------------------------------------------------

@pytest.mark.parametrize("fake_super", [True, False])
def test_sends_tree_with_owners_modes_links_and_xattrs_to_rsync_daemon(src, daemon, fake_super):
    sub = f"vols-{fake_super}"
    sink, result = send(daemon.url("open", sub + "/"), items_from_tree(src), fake_super=fake_super)
    got = daemon.open_dir / sub
    assert snapshot(got, owners=IS_ROOT) == snapshot(src, owners=IS_ROOT)
    assert os.stat(got / "sparse.img").st_blocks * 512 < 1 << 20      # sparse stays sparse
    assert result.files == sum(1 for p in src.rglob("*") if p.is_file() and not p.is_symlink())
    assert result.bytes >= 5 << 20
    assert sink.batches == 1


def test_device_nodes_only_with_devices_and_setuid_can_be_dropped(src, daemon):
    sink, result = send(daemon.url("open", "nodev/"), items_from_tree(src), devices=False, keep_setuid=False)
    got = daemon.open_dir / "nodev"
    assert not (got / "null-dev").exists() and (got / "fifo").exists()
    assert os.stat(got / "web" / "bin").st_mode & 0o7777 == 0o755
    # each device node is named as skipped (the engine then exits 1), not a count among warnings
    assert [name for name, _ in result.not_written] == (["null-dev"] if IS_ROOT else [])
    assert all("--devices" in why for _, why in result.not_written)
    assert not any("device" in w for w in result.warnings)


def test_small_scratch_limit_sends_several_batches_and_keeps_hard_links(src, daemon):
    limit = 100_000
    sink, result = send(daemon.url("open", "batched/"), items_from_tree(src), scratch_limit=limit)
    got = daemon.open_dir / "batched"
    assert snapshot(got, owners=IS_ROOT) == snapshot(src, owners=IS_ROOT)
    assert sink.batches >= 3
    # only the one file larger than the limit exceeded it, with a warning
    assert sink.peak_scratch <= 300_000
    assert any("big.bin" in w and "scratch limit" in w for w in result.warnings)
    # big-link.bin arrived in a later batch than big.bin and is still the same inode
    assert os.stat(got / "web" / "big-link.bin").st_ino == os.stat(got / "db" / "_data" / "big.bin").st_ino


def test_rerun_sends_only_what_is_missing_or_changed(src, daemon):
    url = daemon.url("open", "rerun/")
    send(url, items_from_tree(src))
    got = daemon.open_dir / "rerun"
    kept = os.stat(got / "db" / "_data" / "big.bin").st_ino
    (got / "web" / "html" / "index.html").unlink()
    sink, result = send(url, items_from_tree(src))
    assert sink.sent_files == 1
    assert sink.unchanged_files >= 5
    assert os.stat(got / "db" / "_data" / "big.bin").st_ino == kept      # not sent again
    assert snapshot(got, owners=IS_ROOT) == snapshot(src, owners=IS_ROOT)


def test_interrupted_run_completes_on_rerun(src, tmp_path):
    with RsyncDaemon(tmp_path / "d") as d:
        url = d.url("open", "vols/")
        sink = RsyncSink(url, scratch_limit=1000, devices=True)
        items = items_from_tree(src)
        with pytest.raises(TargetError) as exc:
            for item in items:
                sink.add(item)
                if sink.batches == 2 and d.proc is not None:
                    d.stop()                         # the server goes away between batches
            sink.close()
        sink.abort()
        msg = str(exc.value)
        assert "cannot reach" in msg and "arrived before that" in msg, msg
        arrived = sink.result.files
        assert 0 < arrived < 10
        first = {p: os.stat(p).st_ino for p in (d.open_dir / "vols").rglob("*") if p.is_file()}
        d.start()
        sink2, result = send(url, items)
        got = d.open_dir / "vols"
        assert snapshot(got, owners=IS_ROOT) == snapshot(src, owners=IS_ROOT)
        assert sink2.unchanged_files >= len(first) - 1
        assert sink2.sent_files <= result.files - arrived + 1
        kept = sum(1 for p, ino in first.items() if os.stat(p).st_ino == ino)
        assert kept >= len(first) - 1           # what arrived was not sent again


def test_damaged_file_is_left_out_and_the_rest_arrives(src, daemon):
    url = daemon.url("open", "damaged/")
    raised = add_collecting_damaged(RsyncSink(url), items_from_tree(src, fail={"db/_data/big.bin"}))
    got = daemon.open_dir / "damaged"
    # its hard link has nothing to point at: reported too, not counted
    assert raised == ["db/_data/big.bin", "web/big-link.bin"]
    assert not (got / "db" / "_data" / "big.bin").exists() and not (got / "web" / "big-link.bin").exists()
    assert (got / "db" / "_data" / "pg.conf").read_bytes() == (src / "db" / "_data" / "pg.conf").read_bytes()


def test_unsafe_names_never_leave_the_target(src, daemon, tmp_path):
    from rescue.extract.base import Item
    from rescue.fs.base import FILE, Entry
    from rescue.extract.base import Content
    evil = [Item(name=n, entry=Entry(path="/x", kind=FILE, mode=0o644, size=4, mtime_ns=10**18),
                 content=Content(size=4, chunks=lambda: iter([b"evil"])))
            for n in ("../../escaped", "a/../../escaped2")]
    sink = RsyncSink(daemon.url("open", "evil/"))
    for item in evil:
        with pytest.raises(FileReadError, match="unsafe name"):
            sink.add(item)
    # a symlink to /etc, then a file "through" it: refused, nothing written outside
    outside = tmp_path / "outside"
    outside.mkdir()
    link = Item(name="lnk", entry=Entry(path="/lnk", kind="symlink", mode=0o777, link_target=str(outside)))
    sink.add(link)
    with pytest.raises(FileReadError, match="not a directory"):
        sink.add(Item(name="lnk/owned", entry=Entry(path="/lnk/owned", kind=FILE, mode=0o644, size=4),
                      content=Content(size=4, chunks=lambda: iter([b"evil"]))))
    result = sink.close()
    assert result.files == 0 and not list(outside.iterdir())
    assert (daemon.open_dir / "evil" / "lnk").is_symlink()
    assert not list(daemon.base.rglob("escaped*")) and not list(tmp_path.parent.rglob("escaped*"))


def test_auth_module_with_password_from_environment(src, daemon, monkeypatch):
    monkeypatch.setenv("RSYNC_PASSWORD", daemon.password)
    url = f"rsync://alice@127.0.0.1:{daemon.port}/auth/vols/"
    send(url, items_from_tree(src))
    assert snapshot(daemon.auth_dir / "vols", owners=IS_ROOT) == snapshot(src, owners=IS_ROOT)


def test_wrong_password_is_one_clear_error_without_the_password(src, daemon, monkeypatch):
    monkeypatch.setenv("RSYNC_PASSWORD", "wrong-Pa55word-123")
    url = f"rsync://alice@127.0.0.1:{daemon.port}/auth/nope/"
    with pytest.raises(TargetError) as exc:
        send(url, items_from_tree(src)[:3])
    msg = exc.value.one_line()
    assert "auth failed" in msg and "\n" not in msg
    assert "wrong-Pa55word" not in msg and daemon.password not in msg


@pytest.mark.parametrize("make_url,expect", [
    (lambda d: f"rsync://127.0.0.1:{free_port()}/open/x/", "cannot reach"),
    (lambda d: d.url("nosuchmodule", "x/"), "has no module"),
])
def test_unreachable_daemon_and_unknown_module(src, daemon, make_url, expect):
    with pytest.raises(TargetError) as exc:
        send(make_url(daemon), items_from_tree(src)[:3])
    assert expect in exc.value.one_line() and "\n" not in exc.value.one_line()


def test_missing_rsync_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(TargetError, match="rsync is not installed"):
        RsyncSink("rsync://127.0.0.1/mod/x/")


@pytest.fixture
def tiny_tmpfs(tmp_path):
    with tmpfs(tmp_path / "tiny", "256k") as mnt:
        yield mnt


def test_full_remote_is_one_clear_error_and_counts_nothing_that_did_not_arrive(src, tmp_path, tiny_tmpfs):
    with RsyncDaemon(tmp_path / "d", tiny=tiny_tmpfs) as d:
        sink = RsyncSink(d.url("tiny", "vols/"), scratch_limit=50_000)
        with pytest.raises(TargetError) as exc:
            for item in items_from_tree(src):
                sink.add(item)
            sink.close()
        sink.abort()
        assert "remote is full" in exc.value.one_line()
        # every file counted as arrived is really there, complete
        arrived = [p for p in tiny_tmpfs.rglob("*") if p.is_file() and not p.is_symlink()
                   and ".rescue-partial" not in p.parts]
        assert sink.result.files <= len(arrived)


# -- rsync over ssh --------------------------------------------------------------

def test_sends_tree_over_ssh_with_user_at_host(src, sshd, tmp_path):
    dest = tmp_path / "over ssh"
    sink, result = send(f"root@127.0.0.1:{dest}/", items_from_tree(src), rsync_opts=[sshd.ssh])
    assert snapshot(dest) == snapshot(src)


def test_ssh_login_refused_is_one_clear_error(src, sshd, tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
    bad = sshd.ssh.replace(str(sshd.base / "client"), str(tmp_path / "other"))
    with pytest.raises(TargetError) as exc:
        send(f"root@127.0.0.1:{tmp_path}/x/", items_from_tree(src)[:3], rsync_opts=[bad])
    assert "refused the login" in exc.value.one_line()


# -- end to end: `rescue extract ... -o rsync://` -----------------------------------

from remote_servers import RESCUE, SAMPLE, VOLUMES, cli_available, rescue_extract, without_implied_mtimes  # noqa: E402

needs_cli = pytest.mark.skipif(not cli_available(), reason="needs fixtures/sample-vps.disk and .venv/bin/rescue")


@needs_cli
def test_cli_extract_to_rsync_daemon_matches_directory_extract(daemon, reference):
    r = rescue_extract(daemon.url("open", "cli-vols/"), "--scratch-limit", "1M")
    assert r.returncode == 0, r.stderr
    assert "rescued 17 files" in r.stderr or "rescued" in r.stderr
    got = daemon.open_dir / "cli-vols"
    assert without_implied_mtimes(snapshot(got)) == without_implied_mtimes(snapshot(reference))


@needs_cli
def test_cli_interrupted_transfer_completes_on_rerun_sending_only_the_rest(reference, tmp_path):
    with RsyncDaemon(tmp_path / "d") as d:
        # the real daemon refuses the 3rd connection (= 3rd batch), once
        script = tmp_path / "prexfer.sh"
        count = tmp_path / "count"
        script.write_text(f"#!/bin/sh\nn=$(cat {count} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {count}\n"
                          "[ $n -ne 3 ]\n")
        script.chmod(0o755)
        conf = d.conf.read_text().replace("[open]\n", "[open]\n" f"pre-xfer exec = {script}\n"
                                          "transfer logging = yes\nlog format = RECV %n\n")
        d.conf.write_text(conf)
        d.stop()
        d.start()
        url = d.url("open", "vols/")
        r1 = rescue_extract(url, "--scratch-limit", "64K")
        assert r1.returncode == 2, r1.stderr
        last = r1.stderr.strip().splitlines()[-1]
        assert "arrived before that" in last and "re-run" in last
        log = d.base / "rsyncd.log"

        def received(start: int) -> set[str]:
            text = log.read_bytes()[start:].decode("utf-8", "surrogateescape")
            return {ln.split("RECV ", 1)[1] for ln in text.splitlines() if "RECV " in ln}

        first_run = received(0)
        mark = log.stat().st_size
        r2 = rescue_extract(url, "--scratch-limit", "64K")
        assert r2.returncode == 0, r2.stderr
        second_run = received(mark)
        files = lambda names: {n for n in names if not n.endswith("/")}
        assert files(first_run) and files(second_run)
        assert not files(first_run) & files(second_run)      # nothing that arrived was sent again
        assert without_implied_mtimes(snapshot(d.open_dir / "vols")) == without_implied_mtimes(snapshot(reference))


@needs_cli
@pytest.mark.parametrize("case", ["wrong-password", "unreachable", "no-rsync"])
def test_cli_target_errors_are_exit_2_and_one_line_without_secrets(daemon, tmp_path, case):
    env = {"RSYNC_PASSWORD": "Wr0ng-secret-value"}
    url = f"rsync://alice@127.0.0.1:{daemon.port}/auth/x/"
    if case == "unreachable":
        url = f"rsync://127.0.0.1:{free_port()}/open/x/"
    if case == "no-rsync":
        bindir = tmp_path / "bin"
        bindir.mkdir()
        env["PATH"] = str(bindir)
    r = rescue_extract(url, env=env)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "Wr0ng-secret-value" not in r.stderr + r.stdout and daemon.password not in r.stderr
    assert {"wrong-password": "auth failed", "unreachable": "cannot reach",
            "no-rsync": "rsync is not installed"}[case] in lines[0]


def test_ssh_host_unreachable_is_one_clear_error(src, sshd, tmp_path):
    bad = sshd.ssh.replace(f"-p {sshd.port}", f"-p {free_port()}")
    with pytest.raises(TargetError) as exc:
        send(f"root@127.0.0.1:{tmp_path}/x/", items_from_tree(src)[:3], rsync_opts=[bad])
    assert "cannot reach" in exc.value.one_line() and "\n" not in exc.value.one_line()


def test_partial_transfer_counts_only_what_arrived(src, daemon):
    if not IS_ROOT or not have("chattr"):
        pytest.skip("needs root and chattr to make a receiving directory immutable")
    locked = daemon.open_dir / "partial" / "db" / "_data"
    locked.mkdir(parents=True)
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("the filesystem under the test daemon has no immutable flag")
    try:
        sink, result = send(daemon.url("open", "partial/"), items_from_tree(src))
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)
    blocked = {"db/_data/pg.conf", "db/_data/big.bin"}
    for name in blocked:
        assert any(w.startswith(name) and "did not arrive" in w for w in result.warnings), result.warnings
    assert sorted(n for n, _ in result.not_arrived) == sorted(blocked)
    total = sum(1 for p in src.rglob("*") if p.is_file() and not p.is_symlink())
    assert result.files == total - len(blocked)
    assert (daemon.open_dir / "partial" / "web" / "html" / "index.html").exists()


@needs_cli
def test_cli_as_non_root_user_still_sends_owners_modes_and_xattrs_via_fake_super(daemon, reference, tmp_path):
    """Staging as `nobody`: owners, setuid, xattrs travel in user.rsync.%stat;
    only symlinks' owners need a root sender."""
    if not IS_ROOT or not have("setpriv"):
        pytest.skip("needs root and setpriv to run the CLI as nobody")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    os.chown(scratch, 65534, 65534)
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(RESCUE), "extract",
                        str(SAMPLE), "--path", VOLUMES, "--devices", "-o", daemon.url("open", "as-nobody/"),
                        "--scratch-limit", "1M"],
                       capture_output=True, text=True, env={**os.environ, "TMPDIR": str(scratch), "HOME": str(scratch)})
    assert r.returncode == 0, r.stderr
    assert "symlink owners not kept" in r.stderr
    got, want = (without_implied_mtimes(snapshot(p)) for p in (daemon.open_dir / "as-nobody", reference))
    for snap in (got, want):
        for rec in snap.values():
            if isinstance(rec, dict) and rec["kind"] == "symlink":
                rec.pop("owner")
    assert got == want
    assert any(rec.get("owner") not in (None, (0, 0), (65534, 65534)) for rec in got.values() if isinstance(rec, dict))


def test_password_in_url_is_used_but_never_shown(src, daemon, monkeypatch):
    monkeypatch.delenv("RSYNC_PASSWORD", raising=False)
    url = f"rsync://alice:{daemon.password}@127.0.0.1:{daemon.port}/auth/in-url/"
    sink, result = send(url, items_from_tree(src)[:6])
    assert daemon.password not in result.target and daemon.password not in repr(sink.target)
    assert (daemon.auth_dir / "in-url").is_dir()
    with pytest.raises(TargetError) as exc:
        send(f"rsync://alice:Wr0ngPassw0rd@127.0.0.1:{daemon.port}/auth/in-url/", items_from_tree(src)[:3])
    assert "auth failed" in str(exc.value) and "Wr0ngPassw0rd" not in str(exc.value)


@needs_cli
def test_cli_full_remote_is_exit_2_and_one_line(tmp_path, tiny_tmpfs):
    with RsyncDaemon(tmp_path / "d", tiny=tiny_tmpfs) as d:
        r = rescue_extract(d.url("tiny", "vols/"), "--scratch-limit", "64K")
        assert r.returncode == 2, r.stderr
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "the remote is full" in lines[0], r.stderr
