"""A server-files archive cut short (an interrupted download of a tar of a
server tree, read as a filesystem by fs/tartree.py) with --partial: one line
says how many directories are incomplete and where the cut is, --json and the
manifest list each one, and nothing missing goes unnamed. GNU tar writes a
directory and then its whole subtree, so only the directories the archive was
inside at the cut are incomplete; an archive in another order makes every
directory suspect (still one line)."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from common_support import explain, rescue

pytestmark = pytest.mark.skipif(not shutil.which("tar"), reason="needs GNU tar")
LINE = "directory only partly readable"


def _tree(base: Path) -> tuple[Path, dict[str, bytes]]:
    """/etc/os-release (the server marker) and 60 directories three deep, each with a 16 KiB random file."""
    rng = random.Random(14)
    root = base / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/os-release").write_bytes(b"ID=debian\n")
    files = {"etc/os-release": b"ID=debian\n"}
    for a in range(4):
        for b in range(15):
            d = f"srv/a{a}/b{b:02}"
            (root / d).mkdir(parents=True)
            files[f"{d}/data"] = rng.randbytes(16384)
            (root / d / "data").write_bytes(files[f"{d}/data"])
    return root, files


def _dirs(files: dict[str, bytes]) -> set[str]:
    return {"/" + "/".join(n.split("/")[:i]) for n in files for i in range(1, n.count("/") + 1)} | {"/"}


def _extract(cut: Path, out: Path, tmp: Path) -> tuple[subprocess.CompletedProcess, dict, list[dict]]:
    man = tmp / "manifest.jsonl"
    res = rescue("extract", "--partial", str(cut), "-o", f"{out}/", "--manifest", str(man), timeout=120)
    data = json.loads(rescue("extract", "--partial", "--json", str(cut), "-o", f"{tmp / 'j'}/",
                             timeout=120).stdout)
    return res, data, [json.loads(line) for line in man.read_text().splitlines()]


def _check_nothing_lost_unnamed(files: dict[str, bytes], out: Path, data: dict) -> set[str]:
    """Every file is there whole, or named as skipped, or lies in a directory named incomplete."""
    incomplete = {s["path"] for s in data["skipped"] if s["reason"].startswith(LINE)}
    named = {s["path"] for s in data["skipped"]}
    kept = 0
    for name, content in files.items():
        got = out / name
        if got.exists():
            assert got.read_bytes() == content, name
            kept += 1
            continue
        parents = {"/" + "/".join(name.split("/")[:i]) for i in range(0, name.count("/") + 1)} | {"/"}
        parents = {p if p == "/" else p.rstrip("/") for p in parents}
        assert "/" + name in named or parents & incomplete, name
    assert 0 < kept < len(files)
    return incomplete


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.8])
def test_cut_in_tar_order_names_the_open_directories_on_one_line(tmp_path, fraction, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root, files = _tree(tmp_path)
    whole = tmp_path / "backup.tar.gz"
    subprocess.run(["tar", "czf", str(whole), "-C", str(root), "."], check=True)
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(whole.read_bytes()[:int(whole.stat().st_size * fraction)])
    out = tmp_path / "out"
    res, data, manifest = _extract(cut, out, tmp_path)
    assert res.returncode == 1, explain(res)
    lines = [line for line in res.stderr.decode().splitlines() if LINE in line]
    assert len(lines) == 1 and "inside /srv/a" in lines[0] and "cut short" in lines[0] or \
        "damaged after member" in lines[0], explain(res)
    incomplete = _check_nothing_lost_unnamed(files, out, data)
    # tar's order: the cut leaves only the chain of directories it was inside (root to /srv/aN/bNN)
    assert incomplete <= _dirs(files) and 2 <= len(incomplete) <= 4, incomplete
    chain = sorted(incomplete, key=len)
    assert all(b.startswith(a.rstrip("/") + "/") for a, b in zip(chain, chain[1:])), chain
    assert f"{len(incomplete)} directories (" in lines[0], lines[0]
    listed = {r["path"] for r in manifest if str(r.get("skipped", "")).startswith(LINE)}
    assert listed == {p.lstrip("/") or p for p in incomplete}, (listed, incomplete)


def test_cut_out_of_tar_order_makes_every_directory_suspect_but_says_it_once(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root, files = _tree(tmp_path)
    # members listed file by file, interleaving the directories (as some backup tools write them)
    names = ["./etc", "./etc/os-release"] + sorted((f"./{n}" for n in files if n.startswith("srv/")),
                                                   key=lambda n: (n.split("/")[3], n.split("/")[2]))
    whole = tmp_path / "mixed.tar.gz"
    subprocess.run(["tar", "czf", str(whole), "--no-recursion", "-C", str(root), *names], check=True)
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(whole.read_bytes()[:whole.stat().st_size // 2])
    out = tmp_path / "out"
    res, data, _ = _extract(cut, out, tmp_path)
    assert res.returncode == 1, explain(res)
    lines = [line for line in res.stderr.decode().splitlines() if LINE in line]
    assert len(lines) == 1 and "any directory may miss files" in lines[0], explain(res)
    incomplete = _check_nothing_lost_unnamed(files, out, data)
    written_dirs = {"/" + "/".join(n.split("/")[:i]) for n in files if (out / n).exists()
                    for i in range(1, n.count("/") + 1)} | {"/"}
    assert written_dirs <= incomplete and f"{len(incomplete)} directories (" in lines[0], lines[0]
