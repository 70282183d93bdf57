"""Containers, compose projects and volumes in `inspect`, from records a real
engine wrote: fixtures/docker/*.ext4.zst were made by scripts/make-docker-fixture
with Debian's dockerd (and podman) running on the guest tree, then mkfs.ext4 -d.
The kernel's read-only loop mount of the same image is the reference where a
test needs one."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from repo_paths import FIXTURES
from common_support import IS_ROOT, explain, rescue
from rescue.guest import open_snapshot
from rescue.guest.apps import _compose_labels, _docker_state, Container, find_applications
from rescue.guest.boltdb import BoltDB, BoltError

FIX = FIXTURES / "docker"
HOST = FIX / "docker-host.ext4.zst"
MOVED = FIX / "docker-moved-root.ext4.zst"

pytestmark = pytest.mark.skipif(not HOST.exists(), reason="fixtures/docker is missing (scripts/make-docker-fixture)")


def _inspect(image: Path) -> dict:
    res = rescue("inspect", "--json", str(image))
    assert res.returncode == 0, explain(res)
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def host() -> dict:
    return _inspect(HOST)["applications"]


def test_inspect_names_every_container_with_its_project_state_and_mounts(host):
    by_name = {c["name"]: c for c in host["containers"]}
    assert set(by_name) == {"blog-db-1", "blog-web-1", "blog-worker-1", "tool", "pod-app", "alice-app"}
    db, web, worker, tool = by_name["blog-db-1"], by_name["blog-web-1"], by_name["blog-worker-1"], by_name["tool"]
    assert (db["project"], db["service"], db["state"]) == ("blog", "db", "exited (137)")   # stopped by `docker stop`
    assert (web["state"], worker["state"], tool["state"]) == ("running", "running", "exited (0)")
    assert tool["project"] is None and db["image"] == "bbox:1"
    assert db["working_dir"] == "/srv/blog" and db["config_files"] == ["/srv/blog/docker-compose.yml"]
    assert [(m["kind"], m["source"], m["destination"], m["present"]) for m in db["mounts"]] == \
        [("volume", "blog_dbdata", "/var/lib/db", True)]
    assert [(m["kind"], m["source"], m["destination"]) for m in web["mounts"]] == \
        [("bind", "/srv/blog/data", "/usr/share/www"), ("tmpfs", "size=1m", "/run/cache")]
    # only the worker wrote into its own layer (jobs.txt, 7 bytes, and a 64 KiB file of zeros)
    assert worker["layer"] == {"files": 2, "bytes": 65543, "allocated": 7, "complete": True}
    assert all(by_name[n]["layer"] is None for n in ("blog-db-1", "blog-web-1", "tool"))


def test_podman_records_are_read_from_containers_json_and_boltdb(host):
    pod = next(c for c in host["containers"] if c["name"] == "pod-app")
    assert pod["engine"] == "podman" and pod["image"] == "localhost/tiny:1" and pod["state"] == "created"
    assert [(m["kind"], m["source"], m["destination"], m["rw"]) for m in pod["mounts"]] == \
        [("volume", "pvol", "/data", True), ("bind", "/srv/blog/data", "/www", False)]
    alice = next(c for c in host["containers"] if c["name"] == "alice-app")   # rootless, under her home
    assert alice["engine"] == "podman (rootless, alice)" and alice["owner"] == "alice"
    assert alice["mounts"][0]["guest_path"] == "/home/alice/.local/share/containers/storage/volumes/avol/_data"


def test_projects_volumes_and_unused_volumes(host):
    (blog,) = host["projects"]
    assert blog == {"name": "blog", "working_dir": "/srv/blog", "config_files": ["/srv/blog/docker-compose.yml"],
                    "env_files": ["/srv/blog/.env"], "services": ["db", "web", "worker"],
                    "containers": ["blog-db-1", "blog-web-1", "blog-worker-1"], "volumes": ["blog_dbdata"],
                    "binds": ["/srv/blog/data"], "missing": []}
    vols = {v["name"]: v for v in host["volumes"]}
    assert set(vols) == {"blog_dbdata", "orphan_cache", "pvol", "avol"}
    assert host["unused_volumes"] == ["orphan_cache"]
    assert vols["pvol"]["used_by"] == ["pod-app"] and vols["blog_dbdata"]["used_by"] == ["blog-db-1"]
    assert vols["blog_dbdata"]["size"]["bytes"] == len("row 1\n")
    assert [(e["engine"], e["root"], e["found"]) for e in host["engines"]] == \
        [("docker", "/var/lib/docker", True), ("podman", "/var/lib/containers/storage", True),
         ("podman", "/home/alice/.local/share/containers/storage", True)]


def test_human_inspect_shows_containers_projects_and_unused_volumes():
    res = rescue("inspect", str(HOST))
    assert res.returncode == 0, explain(res)
    text = res.stdout.decode()
    for needle in ("blog-worker-1", "writable layer: 2 files", "bind /srv/blog/data -> /usr/share/www",
                   "tmpfs /run/cache (memory only", "blog: /srv/blog/docker-compose.yml, /srv/blog/.env",
                   "orphan_cache", "UNUSED (no container)", "--app NAME"):
        assert needle in text, needle


def test_data_root_moved_by_daemon_json_is_followed():
    apps = _inspect(MOVED)["applications"]
    assert apps["engines"][0]["root"] == "/srv/docker" and apps["engines"][0]["why"].startswith("/etc/docker/daemon.json")
    (c,) = apps["containers"]
    assert (c["name"], c["project"], c["state"]) == ("notes-app-1", "notes", "exited (0)")
    assert c["mounts"][0]["guest_path"] == "/srv/docker/volumes/notes_data/_data" and c["mounts"][0]["present"]
    assert apps["volumes"][0]["size"]["files"] == 1


def _kernel_names(image: Path) -> set[str] | None:
    """Container names as the kernel's read-only mount of the image shows them."""
    if not IS_ROOT or not shutil.which("zstd"):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        raw, mnt = Path(tmp) / "img", Path(tmp) / "mnt"
        mnt.mkdir()
        subprocess.run(["zstd", "-q", "-d", str(image), "-o", str(raw)], check=True)
        if subprocess.run(["mount", "-o", "ro,loop", str(raw), str(mnt)], capture_output=True).returncode != 0:
            return None
        try:
            names = {json.load(open(p))["Name"].lstrip("/")
                     for p in glob.glob(f"{mnt}/var/lib/docker/containers/*/config.v2.json")}
            for store in ("var/lib/containers/storage", "home/alice/.local/share/containers/storage"):
                names |= {c["names"][0] for c in json.load(open(mnt / store / "overlay-containers/containers.json"))}
            return names
        finally:
            subprocess.run(["umount", str(mnt)], check=True)


def test_container_names_match_the_kernel_view(host):
    names = _kernel_names(HOST)
    if names is None:
        pytest.skip("needs root, zstd and a loop mount")
    assert {c["name"] for c in host["containers"]} == names


def test_var_lib_docker_symlinked_to_missing_storage_is_said_plainly(tmp_path):
    if not shutil.which("mkfs.ext4"):
        pytest.skip("mkfs.ext4 is missing")
    tree = tmp_path / "tree"
    (tree / "var/lib").mkdir(parents=True)
    (tree / "etc").mkdir()
    (tree / "etc/os-release").write_text("ID=debian\n")
    os.symlink("/mnt/disk2/docker", tree / "var/lib/docker")
    image = tmp_path / "img.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image), "8M"], check=True)
    data = _inspect(image)
    assert any(w.startswith("/var/lib/docker is a symlink to /mnt/disk2/docker, which is not in this snapshot")
               for w in data["warnings"]), data.get("warnings")
    assert data["applications"]["engines"][0]["found"] is False


def test_boltdb_reader_refuses_garbage_in_one_error():
    with pytest.raises(BoltError):
        BoltDB(b"\0" * 8192)
    with pytest.raises(BoltError):
        BoltDB(os.urandom(8192))


# Parser unit tests on HAND-WRITTEN samples (not engine output): the state and label rules.
def test_docker_state_words_hand_written():
    assert _docker_state({"Running": True, "Paused": True}) == "paused"
    assert _docker_state({"Running": False, "ExitCode": 1, "StartedAt": "2024-01-01T00:00:00Z"}) == "exited (1)"
    assert _docker_state({"StartedAt": "0001-01-01T00:00:00Z"}) == "created"
    assert _docker_state({"Dead": True}) == "dead"


def test_compose_labels_with_several_config_files_hand_written():
    c = Container("docker", "x", "n", "i", "running", "/r")
    _compose_labels(c, {"com.docker.compose.project": "p", "com.docker.compose.service": "s",
                        "com.docker.compose.project.config_files": "/a/compose.yml,/a/compose.override.yml"})
    assert (c.project, c.service, c.config_files) == ("p", "s", ["/a/compose.yml", "/a/compose.override.yml"])


def test_allocated_bytes_do_not_count_holes():
    from common_support import SAMPLE
    with open_snapshot(str(SAMPLE)) as snap:
        apps = find_applications(snap.filesystem())
    uploads = next(v for v in apps.volumes if v.name == "myapp_uploads")
    assert uploads.size.bytes > 8 << 20 and uploads.size.allocated < 64 << 10   # disk.sparse: 8 MiB, holes
