"""The archive index cache is an optimisation, never a failure (issue 14): as an
ordinary user whose cache directory cannot be written or read, `inspect` and
`cat` of a .gz snapshot answer as with a working cache, with one warning that
says how to fix it (XDG_CACHE_HOME), and never "internal error"."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from common_support import FIXTURES
from unprivileged_support import IS_ROOT, NOBODY, python_for_user, setpriv_prefix


@pytest.fixture(scope="module")
def setup():
    prefix = setpriv_prefix()
    base = Path(tempfile.mkdtemp(prefix="rescue-cache-"))   # not pytest's tmp: root's is 0700
    try:
        os.chmod(base, 0o755)
        snap = base / "ext2.img.gz"
        with open(FIXTURES / "fs" / "ext2.img", "rb") as fi, gzip.open(snap, "wb", compresslevel=1) as fo:
            shutil.copyfileobj(fi, fo)
        os.chmod(snap, 0o444)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "COLUMNS": "200",
               "NO_COLOR": "1", "PYTHONDONTWRITEBYTECODE": "1", "HOME": str(base)}
        python, pythonpath = python_for_user(prefix, env)
        env["PYTHONPATH"] = pythonpath
        yield base, snap, prefix, python, env
    finally:
        subprocess.run(["chmod", "-R", "u+rwX", str(base)], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def _run(setup, cache: Path, *args: str) -> subprocess.CompletedProcess:
    base, snap, prefix, python, env = setup
    return subprocess.run([*prefix, python, "-m", "rescue", *args, str(snap)], capture_output=True, timeout=120,
                          env={**env, "XDG_CACHE_HOME": str(cache)}, cwd=base)


def _usable_cache(base: Path) -> Path:
    cache = base / "good-cache"
    cache.mkdir(exist_ok=True)
    if IS_ROOT:
        os.chown(cache, NOBODY, NOBODY)
    return cache


@pytest.mark.parametrize("how", ["unwritable", "unreadable"])
def test_an_unusable_cache_is_bypassed_with_one_warning(setup, how):
    base = setup[0]
    if not IS_ROOT and how == "unreadable":
        pytest.skip("needs root to make a cache directory another user owns")
    want = _run(setup, _usable_cache(base), "inspect", "--json")
    assert want.returncode == 0, want.stderr.decode()
    bad = base / f"{how}-cache"
    entry = bad / "rescue" / "archives"
    entry.mkdir(parents=True, exist_ok=True)
    if how == "unwritable":
        os.chmod(bad, 0o555)
        for d in (bad / "rescue", entry):
            os.chmod(d, 0o555)
    else:   # root's 0700 directory where the user's entries would be
        os.chmod(entry, 0o700)
    for _ in range(2):   # each run: the same answer and one warning, never a failure
        got = _run(setup, bad, "inspect", "--json")
        text = got.stderr.decode()
        assert got.returncode == 0, text
        assert got.stdout == want.stdout
        lines = [line for line in text.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("warning: the index cache"), text
        assert "XDG_CACHE_HOME" in lines[0] and "internal error" not in text
    cat = _run(setup, bad, "ls")
    assert cat.returncode == 0 and b"internal error" not in cat.stderr


def test_a_usable_cache_gives_no_warning(setup):
    cache = _usable_cache(setup[0])
    for _ in range(2):
        got = _run(setup, cache, "inspect")
        assert got.returncode == 0 and b"warning" not in got.stderr, got.stderr.decode()
    assert any(p.is_file() for p in cache.rglob("*")), "the index should be cached"
