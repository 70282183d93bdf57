"""ssh:// sources against a real OpenSSH sshd on 127.0.0.1: every command through
ssh:// equals the same command on the local file or device, over SFTP and over the
dd fallback (a server without the sftp subsystem); a relay that cuts the connection
twice mid-read changes nothing in the output; each failure is one line, exit 2."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Iterator

import pytest

from common_support import SAMPLE, assert_one_line_error, dir_view, explain, loop_device, rescue, tar_view
from ssh_support import Relay, SshServer, sshd_missing
from rescue.source import open_source
from rescue.source.ssh import SshSource, SshTarget

pytestmark = pytest.mark.skipif(sshd_missing() is not None, reason=sshd_missing() or "")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("remote-images")
    shutil.copyfile(SAMPLE, d / "sample-vps.disk")
    with tarfile.open(d / "snapshot.tar.gz", "w:gz") as tf:
        tf.add(d / "sample-vps.disk", arcname="sample-vps.disk")
    if shutil.which("qemu-img"):
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(SAMPLE), str(d / "sample.qcow2")], check=True)
    with open(d / "random.bin", "wb") as f:
        f.write(os.urandom(40 << 20))
    return d


@pytest.fixture(scope="module")
def sftp_server(tmp_path_factory) -> Iterator[SshServer]:
    server = SshServer(tmp_path_factory.mktemp("sshd-sftp"), sftp="server")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory) -> Iterator[SshServer]:
    server = SshServer(tmp_path_factory.mktemp("sshd-nosftp"), sftp=None)
    yield server
    server.stop()


@pytest.fixture(params=["sftp", "dd"])
def server(request, sftp_server, plain_server, monkeypatch) -> SshServer:
    s = sftp_server if request.param == "sftp" else plain_server
    for k, v in s.env.items():
        monkeypatch.setenv(k, v)
    return s


_LOCAL: dict[tuple, tuple] = {}


def _local(*args: str):
    """The local side of a comparison, run once per module (it does not change)."""
    if args not in _LOCAL:
        res = rescue(*args)
        _LOCAL[args] = (res.returncode, res.stdout, res.stderr)
    return _LOCAL[args]


def _same_commands(remote: str, local: str, tmp_path: Path) -> None:
    r = rescue("inspect", remote, "--json")
    l_rc, l_out, _ = _local("inspect", local, "--json")
    assert r.returncode == 0, explain(r)
    rj, lj = json.loads(r.stdout), json.loads(l_out)
    for d in (rj, lj):
        d.pop("snapshot")
        d.pop("warnings", None)
        if "archive" in d:
            d["archive"].pop("member", None)
    assert rj == lj
    for args in (("ls", "-l", "/etc"), ("cat", "/etc/passwd")):
        r, l_out = rescue(args[0], remote, *args[1:]), _local(args[0], local, *args[1:])[1]
        assert r.returncode == 0, explain(r)
        assert r.stdout == l_out and r.stdout
    out = tmp_path / "remote.tar"
    res = rescue("extract", remote, "--path", "/var/lib/docker/volumes", "--path", "/etc", "-o", str(out))
    assert res.returncode == 0, explain(res)
    local_tar = tmp_path.parent / f"local-{abs(hash(local))}.tar"
    if not local_tar.exists():
        l = rescue("extract", local, "--path", "/var/lib/docker/volumes", "--path", "/etc", "-o", str(local_tar))
        assert l.returncode == 0, explain(l)
    got, want = tar_view(out), tar_view(local_tar)
    assert got.recs == want.recs and len(want.recs) > 20


def test_extract_to_a_directory_over_ssh(sftp_server, images, tmp_path, monkeypatch):
    monkeypatch.setenv("RESCUE_SSH", sftp_server.env["RESCUE_SSH"])
    views = []
    for spec, name in ((f"ssh://rtest{images / 'sample-vps.disk'}", "remote"), (str(images / "sample-vps.disk"), "local")):
        res = rescue("extract", spec, "--path", "/home", "--path", "/var/www", "-o", str(tmp_path / name) + "/")
        assert res.returncode == 0, explain(res)
        recs = dir_view(tmp_path / name).recs
        views.append({k: v for k, v in recs.items() if k.startswith(("home", "var/www/"))})  # not var: made now
    assert views[0] == views[1] and "home/alice" in views[0]


def test_image_file_over_ssh_equals_local(server, images, tmp_path):
    _same_commands(f"ssh://rtest{images / 'sample-vps.disk'}", str(images / "sample-vps.disk"), tmp_path)


def test_tar_gz_snapshot_on_the_server_is_read_in_place(sftp_server, images, tmp_path, monkeypatch):
    monkeypatch.setenv("RESCUE_SSH", sftp_server.env["RESCUE_SSH"])
    _same_commands(f"ssh://rtest{images / 'snapshot.tar.gz'}", str(images / "snapshot.tar.gz"), tmp_path)


def test_qcow2_on_the_server(sftp_server, images, tmp_path, monkeypatch):
    if not (images / "sample.qcow2").exists():
        pytest.skip("needs qemu-img to make the qcow2")
    monkeypatch.setenv("RESCUE_SSH", sftp_server.env["RESCUE_SSH"])
    _same_commands(f"ssh://rtest{images / 'sample.qcow2'}", str(images / "sample.qcow2"), tmp_path)


def test_block_device_over_ssh_equals_local(server, images, tmp_path):
    with loop_device(images / "sample-vps.disk", "-r") as dev:
        src = open_source(f"ssh://root@rtest{dev}")
        try:
            assert isinstance(src, SshSource) and src.is_device and src.size == SAMPLE.stat().st_size
        finally:
            src.close()
        _same_commands(f"ssh://rtest{dev}", dev, tmp_path)


def test_reads_survive_two_dropped_connections(server, images, monkeypatch):
    relay = Relay(server.port, cuts=(9 << 20, 23 << 20))
    try:
        server.add_host("rtest-cut", relay.port)
        src = SshSource(f"ssh://rtest-cut{images / 'random.bin'}")
        try:
            h = hashlib.sha256()
            pos = 0
            while pos < src.size:
                chunk = src.read(pos, 3 << 20)
                h.update(chunk)
                pos += len(chunk)
            assert h.hexdigest() == hashlib.sha256((images / "random.bin").read_bytes()).hexdigest()
            assert relay.cut_count == 2 and src.reconnects >= 2 and relay.connections >= 3
        finally:
            src.close()
    finally:
        relay.stop()


def test_extract_through_a_cutting_relay_is_byte_identical(sftp_server, tmp_path, monkeypatch):
    if not shutil.which("mkfs.ext4"):
        pytest.skip("needs mkfs.ext4")
    tree = tmp_path / "tree"
    (tree / "data").mkdir(parents=True)
    (tree / "data" / "big.bin").write_bytes(os.urandom(30 << 20))
    (tree / "data" / "small.txt").write_text("hello\n")
    image = tmp_path / "fs.img"
    subprocess.run(["mkfs.ext4", "-q", "-d", str(tree), str(image), "48M"], check=True)
    monkeypatch.setenv("RESCUE_SSH", sftp_server.env["RESCUE_SSH"])
    relay = Relay(sftp_server.port, cuts=(8 << 20, 20 << 20))
    try:
        sftp_server.add_host("rtest-cut2", relay.port)
        remote, local = tmp_path / "remote.tar", tmp_path / "local.tar"
        res = rescue("extract", f"ssh://rtest-cut2{image}", "--path", "/data", "-o", str(remote), timeout=180)
        assert res.returncode == 0, explain(res)
        assert relay.cut_count == 2
        assert rescue("extract", str(image), "--path", "/data", "-o", str(local)).returncode == 0
        assert tar_view(remote).recs == tar_view(local).recs
    finally:
        relay.stop()


# -- failures: one line, exit 2 ------------------------------------------------------

def _env(monkeypatch, server: SshServer, extra: str = "") -> None:
    monkeypatch.setenv("RESCUE_SSH", f"ssh -F {server.client_config} {extra}".strip())


def test_unknown_host_key_shows_the_fingerprint(sftp_server, images, monkeypatch, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    sftp_server.add_host("rtest-unknown", sftp_server.port, known_hosts=empty)
    _env(monkeypatch, sftp_server)
    res = rescue("inspect", f"ssh://rtest-unknown{images / 'sample-vps.disk'}")
    assert_one_line_error(res)
    fp = subprocess.run(["ssh-keygen", "-lf", str(sftp_server.base / "host.pub")], capture_output=True,
                        text=True).stdout.split()[1]
    assert b"host key" in res.stderr and b"not known" in res.stderr and fp.encode() in res.stderr, res.stderr


def test_changed_host_key_is_refused(sftp_server, images, monkeypatch, tmp_path):
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    wrong = tmp_path / "known_hosts"
    wrong.write_text("rescue-test-host " + " ".join((tmp_path / "other.pub").read_text().split()[:2]) + "\n")
    sftp_server.add_host("rtest-changed", sftp_server.port, known_hosts=wrong)
    _env(monkeypatch, sftp_server)
    res = rescue("inspect", f"ssh://rtest-changed{images / 'sample-vps.disk'}")
    assert_one_line_error(res)
    assert b"CHANGED" in res.stderr, res.stderr


def test_wrong_password_is_one_line(tmp_path, images, monkeypatch):
    server = SshServer(tmp_path / "sshd-pw", sftp="server", passwords=True)
    try:
        askpass = tmp_path / "askpass"
        askpass.write_text("#!/bin/sh\necho not-the-password\n")
        askpass.chmod(0o755)
        monkeypatch.setenv("SSH_ASKPASS", str(askpass))
        monkeypatch.setenv("SSH_ASKPASS_REQUIRE", "force")
        monkeypatch.setenv("DISPLAY", ":0")
        _env(monkeypatch, server, "-o PubkeyAuthentication=no -o PreferredAuthentications=password "
                                  "-o NumberOfPasswordPrompts=1")
        res = rescue("inspect", f"ssh://rtest{images / 'sample-vps.disk'}")
        assert_one_line_error(res)
        assert b"refused the login" in res.stderr, res.stderr
    finally:
        server.stop()


def test_wrong_key_is_one_line(sftp_server, images, monkeypatch, tmp_path):
    other = tmp_path / "otherkey"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    _env(monkeypatch, sftp_server, f"-o IdentityFile={other}")
    # -F's IdentityFile comes first, so the config's key is also offered: use a config without it
    cfg = tmp_path / "cfg"
    cfg.write_text(sftp_server.client_config.read_text().replace(str(sftp_server.base / "client"), str(other)))
    monkeypatch.setenv("RESCUE_SSH", f"ssh -F {cfg}")
    res = rescue("inspect", f"ssh://rtest{images / 'sample-vps.disk'}")
    assert_one_line_error(res)
    assert b"refused the login" in res.stderr, res.stderr


def test_missing_device_is_one_line(server):
    res = rescue("inspect", "ssh://rtest/dev/no-such-disk")
    assert_one_line_error(res)
    assert b"no such device or file on rtest" in res.stderr, res.stderr


def test_permission_denied_device_is_one_line(tmp_path, images, monkeypatch):
    # nobody's shell is nologin: internal-sftp still serves it, and it may not read the device
    server = SshServer(tmp_path / "sshd-int", sftp="internal")
    try:
        _env(monkeypatch, server)
        with loop_device(images / "sample-vps.disk", "-r") as dev:
            os.chmod(dev, 0o660)
            res = rescue("inspect", f"ssh://nobody@rtest{dev}")
            assert_one_line_error(res)
            assert b"permission denied on rtest" in res.stderr and b"root" in res.stderr, res.stderr
    finally:
        server.stop()


def test_no_sftp_and_no_shell_is_one_line(plain_server, images, monkeypatch):
    _env(monkeypatch, plain_server)
    res = rescue("inspect", f"ssh://nobody@rtest{images / 'sample-vps.disk'}")
    assert_one_line_error(res)
    assert b"remote shell" in res.stderr, res.stderr


def test_unreachable_host_is_one_line(monkeypatch, sftp_server):
    _env(monkeypatch, sftp_server)
    res = rescue("inspect", "ssh://127.0.0.1:1/dev/vda")
    assert_one_line_error(res)
    assert b"cannot connect" in res.stderr, res.stderr


def test_address_forms():
    t = SshTarget.parse("ssh://root@203.0.113.5:2222/dev/vda")
    assert (t.user, t.host, t.port, t.path) == ("root", "203.0.113.5", 2222, "/dev/vda")
    t = SshTarget.parse("ssh://[2001:db8::1]:22/var/snap%20shot.qcow2")
    assert (t.host, t.port, t.path) == ("2001:db8::1", 22, "/var/snap shot.qcow2")
    assert SshTarget.parse("ssh://myalias/~/disk.img").path == "disk.img"
    for bad in ("ssh://-oProxyCommand=x/dev/vda", "ssh://host", "ssh://host:xx/dev/vda"):
        with pytest.raises(Exception):
            SshTarget.parse(bad)


def test_a_remote_device_mounted_read_write_is_warned_about(sftp_server, tmp_path, monkeypatch):
    monkeypatch.setenv("RESCUE_SSH", sftp_server.env["RESCUE_SSH"])
    copy = tmp_path / "disk.img"
    shutil.copyfile(SAMPLE, copy)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run(["losetup", "-f", "--show", "-o", str(6291456), "--sizelimit", str(26 << 20), str(copy)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"losetup failed: {res.stderr.strip()}")
    dev = res.stdout.strip()
    try:
        if subprocess.run(["mount", "-t", "ext4", dev, str(mnt)], capture_output=True).returncode != 0:
            pytest.skip("cannot mount the loop device")
        try:
            res = rescue("inspect", f"ssh://rtest{dev}", "--json", check_readonly=False)
            assert res.returncode == 0, explain(res)
            assert any("mounted read-write" in w and dev in w for w in json.loads(res.stdout)["warnings"])
        finally:
            subprocess.run(["umount", str(mnt)], check=False)
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
