"""Every skip counts and crafted names are shown whole (issue 14): a device
node a directory target cannot hold is named and makes the exit code 1; `ls`
shows a name holding '/' whole (escaped as \\x2f in text, as is in JSON); the
"no Range support" hint names the file as the URL does (.tar.gz stays .tar.gz)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from repo_paths import REPO
from common_support import rescue
from http_test_server import http_server  # noqa: F401 (fixture)
from rescue.errors import SourceError

NAMES = REPO / "fixtures" / "hostile" / "names.img"   # scripts/make-fixtures: crafted names and devices


def test_a_device_node_skipped_in_a_directory_is_named_and_exit_1(tmp_path):
    res = rescue("extract", str(NAMES), "-o", str(tmp_path / "out") + "/")
    text = res.stderr.decode()
    assert res.returncode == 1, text
    skipped = [line for line in text.splitlines() if line.startswith("skipped: ")]
    for dev in ("/mem", "/sda"):
        assert any(line.startswith(f"skipped: {dev}: device node not created") for line in skipped), text
    assert not (tmp_path / "out" / "mem").exists() and not (tmp_path / "out" / "sda").exists()
    assert "damaged" not in " ".join(line for line in skipped if "device node" in line)


def test_device_nodes_in_a_tar_are_kept_and_not_skipped(tmp_path):
    res = rescue("extract", str(NAMES), "--path", "/mem", "-o", str(tmp_path / "x.tar"))
    assert res.returncode == 0, res.stderr.decode()
    assert b"skipped" not in res.stderr


def test_ls_shows_names_holding_a_slash_whole():
    res = rescue("ls", str(NAMES), "/")
    assert res.returncode == 0, res.stderr.decode()
    lines = res.stdout.decode().splitlines()
    assert r"..\x2f..\x2f..\x2fesc" in lines and r"a\x2fb\x2fc\x2fd" in lines, lines
    assert "esc" not in lines and "d" not in lines
    listed = json.loads(rescue("ls", "--json", str(NAMES), "/").stdout)["entries"]
    names = {e["name"] for e in listed}
    assert {"../../../esc", "a/b/c/d", "n\x00l"} <= names, names


def test_the_no_range_hint_keeps_the_archive_name(http_server, tmp_path):  # noqa: F811
    snap = tmp_path / "snapshot.tar.gz"
    snap.write_bytes(b"\x1f\x8b" + bytes(4096))
    http_server.modes.no_range = True
    from rescue.source.http import HttpSource
    with pytest.raises(SourceError) as caught:
        HttpSource(http_server.serve("dl/snapshot.tar.gz", snap) + "?X-Signature=abc")
    hint = caught.value.hint or ""
    assert hint.endswith("-o snapshot.tar.gz") and "snapshot.img" not in hint, hint


def _dots_image(tmp_path: Path, name: bytes) -> Path:
    """ext4 with directory /d holding a crafted extra entry named `name` ('.' or
    '..'): mkfs.ext4 -d makes /d with files f and a, then a's entry is renamed."""
    import shutil
    import struct
    import subprocess
    for tool in ("mkfs.ext4", "debugfs"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} (e2fsprogs)")
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"kept\n")
    (src / "d" / "a").write_bytes(b"renamed\n")
    image = tmp_path / "dots.img"
    with open(image, "wb") as f:
        f.truncate(4 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "1024", "-d", str(src), str(image)], check=True)
    blocks = subprocess.run(["debugfs", "-R", "blocks /d", str(image)], capture_output=True, check=True)
    block = int(blocks.stdout.split()[0])
    data = bytearray(image.read_bytes())
    pos = block * 1024
    while pos < (block + 1) * 1024:
        ino, rec_len, name_len, _ = struct.unpack_from("<IHBB", data, pos)
        if data[pos + 8:pos + 8 + name_len] == b"a":
            data[pos + 6] = len(name)
            data[pos + 8:pos + 8 + len(name)] = name
            break
        pos += rec_len
    else:
        pytest.fail("entry 'a' not found in /d's block")
    image.write_bytes(bytes(data))
    return image


@pytest.mark.parametrize("name", [b".", b".."], ids=["dot", "dotdot"])
def test_a_crafted_dot_entry_is_reported_not_dropped_silently(tmp_path, name):
    image = _dots_image(tmp_path, name)
    res = rescue("extract", str(image), "-o", str(tmp_path / "out.tar"))
    text = res.stderr.decode()
    assert res.returncode == 1, text
    assert f"an extra entry named {name.decode()!r}" in text and "skipped: /d:" in text, text
    import tarfile
    with tarfile.open(tmp_path / "out.tar") as tf:
        assert tf.extractfile("d/f").read() == b"kept\n"   # the rest of the directory is rescued


def test_a_name_too_long_for_the_target_is_reported_as_not_written(tmp_path):
    """A 300-byte name (btrfs and XFS images may hold what the target's
    255-byte NAME_MAX refuses): reported as not written (exit 1), not as
    damage, and no temporary file is left behind."""
    from rescue.extract.base import Item, NotWritten
    from rescue.extract.dir_sink import DirectorySink
    from rescue.fs.base import FILE, Entry
    sink = DirectorySink(str(tmp_path / "out"))
    entry = Entry(path="/" + "x" * 300, kind=FILE, mode=0o644)
    with pytest.raises(NotWritten, match="refuses it"):
        sink.add(Item(name="x" * 300, entry=entry))
    sink.close()
    assert list((tmp_path / "out").iterdir()) == []
