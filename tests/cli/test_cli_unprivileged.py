"""`rescue` as an ordinary user (DESIGN.md: "runs as an ordinary user").

CI and the test machine run as root, where every permission check passes. Here,
as root, the real CLI runs as `nobody` (setpriv, no supplementary groups, a
fresh HOME and XDG_CACHE_HOME of its own) on copies of the committed fixtures
that it may read but not write. Each result is compared with the same command
run as root: equal where the running user must not matter (inspect, ls, cat,
tar output, convert, an HTTP source), different where it must (a directory
target: files owned by the user, setuid/setgid dropped, device nodes skipped
with a warning). Every run checks that the snapshot is unchanged (hash, mtime)
and that nothing was written outside the target and the cache directory. The
non-root branches of the foundation tests run as `nobody` too.

Not root: the same commands run as the current user (the root comparisons
then compare two runs as that user).
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import stat
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from unprivileged_support import IS_ROOT, python_for_user, setpriv_prefix, user_ids
from common_support import (FIXTURES, REPO, SAMPLE, T, assert_one_line_error, dir_view, explain,
                                sha256_file, tar_view)

def _inventory(root: Path, skip: list[Path]) -> dict[str, tuple]:
    """Every entry under `root` except those under `skip`: what a write would change.
    (Creating a target changes its parent directories' mtimes: those are left out.)"""
    out = {}
    skip_s = [str(s).rstrip("/") for s in skip]
    parents = {str(p) for s in skip for p in Path(s).parents}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in skip_s]
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if p in skip_s:
                continue
            st = os.lstat(p)
            is_dir = stat.S_ISDIR(st.st_mode)
            out[os.path.relpath(p, root)] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid,
                                              0 if is_dir else st.st_size, 0 if p in parents else st.st_mtime_ns)
    return out


@dataclass
class World:
    base: Path                  # everything of this module lives below
    snaps: Path                 # the snapshot copies: readable, not writable by the user
    home: Path                  # the user's HOME (its cache in home/.cache)
    ref: Path                   # root's outputs
    prefix: list[str]
    python: str
    env: dict[str, str]
    ids: tuple[int, int]
    seals: dict[Path, tuple[str, int]] = field(default_factory=dict)

    @property
    def cache(self) -> Path:
        return self.home / ".cache"

    def _env(self, home: Path) -> dict[str, str]:
        return {**self.env, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), "TMPDIR": str(home / "tmp")}

    def _run(self, prefix: list[str], home: Path, args: list[str], target: Path | None,
             timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        before = _inventory(self.base, [p for p in (target, home / ".cache") if p is not None])
        res = subprocess.run([*prefix, self.python, "-m", "rescue", *map(str, args)], capture_output=True,
                             env={**self._env(home), **(env or {})}, cwd=home, timeout=timeout)
        for snap, seal in self.seals.items():
            assert (sha256_file(snap), snap.stat().st_mtime_ns) == seal, f"{snap} changed: rescue {args}"
        after = _inventory(self.base, [p for p in (target, home / ".cache") if p is not None])
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        assert not changed, f"rescue {' '.join(map(str, args))} wrote outside its target: {changed}"
        return res

    def user(self, *args, target: Path | None = None, timeout: float = 120,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """The CLI as the unprivileged user; `target` is the one place it may write."""
        return self._run(self.prefix, self.home, list(args), target, timeout, env)

    def root(self, *args, target: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        """The same command as the test's own user (root in CI), for reference."""
        return self._run([], self.ref, list(args), target, timeout)


def _gunzip(src: Path, dst: Path) -> Path:
    with gzip.open(src) as fi, open(dst, "wb") as fo:
        shutil.copyfileobj(fi, fo, 1 << 20)
    return dst


def _read_only_dirs_image(path: Path, tree: Path) -> Path | None:
    """An ext4 image holding directories without write permission (0555, 0500) and
    a file without any (0000): normal in real images (/usr/lib/... trees, state dirs).
    The modes are set with debugfs: mkfs.ext4 -d could not read a 0000 file as a user."""
    if not (shutil.which("mkfs.ext4") and shutil.which("debugfs")):
        return None
    (tree / "ro" / "sub").mkdir(parents=True)
    (tree / "ro" / "a.txt").write_bytes(b"in a read-only dir\n")
    (tree / "ro" / "sub" / "b.txt").write_bytes(b"one level deeper\n")
    (tree / "locked").mkdir()
    (tree / "locked" / "secret").write_bytes(b"mode 0000\n")
    with open(path, "wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(path)], check=True, capture_output=True)
    modes = {"/ro/sub": 0o40555, "/ro": 0o40555, "/locked": 0o40500, "/locked/secret": 0o100000}
    script = "".join(f"sif {p} mode 0{m:o}\n" for p, m in modes.items())
    subprocess.run(["debugfs", "-w", "-f", "-", str(path)], input=script.encode(), check=True, capture_output=True)
    return path


@pytest.fixture(scope="module")
def world():
    prefix = setpriv_prefix()
    uid, gid = user_ids()
    base = Path(tempfile.mkdtemp(prefix="rescue-unpriv-"))   # not pytest's tmp: root's is 0700
    try:
        os.chmod(base, 0o755)
        snaps, home, ref = base / "snapshots", base / "home", base / "ref"
        for d in (snaps, home / "tmp", ref / "tmp"):
            d.mkdir(parents=True)
        if IS_ROOT:
            for d in (home, home / "tmp"):
                os.chown(d, uid, gid)
        shutil.copy2(SAMPLE, snaps / "sample-vps.disk")
        _gunzip(FIXTURES / "disk" / "v3.qcow2.gz", snaps / "v3.qcow2")
        _gunzip(FIXTURES / "vdisk" / "vmdk_stream.vmdk.gz", snaps / "stream.vmdk")
        with open(SAMPLE, "rb") as fi, gzip.open(snaps / "sample-vps.disk.gz", "wb", compresslevel=1) as fo:
            shutil.copyfileobj(fi, fo, 1 << 20)
        _read_only_dirs_image(snaps / "readonly-dirs.img", base / "ro-tree")
        shutil.rmtree(base / "ro-tree", ignore_errors=True)
        for p in snaps.iterdir():
            os.chmod(p, 0o444)
        os.chmod(snaps, 0o555)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "COLUMNS": "200",
               "NO_COLOR": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        python, pythonpath = python_for_user(prefix, {**env, "HOME": str(home)})
        env["PYTHONPATH"] = pythonpath
        w = World(base, snaps, home, ref, prefix, python, env, (uid, gid))
        if IS_ROOT:   # the premise: nobody reads the snapshots and cannot write them
            probe = subprocess.run([*prefix, "sh", "-c", 'test -r "$1" && ! test -w "$1" && ! test -w "$2"', "-",
                                    str(snaps / "sample-vps.disk"), str(snaps)])
            assert probe.returncode == 0, "the snapshot copy must be readable, not writable, by nobody"
        w.seals = {p: (sha256_file(p), p.stat().st_mtime_ns) for p in snaps.iterdir()}
        yield w
    finally:
        if IS_ROOT:
            os.chmod(base / "snapshots", 0o755)
        subprocess.run(["chmod", "-R", "u+rwX", str(base)], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def _ok(res: subprocess.CompletedProcess, code: int = 0) -> subprocess.CompletedProcess:
    assert res.returncode == code, explain(res)
    assert b"Traceback" not in res.stderr, explain(res)
    return res


# ------------------------------------------------------------------ reading: same answers
@pytest.mark.parametrize("args", [
    ["inspect", "--json", "{snap}"],
    ["inspect", "{snap}"],
    ["ls", "-l", "{snap}", T.V],
    ["ls", "--json", "{snap}", T.UP],
    ["cat", "{snap}", "/etc/fstab"],
    ["cat", "{snap}", f"{T.PG}/pg_wal/000000010000000000000001"],
], ids=["inspect-json", "inspect", "ls-l", "ls-json", "cat-fstab", "cat-big"])
def test_reading_commands_answer_the_same_for_a_user(world, args):
    argv = [a.format(snap=world.snaps / "sample-vps.disk") for a in args]
    mine, roots = _ok(world.user(*argv)), _ok(world.root(*argv))
    assert mine.stdout == roots.stdout
    if args[0] == "cat" and "fstab" in args[-1]:
        assert mine.stdout == T.FSTAB


def test_archive_snapshot_keeps_its_seek_index_in_the_users_cache(world):
    snap = world.snaps / "sample-vps.disk.gz"
    mine = _ok(world.user("cat", snap, "/etc/fstab"))
    assert mine.stdout == T.FSTAB
    cached = [p for p in world.cache.rglob("*") if p.is_file()]
    assert cached, "the .gz seek index should land in XDG_CACHE_HOME"
    assert all(p.stat().st_uid == world.ids[0] for p in cached)
    again = _ok(world.user("ls", snap, "/etc"))          # served from the index now
    assert b"fstab" in again.stdout
    # a service account's HOME may not exist: no cache then, the same answer
    homeless = _ok(world.user("cat", snap, "/etc/fstab", env={"HOME": "/nonexistent", "XDG_CACHE_HOME": ""}))
    assert homeless.stdout == T.FSTAB


def test_http_source_reads_the_same_for_a_user(world):
    from http_test_server import Server
    server = Server()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        url = server.serve("sample-vps.disk", world.snaps / "sample-vps.disk")
        mine = _ok(world.user("cat", url, "/etc/fstab"))
        roots = _ok(world.root("cat", url, "/etc/fstab"))
        assert mine.stdout == roots.stdout == T.FSTAB
        assert any(e.status == 206 for e in server.log), "read by ranges, not downloaded whole"
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------ tar: the running user does not matter
def _tar_pair(world, name: str, *extra: str) -> tuple[Path, Path, subprocess.CompletedProcess]:
    mine, roots = world.home / name, world.ref / name
    snap = world.snaps / "sample-vps.disk"
    res = _ok(world.user("extract", snap, "--path", "/", *extra, "-o", mine, target=mine))
    _ok(world.root("extract", snap, "--path", "/", *extra, "-o", roots, target=roots))
    return mine, roots, res


def test_tar_written_by_a_user_equals_roots(world):
    mine, roots, _ = _tar_pair(world, "all.tar")
    got, want = tar_view(mine), tar_view(roots)
    assert got.recs == want.recs          # names, kinds, modes (setuid too), uid/gid, mtimes, sizes, sha256
    assert got.names == want.names and got.links == want.links
    kinds = {r.kind for r in got.recs.values()}
    assert {"char", "block"} & kinds, "device nodes are kept in a tar whoever runs rescue"
    assert any(r.mode & 0o6000 for r in got.recs.values()), "so are setuid bits"
    assert any((r.uid, r.gid) != world.ids for r in got.recs.values()), "and the image's owners"
    assert mine.read_bytes() == roots.read_bytes(), "the archive does not depend on who wrote it"
    st = mine.stat()
    assert (st.st_uid, st.st_gid) == world.ids
    assert stat.S_IMODE(st.st_mode) & 0o7133 == 0, oct(st.st_mode)   # no x, no setuid, not group/world-writable


def test_compressed_tar_written_by_a_user_equals_roots(world):
    import zstandard
    mine, roots, _ = _tar_pair(world, "all.tar.zst", "--exclude", "*.log")
    plain = [zstandard.ZstdDecompressor().stream_reader(open(p, "rb")).read() for p in (mine, roots)]
    assert plain[0] == plain[1]
    assert not [n for n in tar_view(plain[0]).recs if n.endswith(".log")]


def test_tar_on_stdout_as_a_user(world):
    res = _ok(world.user("extract", world.snaps / "sample-vps.disk", "--path", T.V, "-o", "-"))
    want = tar_view(world.ref / "all.tar") if (world.ref / "all.tar").exists() else None
    got = tar_view(res.stdout)
    assert got.recs and all(n.startswith(T.V.lstrip("/")) for n in got.recs)
    if want is not None:
        assert got.recs == {n: r for n, r in want.recs.items() if n in got.recs}


# ------------------------------------------------------------------ directory: what only root may keep
def _dir_pair(world, name: str, *extra: str):
    mine, roots = world.home / name, world.ref / name
    snap = world.snaps / "sample-vps.disk"
    m = world.user("extract", snap, "--path", "/", *extra, "-o", f"{mine}/", target=mine)
    r = world.root("extract", snap, "--path", "/", *extra, "-o", f"{roots}/", target=roots)
    return mine, roots, m, r


def test_directory_target_as_a_user_keeps_content_and_drops_what_needs_root(world):
    mine, roots, m, r = _dir_pair(world, "restore")
    assert m.returncode == r.returncode and m.returncode in (0, 1), explain(m)
    assert b"Traceback" not in m.stderr
    err = m.stderr.decode().lower()
    assert "device" in err, "skipped device nodes must be reported"
    assert "setuid" in err, "dropped setuid/setgid bits must be reported"
    got, ref = dir_view(mine), dir_view(roots)
    described = tar_view(world.ref / "all.tar") if (world.ref / "all.tar").exists() else None
    assert set(got.recs) == set(ref.recs)
    assert not [p for p, rec in got.recs.items() if rec.kind in ("char", "block")]
    assert {(rec.uid, rec.gid) for rec in got.recs.values()} == {world.ids}, "everything belongs to the user"
    bad = []
    for p, g in got.recs.items():
        w = ref.recs[p]
        if (g.kind, g.size, g.sha, g.target, g.mtime_ns if g.kind != "symlink" else 0) != \
                (w.kind, w.size, w.sha, w.target, w.mtime_ns if w.kind != "symlink" else 0):
            bad.append(f"{p}: {g} != {w}")
        if g.kind != "symlink" and g.mode != w.mode:       # root drops setuid too (no --keep-setuid)
            bad.append(f"{p}: mode {oct(g.mode)} != {oct(w.mode)}")
        if g.mode & 0o6000 and g.kind != "dir":
            bad.append(f"{p}: setuid/setgid kept ({oct(g.mode)})")
        user_x = {k: v for k, v in w.xattrs.items() if k.startswith("user.")}
        if g.xattrs != user_x:
            bad.append(f"{p}: xattrs {g.xattrs} != {user_x}")
        if described is not None and p in described.recs:
            d = described.recs[p]
            if g.kind == "file" and (g.sha, d.mode & ~0o6000) != (d.sha, g.mode):
                bad.append(f"{p}: differs from the tar member ({oct(g.mode)} vs {oct(d.mode)})")
    assert not bad, "\n".join(bad)
    assert sorted(map(sorted, got.links)) == sorted(map(sorted, ref.links))
    if IS_ROOT:   # the reference really is the privileged run
        assert any((rec.uid, rec.gid) != (0, 0) for rec in ref.recs.values())
        assert any((rec.uid, rec.gid) != world.ids for rec in ref.recs.values())
    assert stat.S_IMODE(os.stat(mine / "var/lib/docker/volumes").st_mode) == 0o701   # the image's mode, as is


def test_keep_setuid_as_a_user_keeps_the_bits_on_the_users_own_files(world):
    mine = world.home / "keep"
    res = _ok(world.user("extract", world.snaps / "sample-vps.disk", "--path", "/usr/local/bin", "--keep-setuid",
                         "-o", f"{mine}/", target=mine))
    st = os.lstat(mine / "usr/local/bin/suidtool")
    assert st.st_mode & 0o4000 and (st.st_uid, st.st_gid) == world.ids, oct(st.st_mode)
    assert b"setuid" not in res.stderr.lower()


def test_read_only_directories_in_the_image_still_fill_for_a_user(world):
    snap = world.snaps / "readonly-dirs.img"
    if not snap.exists():
        pytest.skip("mkfs.ext4/debugfs (e2fsprogs) not installed")
    mine = world.home / "ro"
    for _ in range(2):    # twice: a rerun must replace files in the directories it left read-only
        _ok(world.user("extract", snap, "-o", f"{mine}/", target=mine))
        assert (mine / "ro" / "a.txt").read_bytes() == b"in a read-only dir\n"
        assert (mine / "ro" / "sub" / "b.txt").read_bytes() == b"one level deeper\n"
        modes = {p: stat.S_IMODE(os.lstat(mine / p).st_mode) for p in ("ro", "ro/sub", "locked", "locked/secret")}
        assert modes == {"ro": 0o555, "ro/sub": 0o555, "locked": 0o500, "locked/secret": 0}
    os.chmod(mine / "locked" / "secret", 0o400)
    assert (mine / "locked" / "secret").read_bytes() == b"mode 0000\n"


# ------------------------------------------------------------------ convert: byte-identical, sparse
def _data_segments(path: Path) -> list[tuple[int, int]]:
    """Where the file has data (SEEK_DATA/SEEK_HOLE), as (start, end) pairs."""
    out, pos = [], 0
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        while pos < size:
            try:
                start = os.lseek(f.fileno(), pos, os.SEEK_DATA)
            except OSError:      # ENXIO: only a hole is left
                break
            pos = os.lseek(f.fileno(), start, os.SEEK_HOLE)
            out.append((start, pos))
    return out


@pytest.mark.parametrize("name", ["v3.qcow2", "stream.vmdk"])
def test_convert_as_a_user_equals_roots(world, name):
    mine, roots = world.home / f"{name}.raw", world.ref / f"{name}.raw"
    _ok(world.user("convert", world.snaps / name, "-o", mine, target=mine))
    _ok(world.root("convert", world.snaps / name, "-o", roots, target=roots))
    assert sha256_file(mine) == sha256_file(roots)
    st, rst = mine.stat(), roots.stat()
    assert (st.st_uid, st.st_gid) == world.ids and st.st_size == rst.st_size
    assert _data_segments(mine) == _data_segments(roots), "holes stay holes for a user too"
    assert st.st_blocks * 512 < st.st_size
    assert stat.S_IMODE(st.st_mode) & 0o7133 == 0, oct(st.st_mode)


# ------------------------------------------------------------------ errors: one line, exit 2, nothing left
@pytest.mark.parametrize("how", ["dir", "tar", "convert"])
def test_target_the_user_may_not_write_is_one_line_error(world, how):
    blocked = world.snaps      # 0555 (root's, or as a user the user's own): not writable for the user
    target = blocked / {"dir": "out", "tar": "out.tar", "convert": "out.raw"}[how]
    snap = world.snaps / ("v3.qcow2" if how == "convert" else "sample-vps.disk")
    args = (["convert", snap, "-o", target] if how == "convert" else
            ["extract", snap, "--path", "/etc", "-o", f"{target}/" if how == "dir" else target])
    res = world.user(*args)
    assert_one_line_error(res)
    assert str(target).encode() in res.stderr
    assert not list(blocked.glob("out*")), "nothing is left behind"


def test_existing_output_owned_by_someone_else_is_not_clobbered(world):
    if not IS_ROOT:
        pytest.skip("needs a file of another user: run as root (CI does)")
    theirs = world.home / "theirs.tar"
    theirs.write_bytes(b"root's file")
    os.chmod(theirs, 0o644)          # root's, in the user's own directory
    res = world.user("extract", world.snaps / "sample-vps.disk", "--path", "/etc", "-o", theirs, target=theirs)
    assert_one_line_error(res)        # exists: --force needed
    assert theirs.read_bytes() == b"root's file"


# ------------------------------------------------------------------ the foundation tests' non-root branches
_H = "tests/system/test_system_hostile_images.py::test_"
_C = "tests/cli/test_cli_commands.py::test_"
_D = "tests/system/test_system_differential.py::test_directory_matches_the_tree_the_fixture_was_built_from"
FOUNDATION_SUBSET = [   # the tests with an `if not IS_ROOT` branch or a directory target (~20 s)
    _H + "crafted_names_and_links_never_escape_a_directory_target",
    _H + "symlinks_are_created_as_symlinks_and_never_followed",
    _H + "device_nodes_need_root_and_devices_flag",
    _H + "setuid_is_dropped_in_a_directory_but_kept_in_a_tar",
    _H + "absurd_size_and_blocks_past_the_end_are_skipped_and_the_rest_rescued[dir]",
    _C + "directory_target_skips_device_nodes_and_setuid_by_default",
    _C + "strip_components_into_a_directory",
    _C + "dry_run_into_a_directory_creates_nothing",
    _D + "[sample-root]",
    _D + "[mbr.img-p1]",
    "tests/extract/test_extract_sinks.py",
]


def test_foundation_tests_pass_as_a_user(world):
    """Their `if not IS_ROOT` branches (owners, devices, xattrs, setuid, skips) only
    run this way; as root, this is where they are proved."""
    if not IS_ROOT:
        pytest.skip("already running as a normal user: the foundation tests run here directly")
    basetemp = world.home / "pytest"
    res = subprocess.run([*world.prefix, world.python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          f"--basetemp={basetemp}", "-x", *FOUNDATION_SUBSET], capture_output=True, text=True,
                         env=world._env(world.home), cwd=REPO, timeout=300)
    tail = (res.stdout + res.stderr)[-4000:]
    assert res.returncode == 0, tail
    passed = re.search(r"(\d+) passed", tail)
    assert passed and int(passed.group(1)) >= len(FOUNDATION_SUBSET) and "skipped" not in tail, tail
