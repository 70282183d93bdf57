"""The Python API does what the CLI does: same reports, same bytes, no CLI wiring to copy."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile

import pytest

from repo_paths import REPO
from rescue import api
from rescue.errors import GuestPathError, VolumeError

SAMPLE = str(REPO / "fixtures" / "sample-vps.disk")


def _cli_json(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "rescue", *args, "--json"], capture_output=True, cwd=REPO)
    assert proc.returncode in (0, 1), proc.stderr.decode()
    return json.loads(proc.stdout)


def test_inspect_report_is_typed_and_equals_the_cli_json():
    report = api.inspect(SAMPLE)
    assert report.os_name == "Debian GNU/Linux 12 (bookworm)"
    assert report.partition_table == "gpt"
    root = next(v for v in report.volumes if v.id == report.root_volume)
    assert (root.filesystem, root.label) == ("ext4", "cloudimg-rootfs")
    assert root.used and root.free and root.used + root.free <= root.size
    assert any(v["path"] == "/var/lib/docker/volumes/myapp_pgdata/_data" for v in report.valuables)
    cli = _cli_json("inspect", SAMPLE)
    assert json.loads(json.dumps(report.to_json(), default=str)) == cli


def test_extract_writes_the_same_tar_members_as_the_cli(tmp_path):
    ours = tmp_path / "api.tar"
    result = api.extract(SAMPLE, str(ours), paths=["/var/lib/docker/volumes"])
    assert result.complete and not result.dry_run
    assert result.report.files == 17 and result.report.bytes > 11 << 20
    assert result.bytes_read   # read from the image file (less than written: the sample has sparse files)
    theirs = tmp_path / "cli.tar"
    cli = _cli_json("extract", SAMPLE, "--path", "/var/lib/docker/volumes", "-o", str(theirs))
    assert cli["files"] == result.report.files and cli["bytes"] == result.report.bytes
    assert cli["bytes_read_from_snapshot"] == result.bytes_read
    with tarfile.open(ours) as a, tarfile.open(theirs) as b:
        left = {m.name: (m.type, m.mode, m.uid, m.size, m.mtime) for m in a.getmembers()}
        right = {m.name: (m.type, m.mode, m.uid, m.size, m.mtime) for m in b.getmembers()}
        assert left == right
        for m in a.getmembers():
            if m.isfile():
                assert a.extractfile(m).read() == b.extractfile(m.name).read()


def test_dry_run_plans_without_writing(tmp_path):
    result = api.extract(SAMPLE, str(tmp_path / "never.tar"), paths=["/etc"], dry_run=True)
    assert result.dry_run and not (tmp_path / "never.tar").exists()
    names = {p.name for p in result.plan.items}
    assert "etc/fstab" in names and result.plan.total_bytes > 0


def test_listdir_and_read_file_match_ls_and_cat():
    names = [e.name for e in api.listdir(SAMPLE, "/etc")]
    assert names == sorted(names) and "fstab" in names
    data = b"".join(api.read_file(SAMPLE, "/etc/fstab"))
    cat = subprocess.run([sys.executable, "-m", "rescue", "cat", SAMPLE, "/etc/fstab"], capture_output=True,
                         cwd=REPO, check=True).stdout
    assert data == cat and b"UUID=" in data


def test_errors_are_rescue_errors(tmp_path):
    with pytest.raises(GuestPathError):
        list(api.read_file(SAMPLE, "/no/such/file"))
    not_a_disk = tmp_path / "notes.txt"
    not_a_disk.write_text("hello\n" * 100)
    with pytest.raises(VolumeError, match="not a disk image"):
        api.inspect(str(not_a_disk))


DOCKER_HOST = REPO / "fixtures" / "docker" / "docker-host.ext4.zst"


@pytest.mark.skipif(not DOCKER_HOST.exists(), reason="fixtures/docker is missing (scripts/make-docker-fixture)")
def test_extract_an_application_through_the_api_equals_the_cli(tmp_path):
    """--app through Python: same members, same restore commands, manifest inside."""
    ours = tmp_path / "api.tar"
    seen = []
    result = api.extract(str(DOCKER_HOST), str(ours), api.ExtractRequest(apps=["blog"]),
                         on_plan=lambda job: seen.append(job.plan.total_bytes) or None)
    assert seen and seen[0] == result.plan.total_bytes
    assert result.restore_commands and any("docker volume create" in c for c in result.restore_commands)
    theirs = tmp_path / "cli.tar"
    cli = _cli_json("extract", str(DOCKER_HOST), "--app", "blog", "-o", str(theirs))
    assert cli["restore"]["commands"] == result.restore_commands
    assert cli["files"] == result.report.files and cli["bytes"] == result.report.bytes
    with tarfile.open(ours) as a, tarfile.open(theirs) as b:
        names = sorted(m.name for m in a.getmembers())
        assert names == sorted(m.name for m in b.getmembers())
        assert ".rescue-manifest.jsonl" in {n.rsplit("/", 1)[-1] for n in names}
        assert any(n.startswith("volumes/blog_dbdata") for n in names)
