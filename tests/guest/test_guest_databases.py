"""Databases made by the real servers (Debian's postgresql and mariadb-server):
one of each shut down cleanly, one killed with kill -9 while running. `inspect`
tells them apart, `extract` keeps a cluster whole (pg_wal and a tablespace that
live elsewhere behind symlinks, an SQLite -wal), and the extracted crashed
directories start again under the same server version with the row written
before the "snapshot" read back."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from common_support import IS_ROOT, explain, rescue

PG_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
PG = Path(PG_BIN[-1]) if PG_BIN else None
MARIADB = shutil.which("mariadbd") and shutil.which("mariadb-install-db")
ROW = "row before snapshot"

needs_root = pytest.mark.skipif(not IS_ROOT, reason="the servers run as their own users: needs root")


def _as_postgres(*argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", "postgres", "--", *argv], check=True, capture_output=True, **kw)


def _pg_start(data: Path, sock: Path) -> None:
    # -l: the server's output goes to a file, not to our pipe (else run() waits for the server to exit)
    _as_postgres(str(PG / "pg_ctl"), "-D", str(data), "-l", str(sock / "server.log"),
                 "-o", f"-k {sock} -c listen_addresses=", "-w", "start")


def _pg_cluster(data: Path, sock: Path, *, waldir: Path | None = None, tablespace: Path | None = None,
                crash: bool) -> None:
    for d in (data.parent, sock) + ((waldir.parent,) if waldir else ()) + ((tablespace,) if tablespace else ()):
        d.mkdir(parents=True, exist_ok=True)
        shutil.chown(d, "postgres", "postgres")
    _as_postgres(str(PG / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                 *(["--waldir", str(waldir)] if waldir else []))
    _pg_start(data, sock)
    sql = ["create table t(x text)", f"insert into t values ('{ROW}')"]
    if tablespace:   # CREATE TABLESPACE cannot run in a transaction: one -c each
        sql += [f"create tablespace ts location '{tablespace}'", "create table t2(x text) tablespace ts",
                f"insert into t2 values ('{ROW}')"]
    _as_postgres(str(PG / "psql"), "-h", str(sock), "-U", "postgres", *[a for q in sql for a in ("-c", q)])
    if crash:
        os.kill(int((data / "postmaster.pid").read_text().split()[0]), signal.SIGKILL)
        time.sleep(1)
    else:
        _as_postgres(str(PG / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")


def _retarget_links(root: Path, host_prefix: str) -> None:
    """Symlinks the server wrote with host paths (the build tree) point at guest paths."""
    for p in root.rglob("*"):
        if p.is_symlink() and os.readlink(p).startswith(host_prefix):
            target = os.readlink(p)[len(host_prefix):]
            p.unlink()
            p.symlink_to(target)


def _mariadb(data: Path, run: Path, *, crash: bool) -> None:
    run.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=root",
                    "--auth-root-authentication-method=normal", "--skip-test-db"], check=True, capture_output=True)
    proc = _start_mariadb(data, run)
    try:
        subprocess.run(["mariadb", "--no-defaults", "-S", str(run / "sock"), "-uroot", "-e",
                        f"create database app; create table app.t(x varchar(40)) engine=innodb; "
                        f"insert into app.t values ('{ROW}');"], check=True, capture_output=True)
    finally:
        if crash:
            proc.kill()
        else:
            subprocess.run(["mariadb-admin", "--no-defaults", "-S", str(run / "sock"), "-uroot", "shutdown"],
                           check=True, capture_output=True)
        proc.wait(60)


def _start_mariadb(data: Path, run: Path) -> subprocess.Popen:
    run.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["mariadbd", "--no-defaults", f"--datadir={data}", "--user=root",
                             f"--socket={run / 'sock'}", "--skip-networking", f"--pid-file={run / 'pid'}",
                             f"--log-error={run / 'err.log'}"])
    for _ in range(100):
        if subprocess.run(["mariadb-admin", "--no-defaults", "-S", str(run / "sock"), "-uroot", "ping"],
                          capture_output=True).returncode == 0:
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"mariadbd did not start: {(run / 'err.log').read_text()[-2000:]}")


@pytest.fixture(scope="module")
def work():
    """A work dir the postgres user can reach (pytest's own temp root is 0700 and
    is reset to that by every pytest session that starts meanwhile)."""
    base = Path(tempfile.mkdtemp(prefix="rescue-db-test-"))
    os.chmod(base, 0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def tmp_work(work, request):
    path = work / request.node.name.replace("/", "_").replace("[", "_").replace("]", "")
    path.mkdir(mode=0o755)
    return path


@pytest.fixture(scope="module")
def server(work):
    """An ext4 image of a server tree holding the databases; (image, build dir)."""
    if not IS_ROOT or PG is None or not MARIADB or not shutil.which("mkfs.ext4"):
        pytest.skip("needs root, postgresql, mariadb-server and mkfs.ext4 (apt install postgresql mariadb-server)")
    base = work / "build"
    base.mkdir(mode=0o755)
    tree = base / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/os-release").write_text("ID=debian\nPRETTY_NAME=\"db test host\"\n")
    run = base / "run"
    _pg_cluster(tree / "var/lib/postgresql/15/main", run / "pg1", waldir=tree / "srv/pgwal/pg_wal",
                tablespace=tree / "srv/pgts", crash=False)
    _pg_cluster(tree / "var/lib/docker/volumes/app_pg/_data", run / "pg2", crash=True)
    _mariadb(tree / "var/lib/mysql", run / "my1", crash=False)
    _mariadb(tree / "var/lib/docker/volumes/app_my/_data", run / "my2", crash=True)
    (tree / "srv/app").mkdir(parents=True)
    con = sqlite3.connect(tree / "srv/app/data.db")
    con.execute("pragma journal_mode=wal")
    con.execute("create table t(x)")
    con.execute("insert into t values (?)", (ROW,))
    con.commit()
    _retarget_links(tree, str(tree))
    image = base / "server.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image), "600M"], check=True)
    con.close()
    return image, base


def _databases(image: Path) -> dict[str, dict]:
    res = rescue("inspect", "--json", str(image), timeout=120)
    assert res.returncode == 0, explain(res)
    return {d["path"]: d for d in json.loads(res.stdout)["databases"]}


@needs_root
def test_inspect_tells_clean_from_killed(server):
    image, _ = server
    dbs = _databases(image)
    pg_ok, pg_bad = dbs["/var/lib/postgresql/15/main"], dbs["/var/lib/docker/volumes/app_pg/_data"]
    my_ok, my_bad = dbs["/var/lib/mysql"], dbs["/var/lib/docker/volumes/app_my/_data"]
    version = PG.parent.name
    assert (pg_ok["kind"], pg_ok["version"], pg_ok["clean"], pg_ok["image"]) == ("postgresql", version, True,
                                                                               f"postgres:{version}")
    assert pg_bad["clean"] is False and "in production" in pg_bad["state"] and "postmaster.pid" in pg_bad["state"]
    assert pg_ok["together"] == ["/srv/pgwal/pg_wal", "/srv/pgts"]
    server_version = subprocess.run(["mariadbd", "--version"], capture_output=True, text=True).stdout
    assert my_ok["kind"] == "mariadb" and my_ok["version"] in server_version and my_ok["clean"] is True
    assert my_bad["clean"] is False and my_ok["image"] == "mariadb:" + ".".join(my_ok["version"].split(".")[:2])
    lite = dbs["/srv/app/data.db"]
    assert lite["clean"] is False and lite["together"][0] == "/srv/app/data.db-wal"


@needs_root
def test_extract_keeps_a_cluster_whole_and_says_so(server, tmp_path):
    image, _ = server
    out = tmp_path / "out"
    res = rescue("extract", str(image), "--path", "/var/lib/postgresql/15/main/base", "--path", "/srv/app/data.db",
                 "-o", f"{out}/", timeout=120)
    assert res.returncode == 0, explain(res)
    err = res.stderr.decode()
    assert "the whole directory was included" in err
    assert "included /srv/pgwal/pg_wal" in err and "included /srv/pgts" in err
    assert "included /srv/app/data.db-wal" in err
    assert (out / "var/lib/postgresql/15/main/global/pg_control").is_file()
    assert any((out / "srv/pgwal/pg_wal").iterdir()) and (out / "srv/app/data.db-wal").is_file()
    assert "database: /var/lib/postgresql/15/main: postgresql" in err and "start it with image postgres:" in err


@needs_root
def test_crashed_postgres_starts_again_from_the_extract(server, tmp_work):
    tmp_path = tmp_work
    image, base = server
    out = tmp_path / "pg"
    res = rescue("extract", str(image), "--path", "/var/lib/docker/volumes/app_pg/_data", "--strip-components", "5",
                 "-o", f"{out}/", timeout=120)
    assert res.returncode == 0, explain(res)
    assert "will run crash recovery on first start" in res.stderr.decode()
    data, sock = out / "_data", tmp_path / "sock"
    sock.mkdir()
    shutil.chown(sock, "postgres", "postgres")
    os.chmod(out, 0o755)
    (data / "postmaster.pid").unlink()   # the dead server's pid file (its pid may be reused here)
    _pg_start(data, sock)
    try:
        got = _as_postgres(str(PG / "psql"), "-h", str(sock), "-U", "postgres", "-Atc", "select x from t").stdout
        assert got.decode().strip() == ROW
        log = _as_postgres(str(PG / "pg_controldata"), str(data)).stdout.decode()
        assert "in production" in log
    finally:
        _as_postgres(str(PG / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")


@needs_root
def test_crashed_mariadb_starts_again_from_the_extract(server, tmp_path):
    image, _ = server
    out = tmp_path / "my"
    res = rescue("extract", str(image), "--docker-volume", "app_my", "-o", f"{out}/", timeout=120)
    assert res.returncode == 0, explain(res)
    assert "database: " in res.stderr.decode() and "mariadb" in res.stderr.decode()
    run = tmp_path / "run"
    proc = _start_mariadb(out / "volumes/app_my", run)
    try:
        got = subprocess.run(["mariadb", "--no-defaults", "-S", str(run / "sock"), "-uroot", "-N", "-e",
                              "select x from app.t"], check=True, capture_output=True, text=True).stdout
        assert got.strip() == ROW
        assert "crash recovery" in (run / "err.log").read_text().lower()
    finally:
        subprocess.run(["mariadb-admin", "--no-defaults", "-S", str(run / "sock"), "-uroot", "shutdown"],
                       capture_output=True)
        proc.wait(60)


# Parser unit tests on HAND-WRITTEN samples (MongoDB and Redis are not in Debian's archive).
def test_mongo_lock_and_redis_rdb_header_hand_written(tmp_path):
    if not shutil.which("mkfs.ext4"):
        pytest.skip("mkfs.ext4 is missing")
    tree = tmp_path / "t"
    (tree / "var/lib/mongodb").mkdir(parents=True)
    (tree / "var/lib/mongodb/mongod.lock").write_text("1234\n")
    (tree / "var/lib/mongodb/WiredTiger").write_text("WiredTiger\nWiredTiger 10.0.2: (December 21, 2021)\n")
    (tree / "var/lib/redis").mkdir(parents=True)
    (tree / "var/lib/redis/dump.rdb").write_bytes(b"REDIS0011\xfa\x09redis-ver")
    image = tmp_path / "i.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image), "8M"], check=True)
    dbs = _databases(image)
    mongo, redis = dbs["/var/lib/mongodb"], dbs["/var/lib/redis"]
    assert (mongo["clean"], mongo["version"]) == (False, "WiredTiger 10.0.2")
    assert (redis["version"], redis["image"]) == ("RDB 11", "redis:7.2")
