"""The one local-tree writer (rescue/extract/local_tree.py) on its own: what an
untrusted name or a planted link can and cannot make it do, on the
descriptor walk and on the lstat-checked path fallback (Windows), as root and
as an ordinary user."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from repo_paths import REPO
from rescue.extract import local_tree
from rescue.extract.base import Content
from rescue.extract.local_tree import STAT_XATTR, LocalTree, MetadataPolicy, NotADirectory
from rescue.fs.base import CHAR, DIR, FILE, SYMLINK, Entry, FileReadError

IS_ROOT = os.geteuid() == 0


@pytest.fixture(params=["fd-walk", "path-fallback"])
def walk(request, monkeypatch):
    if request.param == "path-fallback":
        monkeypatch.setattr(local_tree, "FD_WALK", False)
    elif not local_tree.FD_WALK:
        pytest.skip("this platform has no dir_fd/O_NOFOLLOW walk")
    return request.param


def _entry(path, kind=FILE, **kw):
    return Entry(path=path, kind=kind, mode=kw.pop("mode", 0o644), mtime_ns=kw.pop("mtime_ns", 1_000_000_000), **kw)


def _content(data: bytes) -> Content:
    return Content(size=len(data), chunks=lambda: iter([data]))


def _tree(root: Path, **policy) -> tuple[LocalTree, list[tuple[str, str]]]:
    root.mkdir(exist_ok=True)
    lost: list[tuple[str, str]] = []
    return LocalTree(str(root), MetadataPolicy(**policy), lose=lambda k, d: lost.append((k, d))), lost


def test_a_symlink_planted_where_a_parent_should_be_is_never_followed(tmp_path, walk):
    outside = tmp_path / "outside"
    outside.mkdir()
    tree, _ = _tree(tmp_path / "t")
    tree.symlink(["a"], _entry("/a", SYMLINK, link_target=str(outside)))
    with pytest.raises(NotADirectory):
        tree.write_file(["a", "evil"], _entry("/a/evil"), _content(b"pwned"))
    with pytest.raises(NotADirectory):
        tree.mkdir(["a", "d"], _entry("/a/d", DIR, mode=0o755))
    with pytest.raises(NotADirectory):
        tree.symlink(["a", "l"], _entry("/a/l", SYMLINK, link_target="x"))
    # a regular file where a parent should be is refused too
    tree.write_file(["f"], _entry("/f"), _content(b"x"))
    with pytest.raises(NotADirectory):
        tree.write_file(["f", "g"], _entry("/f/g"), _content(b"y"))
    tree.close()
    assert list(outside.iterdir()) == []
    assert os.readlink(tmp_path / "t" / "a") == str(outside)


def test_a_parent_swapped_for_a_symlink_after_the_walk_is_not_followed(tmp_path):
    """The walked parent is held by its descriptor: renaming it away and
    planting a link under its name cannot redirect the next file."""
    if not local_tree.FD_WALK:
        pytest.skip("descriptor walk only")
    outside = tmp_path / "outside"
    outside.mkdir()
    tree, _ = _tree(tmp_path / "t")
    tree.write_file(["d", "one"], _entry("/d/one"), _content(b"1"))
    os.rename(tmp_path / "t" / "d", tmp_path / "t" / "moved")
    os.symlink(outside, tmp_path / "t" / "d")
    tree.write_file(["d", "two"], _entry("/d/two"), _content(b"2"))
    tree.close()
    assert list(outside.iterdir()) == []
    assert (tmp_path / "t" / "moved" / "two").read_bytes() == b"2"


@pytest.mark.parametrize("parts", [[".."], ["a", "..", "..", "x"], ["."], [""], ["a/b"], ["nul\0"]])
def test_names_that_could_climb_out_are_refused(tmp_path, walk, parts):
    tree, _ = _tree(tmp_path / "t")
    with pytest.raises(ValueError):
        tree.write_file(parts, _entry("/x"), _content(b"x"))
    tree.close()
    assert not (tmp_path / "x").exists()
    assert list((tmp_path / "t").iterdir()) == []


def test_a_pre_existing_file_is_replaced_and_a_directory_is_not(tmp_path, walk):
    root = tmp_path / "t"
    root.mkdir()
    (root / "f").write_bytes(b"old")
    os.symlink("/etc/passwd", root / "s")          # a link from an earlier run: replaced, not written through
    (root / "d").mkdir()
    (root / "d" / "keep").write_bytes(b"k")
    tree, _ = _tree(root)
    tree.write_file(["f"], _entry("/f"), _content(b"new"))
    tree.write_file(["s"], _entry("/s"), _content(b"file now"))
    with pytest.raises(IsADirectoryError):
        tree.write_file(["d"], _entry("/d"), _content(b"x"))
    tree.mkdir(["d"], _entry("/d", DIR, mode=0o750))   # a directory for a directory: kept, with its contents
    tree.finish_dirs(modes=True)
    tree.close()
    assert (root / "f").read_bytes() == b"new"
    assert not os.path.islink(root / "s") and (root / "s").read_bytes() == b"file now"
    assert (root / "d" / "keep").read_bytes() == b"k"
    assert stat.S_IMODE(os.lstat(root / "d").st_mode) == 0o750


def test_an_interrupted_write_leaves_nothing_under_either_name(tmp_path, walk):
    def chunks():
        yield b"a" * 4096
        raise FileReadError("damaged")
    tree, _ = _tree(tmp_path / "t")
    (tmp_path / "t" / "f").write_bytes(b"complete old copy")
    with pytest.raises(FileReadError):
        tree.write_file(["f"], _entry("/f"), Content(size=8192, chunks=chunks),
                        temp_names=iter([(".f.part", True)]))
    tree.close()
    assert sorted(os.listdir(tmp_path / "t")) == []   # the old copy was replaced by nothing, no temp left


def test_setuid_is_dropped_unless_kept_and_the_loss_is_reported(tmp_path, walk):
    tree, lost = _tree(tmp_path / "t", owners=False)
    tree.write_file(["su"], _entry("/su", mode=0o4755), _content(b"x"))
    assert stat.S_IMODE(os.stat(tmp_path / "t" / "su").st_mode) == 0o755
    assert ("setuid", "") in lost
    kept, lost2 = _tree(tmp_path / "k", owners=False, keep_setuid=True)
    kept.write_file(["su"], _entry("/su", mode=0o4755), _content(b"x"))
    assert stat.S_IMODE(os.stat(tmp_path / "k" / "su").st_mode) == 0o4755 and not lost2


def test_fake_super_records_owner_mode_and_device_in_an_xattr(tmp_path, walk):
    tree, _ = _tree(tmp_path / "t", fake_super=True, owners=False, keep_setuid=True, devices=True)
    if not local_tree.xattrs_supported(str(tmp_path / "t")):
        pytest.skip("the test filesystem takes no user xattrs")
    tree.write_file(["bin", "su"], _entry("/bin/su", mode=0o4755, uid=0, gid=5), _content(b"x"))
    assert tree.special(["dev", "null"], _entry("/dev/null", CHAR, mode=0o666, rdev=(1, 3)))
    tree.close()
    assert os.getxattr(tmp_path / "t" / "bin" / "su", STAT_XATTR) == b"104755 0,0 0:5"
    assert os.getxattr(tmp_path / "t" / "dev" / "null", STAT_XATTR) == b"20666 1,3 0:0"
    assert stat.S_ISREG(os.lstat(tmp_path / "t" / "dev" / "null").st_mode)    # a stand-in, never a device
    assert os.getxattr(tmp_path / "t" / "bin", STAT_XATTR) == b"40755 0,0 0:0"  # implied parent: root's 0755


_AS_USER = textwrap.dedent("""
    import os, stat, sys
    from rescue.extract.base import Content
    from rescue.extract.local_tree import LocalTree, MetadataPolicy
    from rescue.fs.base import DIR, FILE, Entry
    root = sys.argv[1]
    tree = LocalTree(root, MetadataPolicy(owners=False))
    e = lambda p, k=FILE, m=0o644: Entry(path=p, kind=k, mode=m, mtime_ns=10**9)
    tree.mkdir(["ro"], e("/ro", DIR, 0o555))            # an image's read-only directory ...
    tree.write_file(["ro", "f"], e("/ro/f"), Content(size=2, chunks=lambda: iter([b"ok"])))  # ... still takes its files
    tree.mkdir(["ro", "sub"], e("/ro/sub", DIR, 0o500))
    tree.write_file(["ro", "sub", "g"], e("/ro/sub/g", m=0o400), Content(size=1, chunks=lambda: iter([b"g"])))
    tree.finish_dirs(modes=True)
    tree.close()
    print(oct(stat.S_IMODE(os.stat(os.path.join(root, "ro")).st_mode)),
          oct(stat.S_IMODE(os.stat(os.path.join(root, "ro", "sub")).st_mode)))
""")


def test_a_read_only_image_directory_still_takes_its_files_as_an_ordinary_user():
    """As root every permission check passes, so this runs as `nobody`."""
    prefix: list[str] = []
    if IS_ROOT:
        if not shutil.which("setpriv"):
            pytest.skip("setpriv (util-linux) is needed to run as nobody")
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    work = tempfile.mkdtemp(prefix="rescue-localtree-")
    try:
        os.chmod(work, 0o777)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        probe = subprocess.run([*prefix, sys.executable, "-c", "import rescue.extract.local_tree"],
                               capture_output=True, text=True, env=env, cwd=work)
        if probe.returncode != 0:
            pytest.skip("this Python/checkout is out of nobody's reach: " + probe.stderr.strip()[-200:])
        out = os.path.join(work, "out")
        os.makedirs(out)
        if IS_ROOT:
            os.chown(out, 65534, 65534)
        res = subprocess.run([*prefix, sys.executable, "-c", _AS_USER, out],
                             capture_output=True, text=True, env=env, cwd=work)
        assert res.returncode == 0, res.stderr
        assert res.stdout.split() == ["0o555", "0o500"]
        assert open(os.path.join(work, "out", "ro", "f"), "rb").read() == b"ok"
        assert open(os.path.join(work, "out", "ro", "sub", "g"), "rb").read() == b"g"
    finally:
        subprocess.run(["chmod", "-R", "u+rwx", work])
        shutil.rmtree(work, ignore_errors=True)


def test_a_directory_default_acl_is_not_inherited_by_files_that_lack_it(tmp_path):
    """A default ACL is set once the directory's files are written: a file made
    before the ACL in the image must not gain its entries in the target."""
    if not (shutil.which("setfacl") and shutil.which("mkfs.ext4")):
        pytest.skip("needs setfacl and mkfs.ext4")
    from common_support import rescue
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    (tree / "d" / "plain").write_text("no ACL here\n")
    subprocess.run(["setfacl", "-d", "-m", "u:1234:rwx", str(tree / "d")], check=True)
    image = tmp_path / "acl.img"
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-d", str(tree), str(image)], check=True)
    out = tmp_path / "out"
    assert rescue("extract", str(image), "-o", f"{out}/").returncode == 0

    def acls(path: Path) -> dict[str, bytes]:
        return {k: os.getxattr(path, k) for k in os.listxattr(path) if k.startswith("system.posix_acl")}

    assert acls(out / "d" / "plain") == acls(tree / "d" / "plain") == {}
    assert acls(out / "d")["system.posix_acl_default"] == acls(tree / "d")["system.posix_acl_default"]
