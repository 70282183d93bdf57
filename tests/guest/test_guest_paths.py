"""Errors and warnings from a mounted filesystem name guest paths: a separate
/var's "/lib/nothing" is shown as "/var/lib/nothing", a subvolume's "/sub/x" as "/x"."""

from __future__ import annotations

import logging
import subprocess
import uuid
from pathlib import Path

import pytest

from common_support import explain, rescue
from rescue.errors import GuestPathError
from rescue.guest.guest_paths import guest_names, swap
from rescue.guest.merged import SubtreeFileSystem

import test_guest_merged_images as M


def test_swap_renames_the_path_and_what_is_below_it_only():
    assert swap("no such file: /lib/x", "/lib/x", "/var/lib/x") == "no such file: /var/lib/x"
    assert swap("directory /lib/docker/a listed in part", "/lib/docker", "/var/lib/docker") == \
        "directory /var/lib/docker/a listed in part"
    assert swap("/libx and /lib and x/lib", "/lib", "/var/lib") == "/libx and /var/lib and x/lib"
    assert swap("dir /@/var/lib; /@ itself", "/@", "/") == "dir /var/lib; / itself"


def test_warnings_logged_during_a_routed_call_are_renamed(caplog):
    log = logging.getLogger("rescue.fs.test")
    with caplog.at_level(logging.WARNING, logger="rescue"):
        with guest_names("/lib/docker", "/var/lib/docker"):
            log.warning("%s: directory %s listed in part", "img volume 2", "/lib/docker/volumes")
        log.warning("outside: %s", "/lib/docker")
    assert [r.getMessage() for r in caplog.records] == [
        "img volume 2: directory /var/lib/docker/volumes listed in part", "outside: /lib/docker"]


@pytest.fixture(scope="module")
def varpart(tmp_path_factory) -> Path:
    M._need("sgdisk", "sfdisk", "mkfs.ext4")
    d = tmp_path_factory.mktemp("varpart")
    root_uuid, var_guid = str(uuid.uuid4()), str(uuid.uuid4())
    files = M._root_files(f"UUID={root_uuid} / ext4 defaults 0 1\nPARTUUID={var_guid} /var ext4 defaults 0 2\n")
    M._gpt(d / "disk.img", [(M._mkext4(d / "root.ext4", 3 * M.MiB, files, root_uuid), "8300", str(uuid.uuid4())),
                            (M._mkext4(d / "var.ext4", 4 * M.MiB, M.VOLUME_FILES, str(uuid.uuid4())), "8300",
                             var_guid)])
    return d / "disk.img"


@pytest.mark.parametrize("args", [("ls", "{img}", "/var/lib/nothing"),
                                  ("extract", "{img}", "--path", "/var/lib/nothing", "--dry-run")])
def test_a_separate_var_is_named_by_guest_paths(varpart, args):
    res = rescue(*[a.format(img=varpart) for a in args])
    assert res.returncode == 2, explain(res)
    assert b"/var/lib/nothing" in res.stderr and b": /lib/nothing" not in res.stderr, explain(res)


def test_a_subtree_names_its_own_paths(tmp_path):
    tree = tmp_path / "t"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "file").write_text("x")
    image = tmp_path / "i.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image), "4M"], check=True)
    from rescue.fs.tsk import TskFileSystem
    from rescue.source import open_source
    fs = TskFileSystem(open_source(str(image)), name="img")
    sub = SubtreeFileSystem(fs, "/sub")
    assert sub.stat("/file").size == 1
    with pytest.raises(GuestPathError) as err:
        sub.stat("/nothing")
    assert "/sub" not in err.value.problem and "/nothing" in err.value.problem
