"""Shared helpers for the qcow2 and VDI tests: fixtures, the qemu-img
reference, read comparisons, real images from ../shared/real-images."""

from __future__ import annotations

import bz2
import contextlib
import csv
import gzip
import lzma
import os
import random
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures" / "disk"
SCRIPT = ROOT / "scripts" / "make-disk-fixtures"
REAL = ROOT.parent / "shared" / "real-images"
QEMU_IMG = shutil.which("qemu-img")
CAN_BUILD = all(shutil.which(t) for t in ("qemu-img", "qemu-io", "mkfs.ext4", "gzip"))

# Variants that read exactly like base.raw; the others have NAME.expected.raw.
SAME_AS_BASE = ["v2.qcow2", "v3.qcow2", "v2-zlib.qcow2", "zlib.qcow2", "zstd.qcow2",
                "cs512.qcow2", "cs512-zlib.qcow2", "cs4k.qcow2", "extl2.qcow2", "extl2-zlib.qcow2",
                "chain-base.qcow2"]
OWN_EXPECTED = ["zero.qcow2", "chain-top.qcow2", "chain-extl2.qcow2", "chain-top2.qcow2", "snap.qcow2"]
LARGE = ["cs2m.qcow2", "cs2m-zlib.qcow2", "cs2m-zstd.qcow2", "external.qcow2"]   # built at test time only


class Images:
    """The fixture directory: built fresh with --all when the tools exist,
    else unpacked from the committed fixtures/disk/*.gz."""

    def __init__(self, root: Path, built: bool) -> None:
        self.root = root
        self.built = built
        self._refs: dict[tuple[str, str | None], Path] = {}

    def path(self, name: str) -> Path:
        p = self.root / name
        if not p.exists():
            pytest.skip(f"{name} is only built at test time (needs qemu-img, qemu-io, mkfs.ext4)")
        return p

    def reference(self, name: str, snapshot: str | None = None) -> Path:
        """The raw bytes qemu-img reads from `name` (committed copy without qemu-img)."""
        key = (name, snapshot)
        if key in self._refs:
            return self._refs[key]
        src = self.path(name)
        if QEMU_IMG:
            out = self.root / f"{name}.{snapshot or 'active'}.qemu.raw"
            cmd = [QEMU_IMG, "convert", "-O", "raw"]
            if snapshot:
                cmd += ["-l", f"snapshot.name={snapshot}"]
            subprocess.run(cmd + [src.name, str(out)], cwd=src.parent, check=True)
        elif snapshot == "before" or name in SAME_AS_BASE or name.endswith(".vdi"):
            out = self.root / "base.raw"
        else:
            out = self.root / f"{Path(name).stem}.expected.raw"
        self._refs[key] = out
        return out


_IMAGES: list[Images] = []


def make_images(tmp_path_factory) -> Images:
    """Once per session, shared by the qcow2 and VDI test modules."""
    if _IMAGES:
        return _IMAGES[0]
    root = tmp_path_factory.mktemp("qcow-vdi")
    if CAN_BUILD:
        subprocess.run([str(SCRIPT), str(root), "--all"], check=True, capture_output=True)
        images = Images(root, True)
    else:
        for gz in FIXTURES.glob("*.gz"):
            (root / gz.name[:-3]).write_bytes(gzip.decompress(gz.read_bytes()))
        images = Images(root, False)
    _IMAGES.append(images)
    return images


def _file_data_ranges(path: Path, size: int) -> list[tuple[int, int]]:
    """Where a (sparse) reference file has data, by SEEK_DATA/SEEK_HOLE."""
    if not hasattr(os, "SEEK_DATA"):
        return [(0, size)]
    out, pos = [], 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, pos))
    finally:
        os.close(fd)
    return out


def _union(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[list[int]] = []
    for start, end in sorted(a + b):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def assert_reads_equal(disk, ref_path: Path, seed: int, cluster: int = 65536, reads: int = 200) -> None:
    """The whole disk, then `reads` random unaligned reads, some across
    cluster boundaries and past the end of the disk.

    Ranges that are a hole in qemu-img's sparse output *and* a zero run for
    us are checked at their ends only (the random reads land inside them too);
    everything else is compared byte for byte."""
    size = ref_path.stat().st_size
    assert disk.size == size
    ours = [(r.offset, r.offset + r.length) for r in disk.runs(0, size) if r.kind == "data"]
    data = _union(ours, _file_data_ranges(ref_path, size))
    chunk = 32 << 20
    with open(ref_path, "rb") as ref:
        def same(off: int, n: int) -> None:
            ref.seek(off)
            want, got = ref.read(n), disk.read(off, n)
            if got != want:
                bad = next(i for i in range(len(want)) if got[i:i + 1] != want[i:i + 1])
                raise AssertionError(f"first difference at byte {off + bad}")

        pos = 0
        for start, end in data + [(size, size)]:
            if pos < start:  # a hole on both sides: its ends must read as zeros
                for off in {pos, max(pos, start - 4096)}:
                    assert disk.read(off, min(4096, start - off)) == bytes(min(4096, start - off))
            for off in range(start, end, chunk):
                same(off, min(chunk, end - off))
            pos = end
        rnd = random.Random(seed)
        for i in range(reads):
            pick = i % 4
            if pick == 0:       # anywhere
                off, n = rnd.randrange(size), rnd.randrange(1, 3 * cluster)
            elif pick == 1:     # across a cluster boundary
                edge = rnd.randrange(1, max(2, size // cluster)) * cluster
                off, n = max(0, edge - rnd.randrange(1, 4096)), rnd.randrange(2, 8192)
            elif pick == 2:     # across the end of the disk
                off, n = max(0, size - rnd.randrange(1, 5000)), rnd.randrange(1, 10000)
            else:               # small and odd
                off, n = rnd.randrange(size), rnd.randrange(1, 700)
            ref.seek(off)
            want = ref.read(n)
            assert disk.read(off, n) == want, f"read({off}, {n}) differs"
    assert disk.read(size, 10) == b""
    assert disk.read(0, 0) == b""


def assert_runs_sound(disk, ref_path: Path) -> None:
    """runs() tiles the disk, neighbours differ in kind, 'zero' runs are zeros."""
    runs = list(disk.runs(0, disk.size))
    pos = 0
    with open(ref_path, "rb") as ref:
        for i, r in enumerate(runs):
            assert r.offset == pos and r.length > 0 and r.kind in ("data", "zero")
            if i:
                assert runs[i - 1].kind != r.kind, "runs are not merged"
            if r.kind == "zero":
                ref.seek(r.offset)
                assert ref.read(r.length) == bytes(r.length)
            pos += r.length
    assert pos == disk.size


def drop_big_files(folder: Path, limit: int = 32 << 20) -> None:
    """Delete files that take more than `limit` bytes on disk (qemu-img's
    references of 512 MiB real images): pytest keeps the last runs' tmp dirs."""
    for p in folder.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink() and p.stat().st_blocks * 512 > limit:
                p.unlink()
        except OSError:
            pass


@contextlib.contextmanager
def time_limit(seconds: int):
    """Fail instead of hanging (POSIX main thread; no-op elsewhere)."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def _expired(*_):
        raise TimeoutError(f"took longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, _expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def real_images(suffixes: tuple[str, ...]) -> list:
    """pytest params (INDEX row) for real images whose name has one of `suffixes`."""
    index = REAL / "INDEX.tsv"
    if not index.exists():
        return [pytest.param(None, marks=pytest.mark.skip(reason="../shared/real-images is absent"))]
    out = []
    with open(index, newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            name = row["file"]
            base = name.rsplit(".", 1)[0] if name.endswith((".gz", ".bz2", ".xz")) else name
            if base.endswith(suffixes) and row["malformed"] in ("no", "yes", "edge"):
                out.append(pytest.param(row, id=name))
    return out


def _siblings(row: dict) -> list[dict]:
    folder = (row["file"].split("/")[0], row["path"].rsplit("/", 1)[0])
    with open(REAL / "INDEX.tsv", newline="") as f:
        return [r for r in csv.DictReader(f, delimiter="\t")
                if (r["file"].split("/")[0], r["path"].rsplit("/", 1)[0]) == folder]


def _unpack_one(row: dict, dest: Path) -> Path:
    """Decompress (sparsely) under the file's original name, so the backing
    and data files named inside an image are found next to it."""
    src = REAL / row["file"]
    original = row["path"].rsplit("/", 1)[-1]
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(src.suffix)
    target = dest / (original.rsplit(".", 1)[0] if opener else original)
    if target.exists() or not src.exists():
        return target
    if not opener:
        target.symlink_to(src)
        return target
    block = 1 << 20
    with opener(src, "rb") as fin, open(target, "wb") as fout:
        while True:
            data = fin.read(block)
            if not data:
                break
            if data == bytes(len(data)):
                fout.seek(len(data), 1)
            else:
                fout.write(data)
        fout.truncate()
    return target


class RealImages:
    """Real images unpacked once per session, each source folder together."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def together(self, row: dict) -> Path:
        folder = self.root / row["file"].split("/")[0]
        folder.mkdir(exist_ok=True)
        for r in _siblings(row):
            _unpack_one(r, folder)
        return _unpack_one(row, folder)

    @staticmethod
    def alone(row: dict, dest: Path) -> Path:
        return _unpack_one(row, dest)
