"""Real filesystem images from other projects (../shared/real-images, see its
INDEX.tsv): every normal ext/FAT/NTFS image opens and extracts completely (and,
as root, agrees with the kernel's read-only mount or mtools on names, sizes and
content hashes); every malformed or unusual image ends with exit 0, 1 or 2, one
clear message, no traceback and no hang. Skipped when the folder is absent.

Images are decompressed into sparse files; commands run two at a time with
`--backend native` (the registry's readers: ext, XFS, btrfs, then TSK; never the
libguestfs appliance, whose boot alone would eat the time limit).
The malformed sweep has a time budget (SWEEP_BUDGET, default 60 s; set
RESCUE_SWEEP_BUDGET=0 for no limit): known offenders go first, then the rest
round-robin across source projects; what the budget left out is printed.
All offenders are reported together."""

from __future__ import annotations

import bz2
import concurrent.futures as cf
import gzip
import json
import lzma
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from common_support import (CAPS, IS_ROOT, REAL_IMAGES, REPO, can_mount, compare, dir_view, mounted)

pytestmark = pytest.mark.skipif(not (REAL_IMAGES / "INDEX.tsv").exists(),
                                reason=f"{REAL_IMAGES} is absent (clone outside the workspace)")

FS_FOLDERS = ("e2fsprogs/", "btrfs-progs/", "dosfstools/", "dissect.extfs/", "dissect.ntfs/", "dfvfs/",
              "sleuthkit/")
# Raw (or compressed raw) filesystem/disk images only: containers (qcow2, VMDK, VHD) and
# split/tar sets belong to the disk layer's tests.
NOT_RAW = (".qcow2", ".qcow", ".vhd", ".vmdk", ".tar.bz2", ".splitraw.000", ".splitraw.001", ".json")
# The normal images this slice must read completely (ext, FAT, NTFS).
MUST_READ = ("dissect.extfs/", "dissect.ntfs/", "dosfstools/", "dfvfs/ext2.raw.gz", "dfvfs/image.dd",
             "dfvfs/mbr.raw", "sleuthkit/img_image.dd")
TIMEOUT = 30          # per command in the sweep: these images are a few MiB of metadata
NORMAL_TIMEOUT = 120  # per command for the normal images (ntfs.bin: 2051 directories, ~20 s today)
# Normal images The Sleuth Kit itself cannot open: they must fail with one clear line.
KNOWN_TSK_LIMITS = {
    "dosfstools/mkfs-fat32_1_bad_block.img.xz": "TSK 4.12: 'Cannot determine file system type' (FAT32, 1 bad block)",
}
SWEEP_BUDGET = float(os.environ.get("RESCUE_SWEEP_BUDGET", "60")) or float("inf")
# Checked first so a budget cut never hides them (offenders reported in bugs-for-lead).
FIRST = ("e2fsprogs/f_many_subdirs.gz", "e2fsprogs/f_bad_inode_csum.gz", "e2fsprogs/f_bad_encryption.gz",
         "e2fsprogs/f_h_badnode.gz", "dosfstools/check-huge.broken.img.xz")
NAMES_SIZES_HASHES = replace(CAPS["ext"], owners=False, modes=False, mtime_tol_ns=1 << 62, dir_mtime=False,
                             xattrs=False, specials=False)


def _rows() -> list[tuple[str, str, str]]:
    if not (REAL_IMAGES / "INDEX.tsv").exists():
        return []
    rows = []
    for line in (REAL_IMAGES / "INDEX.tsv").read_text().splitlines()[1:]:
        f = line.split("\t")
        if len(f) >= 2 and f[0].startswith(FS_FOLDERS) and not f[0].endswith(NOT_RAW) and f[1] != "n/a":
            rows.append((f[0], f[1], f[-1]))
    return rows


def _sweep_order(rows):
    """Known offenders first, then one image per project in turn (a budget cut still
    samples every project)."""
    first = [r for name in FIRST for r in rows if r[0] == name]
    by_folder: dict[str, list] = {}
    for r in rows:
        if r not in first:
            by_folder.setdefault(r[0].split("/")[0], []).append(r)
    rest = []
    while any(by_folder.values()):
        for folder in sorted(by_folder):
            if by_folder[folder]:
                rest.append(by_folder[folder].pop(0))
    return first + rest


ROWS = _rows()
NORMAL = [r for r in ROWS if r[1] == "no" and r[0].startswith(MUST_READ)]
OTHERS = _sweep_order([r for r in ROWS if r not in NORMAL])


def _decompress(name: str, dest_dir: Path) -> Path:
    """The image as a raw sparse file (runs of zeros become holes)."""
    src = REAL_IMAGES / name
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(src.suffix)
    if opener is None:
        return src
    dst = dest_dir / name.replace("/", "__")[: -len(src.suffix)]
    if dst.exists():
        return dst
    zero = bytes(1 << 20)
    with opener(src, "rb") as fi, open(str(dst) + ".part", "wb") as fo:
        while chunk := fi.read(1 << 20):
            if chunk == zero[:len(chunk)]:
                fo.seek(len(chunk), os.SEEK_CUR)
            else:
                fo.write(chunk)
        fo.truncate()
    os.rename(str(dst) + ".part", dst)
    return dst


def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))          # bounded memory
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 20, 256 << 20))   # bounded output (shared /tmp)


def _run(*args: str, timeout: float = TIMEOUT) -> tuple[int, str, bytes, float]:
    t0 = time.monotonic()
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1", PYTHONPATH=str(REPO))
    try:
        res = subprocess.run([sys.executable, "-m", "rescue", *args, "--backend", "native"], capture_output=True,
                             timeout=timeout, preexec_fn=_limits, env=env)
    except subprocess.TimeoutExpired:
        return -999, f"no answer after {timeout} s", b"", timeout
    return res.returncode, res.stderr.decode(errors="replace"), res.stdout, time.monotonic() - t0


def _crash(code: int, err: str) -> str | None:
    if code == -999:
        return err
    if code not in (0, 1, 2):
        return f"exit {code}"
    if "Traceback" in err:
        return "traceback: " + err.strip().splitlines()[-1][:200]
    if "internal error" in err:
        return "internal error: " + err.strip().splitlines()[-1][:200]
    return None


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("real-images")
    yield path
    shutil.rmtree(path, ignore_errors=True)     # GiB-sized sparse images: do not keep them


def _pool_map(fn, items):
    with cf.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return list(pool.map(fn, items))


def _reference_view(image: Path, fstype: str, offset: int, size: int, work: Path):
    """The kernel's (or mtools') view of one volume, or None when there is none here."""
    if fstype == "vfat" and shutil.which("mcopy"):   # no vfat in many kernels: mtools reads FAT
        ref = work / "mtools"
        ref.mkdir()
        res = subprocess.run(["mcopy", "-s", "-m", "-n", "-i", f"{image}@@{offset}", "::/*", f"{ref}/"],
                             capture_output=True, env=dict(os.environ, TZ="UTC"))
        return dir_view(ref, xattrs=False) if res.returncode == 0 else None
    if can_mount(fstype):
        return None
    mnt = work / "mnt"
    try:
        with mounted(image, fstype, mnt, offset, size):
            return dir_view(mnt, xattrs=False)
    except pytest.skip.Exception:
        return None


def _drop_reparse_points(got, ref) -> None:
    """ntfs-3g shows reparse points it has no plugin for (OneDrive cloud folders) as
    symlinks; TSK reads the directory behind them. Compare neither subtree."""
    for path, rec in list(ref.recs.items()):
        if rec.kind == "symlink" and path in got.recs and got.recs[path].kind == "dir":
            for view in (got, ref):
                for p in [p for p in view.recs if p == path or p.startswith(path + "/")]:
                    del view.recs[p]


def test_normal_ext_fat_ntfs_images_open_extract_and_match_the_kernel(unpacked):
    assert NORMAL, "INDEX.tsv lists no normal ext/FAT/NTFS images"

    def check(row) -> list[str]:
        name = row[0]
        image = _decompress(name, unpacked)
        work = unpacked / ("w-" + name.replace("/", "__"))
        work.mkdir(exist_ok=True)
        if name in KNOWN_TSK_LIMITS:
            code, err, _, _ = _run("extract", str(image), "--path", "/", "-o", f"{work}/x/", timeout=NORMAL_TIMEOUT)
            lines = [line for line in err.splitlines() if line.strip()]
            if code == 0:
                return []       # the limit is gone: fine
            return [] if code == 2 and len(lines) == 1 else [f"{name}: known TSK limit, but exit {code}: {err[-300:]}"]
        code, err, out, _ = _run("inspect", "--json", str(image), timeout=NORMAL_TIMEOUT)
        if code != 0:
            return [f"{name}: inspect exit {code}: {err.strip()[-300:]}"]
        volumes = [v for v in json.loads(out)["volumes"] if v.get("filesystem")]
        if not volumes:
            return [f"{name}: inspect found no filesystem"]
        problems = []
        for v in volumes:
            target = work / f"vol-{v['id']}"
            code, err, _, _ = _run("extract", str(image), "--volume", v["id"], "--path", "/", "-o", f"{target}/",
                                   timeout=NORMAL_TIMEOUT)
            if code != 0:
                problems.append(f"{name} volume {v['id']}: extract exit {code}: {err.strip()[-300:]}")
                continue
            ref_dir = work / f"ref-{v['id']}"
            ref_dir.mkdir()
            ref = _reference_view(image, v["filesystem"], v["start"], v["size"], ref_dir)
            if ref is None:
                continue
            got = dir_view(target, xattrs=False)
            _drop_reparse_points(got, ref)
            diffs = compare(got, ref, NAMES_SIZES_HASHES, what=f"{name} vol {v['id']}",
                            ignore={"lost+found", "$RECYCLE.BIN", "System Volume Information"}, check_links=False)
            problems += diffs[:10] + ([f"... {len(diffs) - 10} more"] if len(diffs) > 10 else [])
        shutil.rmtree(work, ignore_errors=True)
        return problems

    results = _pool_map(check, NORMAL)
    problems = [p for r in results for p in r]
    print(f"checked {len(NORMAL)} normal images: {', '.join(r[0] for r in NORMAL)}"
          f"{'' if IS_ROOT else ' (not root: no kernel comparison)'}")
    assert not problems, "\n".join(problems)


def test_malformed_and_unusual_images_end_cleanly(unpacked):
    """Every 'yes'/'edge' image (and normal images of filesystems this slice does not
    promise, e.g. btrfs, APFS): exit 0/1/2, no traceback, within the time limit."""
    assert OTHERS

    deadline = time.monotonic() + SWEEP_BUDGET

    def check(row) -> tuple[str, list[str], float] | None:
        name = row[0]
        if time.monotonic() > deadline:
            return None
        image = _decompress(name, unpacked)
        out = unpacked / ("x-" + name.replace("/", "__") + ".tar")
        problems, spent = [], 0.0
        for args in (["inspect", str(image)], ["extract", str(image), "--path", "/", "-o", str(out), "--force"]):
            code, err, _, dt = _run(*args)
            spent += dt
            crash = _crash(code, err)
            if crash:
                problems.append(f"{name} [{row[1]}] {args[0]}: {crash}")
            elif code == 2:
                # One error line; damage reported on the way ("warning: ...") may precede it.
                lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning: ")]
                if len(lines) != 1 or not lines[0].startswith("rescue: "):
                    problems.append(f"{name} [{row[1]}] {args[0]}: exit 2 with {len(lines)} lines on stderr "
                                    "besides warnings")
        if out.exists():
            out.unlink()
        if image.parent == unpacked:
            image.unlink()      # big sparse images: keep the tmp dir small
        return name, problems, spent

    t0 = time.monotonic()
    outcome = _pool_map(check, OTHERS)
    results = [r for r in outcome if r is not None]
    left_out = [row[0] for row, r in zip(OTHERS, outcome) if r is None]
    slow = sorted(results, key=lambda r: -r[2])[:5]
    print(f"swept {len(results)} of {len(OTHERS)} images in {time.monotonic() - t0:.0f} s; slowest: "
          + ", ".join(f"{n} {s:.1f}s" for n, _, s in slow))
    if left_out:
        print(f"time budget ({SWEEP_BUDGET:.0f} s) left out {len(left_out)}: {' '.join(left_out)}")
    problems = [p for _, ps, _ in results for p in ps]
    assert not problems, f"{len(problems)} offenders:\n" + "\n".join(problems)
