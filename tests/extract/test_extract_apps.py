"""`extract --app / --container / --docker-volume` on a Docker host made by a real
dockerd (fixtures/docker, scripts/make-docker-fixture): the output is exactly the
union of the project's volumes, bind sources, compose files and writable layers,
laid out as volumes/ binds/ compose/ layer/, equal to the kernel's view of the
same image, with a README of restore commands and a manifest `verify` accepts."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from repo_paths import FIXTURES
from common_support import IS_ROOT, assert_one_line_error, explain, rescue

HOST = FIXTURES / "docker" / "docker-host.ext4.zst"
pytestmark = pytest.mark.skipif(not HOST.exists(), reason="fixtures/docker is missing (scripts/make-docker-fixture)")

BLOG = {  # output prefix -> guest path (from the engine's records, see test_guest_apps)
    "volumes/blog_dbdata": "/var/lib/docker/volumes/blog_dbdata/_data",
    "binds/srv/blog/data": "/srv/blog/data",
    "compose/blog/docker-compose.yml": "/srv/blog/docker-compose.yml",
    "compose/blog/.env": "/srv/blog/.env",
}


def _tree(root: Path) -> dict[str, tuple]:
    """name -> (kind, mode, sha256 or link target) for everything under root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            if stat.S_ISREG(st.st_mode):
                out[rel] = ("file", stat.S_IMODE(st.st_mode), hashlib.sha256(p.read_bytes()).hexdigest())
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", 0, os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), None)
    return out


@contextmanager
def _kernel_mount():
    if not IS_ROOT or not shutil.which("zstd"):
        pytest.skip("needs root and zstd for the kernel's loop mount")
    with tempfile.TemporaryDirectory() as tmp:
        raw, mnt = Path(tmp) / "img", Path(tmp) / "mnt"
        mnt.mkdir()
        subprocess.run(["zstd", "-q", "-d", str(HOST), "-o", str(raw)], check=True)
        if subprocess.run(["mount", "-o", "ro,loop", str(raw), str(mnt)], capture_output=True).returncode:
            pytest.skip("loop mount failed")
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=True)


def _layer_dir(mnt: Path, container: str) -> Path:
    for cfg in (mnt / "var/lib/docker/containers").glob("*/config.v2.json"):
        data = json.loads(cfg.read_text())
        if data["Name"] == "/" + container:
            mount_id = (mnt / "var/lib/docker/image/overlay2/layerdb/mounts" / data["ID"] / "mount-id").read_text()
            return mnt / "var/lib/docker/overlay2" / mount_id.strip() / "diff"
    raise AssertionError(container)


def _expected(mnt: Path, mapping: dict[str, Path]) -> dict[str, tuple]:
    want = {}
    for prefix, src in mapping.items():
        if src.is_dir():
            want[prefix] = ("dir", stat.S_IMODE(src.stat().st_mode), None)
            want.update({f"{prefix}/{k}": v for k, v in _tree(src).items()})
        else:
            want[prefix] = ("file", stat.S_IMODE(src.stat().st_mode), hashlib.sha256(src.read_bytes()).hexdigest())
    return want


def test_app_extract_is_the_union_of_the_projects_data_as_the_kernel_sees_it(tmp_path):
    out = tmp_path / "out"
    res = rescue("extract", str(HOST), "--app", "blog", "-o", f"{out}/")
    assert res.returncode == 0, explain(res)
    got = _tree(out)
    assert got.pop("README-rescue.txt")[0] == "file" and got.pop(".rescue-manifest.jsonl")[0] == "file"
    implied = {"volumes", "binds", "binds/srv", "binds/srv/blog", "compose", "compose/blog", "layer"}
    got = {k: v for k, v in got.items() if k not in implied}
    with _kernel_mount() as mnt:
        mapping = {k: mnt / v.lstrip("/") for k, v in BLOG.items()}
        mapping["layer/blog-worker-1"] = _layer_dir(mnt, "blog-worker-1")
        want = _expected(mnt, mapping)
    assert got == want
    assert "layer/blog-worker-1/var/spool/jobs.txt" in got and "volumes/blog_dbdata/table.txt" in got


def test_app_extract_prints_and_writes_the_restore_commands(tmp_path):
    out = tmp_path / "blog.tar.gz"
    res = rescue("extract", str(HOST), "--app", "blog", "-o", str(out))
    assert res.returncode == 0, explain(res)
    err = res.stderr.decode()
    with tarfile.open(out) as tf:
        readme = tf.extractfile("README-rescue.txt").read().decode()
        names = tf.getnames()
    assert names[-1] == ".rescue-manifest.jsonl" and names[-2] == "README-rescue.txt"
    for line in ("docker volume create --label com.docker.compose.project=blog "
                 "--label com.docker.compose.volume=dbdata blog_dbdata",
                 "mkdir -p /srv/blog/data && cp -a R/binds/srv/blog/data/. /srv/blog/data/",
                 "cd /srv/blog && docker compose up -d",
                 "docker cp R/layer/blog-worker-1/. blog-worker-1:/"):
        assert line in readme and line in err, line
    assert "/run/cache was a tmpfs" in readme


def test_container_and_volume_selections_mix_with_paths(tmp_path):
    out = tmp_path / "mix.tar"
    res = rescue("extract", str(HOST), "--container", "blog-worker-1", "--docker-volume", "orphan_cache",
                 "--path", "/etc/hostname", "-o", str(out))
    assert res.returncode == 0, explain(res)
    with tarfile.open(out) as tf:
        files = sorted(m.name for m in tf.getmembers() if m.isfile())
        assert tf.extractfile("layer/blog-worker-1/var/spool/jobs.txt").read() == b"job-42\n"
    assert files == [".rescue-manifest.jsonl", "README-rescue.txt", "etc/hostname",
                     "layer/blog-worker-1/var/spool/big.bin", "layer/blog-worker-1/var/spool/jobs.txt",
                     "volumes/orphan_cache/keep.txt"]


def test_verify_accepts_an_app_extract_and_finds_a_change(tmp_path):
    out = tmp_path / "out"
    assert rescue("extract", str(HOST), "--app", "blog", "-o", f"{out}/").returncode == 0
    for args in ((str(HOST), str(out)), (str(out),)):
        res = rescue("verify", "--json", *args, check_readonly=False)
        assert res.returncode == 0 and json.loads(res.stdout)["equal"], explain(res)
    (out / "volumes/blog_dbdata/table.txt").write_text("row 2\n")
    res = rescue("verify", "--json", str(HOST), str(out), check_readonly=False)
    rep = json.loads(res.stdout)
    assert res.returncode == 1 and [d["path"] for d in rep["different"]] == ["volumes/blog_dbdata/table.txt"]


@pytest.mark.parametrize("flag,name,known", [("--app", "nope", "projects: blog"),
                                             ("--container", "nope", "blog-db-1"),
                                             ("--docker-volume", "nope", "orphan_cache")])
def test_unknown_application_names_are_one_line_with_the_known_ones(tmp_path, flag, name, known):
    res = rescue("extract", str(HOST), flag, name, "-o", f"{tmp_path}/o/")
    assert_one_line_error(res)
    assert known.encode() in res.stderr


def test_names_from_the_records_cannot_climb_out_of_the_output():
    # HAND-WRITTEN records (a crafted image): a volume and a container named to escape the layout
    from rescue.extract.app_select import select_apps
    from rescue.guest.apps import Applications, Container, Mount, Volume
    apps = Applications()
    apps.volumes.append(Volume("docker", "../../etc", "/var/lib/docker/volumes/../../etc/_data"))
    apps.containers.append(Container("docker", "c1", "../x", "img", "running", "/r",
                                     mounts=[Mount("volume", "/data", "../../etc", True, "/etc", True)],
                                     layer_path="/var/lib/docker/overlay2/a/diff"))
    apps.containers[0].layer = object()
    sel = select_apps(apps, containers=["../x"])
    assert sel.sources == [] and len(sel.notes) == 2
    assert all("cannot be a file name" in n for n in sel.notes)
