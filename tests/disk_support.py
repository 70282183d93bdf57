"""Shared helpers of the disk-container tests (tests/test_disk_*.py).

The reference for every reader is `qemu-img convert -O raw`: a sparse file,
compared with our reading by `assert_reads_like`. Also here: the fixture sets
the scripts under scripts/ build (qcow2/VDI, VMDK/VHD/VHDX), real images from
../shared/real-images, and runners for damaged images (time limits, a child
process, random corruption).
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import gzip
import lzma
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from common_support import sha256_file as sha256  # noqa: F401 (used by the disk tests)

ROOT = Path(__file__).resolve().parent.parent
REAL = ROOT.parent / "shared" / "real-images"
QEMU_IMG = shutil.which("qemu-img")
CHUNK = 8 << 20


# -- tools and the qemu-img reference -------------------------------------------

def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (apt: see .ci/run)")
    return path


def qemu_raw(image: Path, fmt: str | None = None, out: Path | None = None) -> Path | str:
    """`qemu-img convert -O raw` (run next to the image, so relative backing
    names resolve); the error text when qemu cannot read it. Without `out`
    the result is kept as IMAGE.qemu.raw and made once."""
    need("qemu-img")
    if out is None:
        out = image.with_name(image.name + ".qemu.raw")
        if out.exists():
            return out
    cmd = ["qemu-img", "convert"] + (["-f", fmt] if fmt else []) + ["-O", "raw", image.name, str(out)]
    r = subprocess.run(cmd, cwd=image.parent, capture_output=True, text=True, timeout=120)
    return r.stderr.strip() if r.returncode else out


def qemu_reference(image: Path, fmt: str | None = None, out: Path | None = None) -> Path:
    """qemu_raw that must succeed."""
    got = qemu_raw(image, fmt, out)
    assert not isinstance(got, str), f"qemu-img cannot read {image.name}: {got}"
    return got


# -- comparing a reader with the reference --------------------------------------

def data_extents(path: Path) -> list[tuple[int, int]]:
    """Where a (sparse) file has data, by SEEK_DATA/SEEK_HOLE."""
    size = path.stat().st_size
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


def union(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[list[int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def open_path(path: Path, **options):
    """open_disk on a local file, with DiskOptions fields as keywords."""
    from rescue.disk import DiskOptions, open_disk
    from rescue.source import FileSource
    return open_disk(FileSource(path), DiskOptions(**options))


def assert_runs_tile(disk) -> list:
    """runs() covers the disk in order, neighbours differ in kind; the runs."""
    runs = list(disk.runs(0, disk.size))
    pos = 0
    for i, r in enumerate(runs):
        assert r.offset == pos and r.length > 0 and r.kind in ("data", "zero"), f"bad run {r}"
        assert i == 0 or runs[i - 1].kind != r.kind, f"runs are not merged at {r.offset}"
        pos += r.length
    assert pos == disk.size, f"runs end at {pos}, the disk at {disk.size}"
    return runs


def assert_reads_like(disk, ref: Path, seed: int = 0, grain: int = 64 << 10, reads: int = 200,
                      whole_limit: int = 64 << 20) -> None:
    """Our reading of `disk` equals the reference raw file.

    A small disk is compared whole. A larger one is compared wherever either
    side has data (our data runs, the file's data extents); ranges that are
    a hole on both sides are checked at their ends. Then `reads` random
    unaligned reads: anywhere, across grain boundaries, across the edges of
    data runs and past the end of the disk."""
    size = ref.stat().st_size
    assert disk.size == size, f"virtual size {disk.size} != the reference's {size}"
    ours = [(r.offset, r.offset + r.length) for r in assert_runs_tile(disk) if r.kind == "data"]
    compared = [(0, size)] if size <= whole_limit else union(ours + data_extents(ref))
    with open(ref, "rb") as f:
        def same(off: int, n: int) -> None:
            f.seek(off)
            want, got = f.read(n), disk.read(off, n)
            if got != want:
                bad = next(i for i in range(len(want)) if got[i:i + 1] != want[i:i + 1])
                raise AssertionError(f"read({off}, {n}): first difference at byte {off + bad}")

        pos = 0
        for start, end in compared + [(size, size)]:
            if pos < start:   # a hole on both sides: its ends must read as zeros
                for off in {pos, max(pos, start - 4096)}:
                    n = min(4096, start - off)
                    assert disk.read(off, n) == bytes(n), f"hole at {off} does not read as zeros"
            for off in range(start, end, CHUNK):
                same(off, min(CHUNK, end - off))
            pos = end
        rnd = random.Random(seed)
        span = min(3 * grain, 1 << 20)   # reads stay small; their offsets find the edges
        for i in range(reads):
            pick = i % 5
            n = rnd.randrange(1, span)
            if pick == 1:                  # across a grain boundary
                edge = rnd.randrange(1, max(2, size // grain + 1)) * grain
                off = max(0, edge - rnd.randrange(1, max(2, span // 2)))
            elif pick == 2:                # into and past the end of the disk
                off = max(0, size - rnd.randrange(1, span))
            elif pick == 3 and ours:       # across the edge of a data run
                a, b = rnd.choice(ours)
                off = max(0, rnd.choice((a, b)) - rnd.randrange(1, max(2, span // 2)))
            elif pick == 4:                # small and odd
                off, n = rnd.randrange(size), rnd.randrange(1, 700)
            else:                          # anywhere
                off = rnd.randrange(size)
            same(off, n)
    assert disk.read(size, 10) == b""
    assert disk.read(0, 0) == b""


def assert_like_qemu_img(path: Path, tmp: Path, seed: int = 0) -> None:
    """A real image reads as qemu-img reads it (skipped when qemu cannot read it either)."""
    ref = qemu_raw(path, out=tmp / "ref.raw")
    if isinstance(ref, str):
        pytest.skip(f"qemu-img cannot read it either: {ref}")
    with time_limit(120):
        disk = open_path(path)
        assert_reads_like(disk, ref, seed=seed, grain=disk.info.cluster_size or 64 << 10)
        disk.close()


# -- the qcow2/VDI fixture set (scripts/make-disk-fixtures) ---------------------

FIXTURES = ROOT / "fixtures" / "disk"
SCRIPT = ROOT / "scripts" / "make-disk-fixtures"
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

    def reference(self, name: str, internal_snapshot: str | None = None) -> Path:
        """The raw bytes qemu-img reads from `name` (committed copy without qemu-img)."""
        key = (name, internal_snapshot)
        if key in self._refs:
            return self._refs[key]
        src = self.path(name)
        if QEMU_IMG:
            out = self.root / f"{name}.{internal_snapshot or 'active'}.qemu.raw"
            cmd = [QEMU_IMG, "convert", "-O", "raw"]
            if internal_snapshot:
                cmd += ["-l", f"snapshot.name={internal_snapshot}"]
            subprocess.run(cmd + [src.name, str(out)], cwd=src.parent, check=True)
        elif internal_snapshot == "before" or name in SAME_AS_BASE or name.endswith(".vdi"):
            out = self.root / "base.raw"
        else:
            out = self.root / f"{Path(name).stem}.expected.raw"
        self._refs[key] = out
        return out


_IMAGES: list[Images] = []


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> Images:
    """The qcow2/VDI fixture set, made once per session for every module."""
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


# -- the VMDK/VHD/VHDX fixture set (scripts/make-vmdk-vhd-fixtures) -------------

VDISK_FIXTURES = ROOT / "fixtures" / "vdisk"   # not fixtures/disk: the qcow2 set there is regenerated wholesale
VDISK_SCRIPT = ROOT / "scripts" / "make-vmdk-vhd-fixtures"
CAN_BUILD_VDISK = all(shutil.which(t) for t in ("qemu-img", "qemu-io", "mkfs.ext4"))


@pytest.fixture(scope="session")
def small(tmp_path_factory) -> Path:
    """The committed fixtures/vdisk/{vmdk,vhd,vhdx}_*.gz, unpacked."""
    d = tmp_path_factory.mktemp("vdisk-small")
    for gz in sorted(VDISK_FIXTURES.glob("vhd*.gz")) + sorted(VDISK_FIXTURES.glob("vmdk_*.gz")):
        with gzip.open(gz, "rb") as fi, open(d / gz.name.removesuffix(".gz"), "wb") as fo:
            shutil.copyfileobj(fi, fo, CHUNK)
    return d


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> Path:
    """Everything the script makes (small and large variants), freshly built."""
    if not CAN_BUILD_VDISK:
        pytest.skip("qemu-img, qemu-io and mkfs.ext4 are needed to build the large variants")
    d = tmp_path_factory.mktemp("vdisk-built")
    subprocess.run([sys.executable, str(VDISK_SCRIPT), str(d), "--all"], check=True, timeout=120)
    return d


def reference(image: Path, fmt: str, tmp: Path, size: int | None = None) -> Path:
    """What a vdisk fixture should read as: its committed expected file when it
    has one, else qemu-img's reading, else (no qemu-img) the base disk the
    fixtures were made from."""
    expected = image.parent / (image.name.split(".")[0] + ".expected.raw")
    if expected.exists():
        return expected
    if QEMU_IMG:
        return qemu_reference(image, fmt, tmp / (image.name + ".qemu.raw"))
    base = image.parent / "vmdk_base.raw"
    if size is None or size == base.stat().st_size:
        return base
    padded = tmp / (image.name + ".base.raw")   # a CHS-sized VHD is a little larger
    padded.write_bytes(base.read_bytes()[:size].ljust(size, b"\0"))
    return padded


# -- real images from other projects (../shared/real-images) -------------------

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


def unpack(name: str, dest: Path, as_name: str | None = None) -> Path:
    """Copy the real image REAL/`name` into `dest` (decompressed, sparsely),
    under `as_name` (its original name) or its own."""
    src = REAL / name
    if not src.exists():
        pytest.skip(f"{src} not available (real images live outside this repo)")
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(src.suffix, open)
    target = dest / (as_name or src.name)
    if opener is not open and target.suffix == src.suffix:
        target = target.with_suffix("")
    if target.exists():
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


def _siblings(row: dict) -> list[dict]:
    folder = (row["file"].split("/")[0], row["path"].rsplit("/", 1)[0])
    with open(REAL / "INDEX.tsv", newline="") as f:
        return [r for r in csv.DictReader(f, delimiter="\t")
                if (r["file"].split("/")[0], r["path"].rsplit("/", 1)[0]) == folder]


@pytest.fixture(scope="session")
def real(tmp_path_factory) -> "RealImages":
    return RealImages(tmp_path_factory.mktemp("real-images"))


class RealImages:
    """Real images unpacked once per session under their original names,
    each source folder together (so backing and data files are found)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def together(self, row: dict) -> Path:
        folder = self.root / row["file"].split("/")[0]
        folder.mkdir(exist_ok=True)
        for r in _siblings(row):
            if (REAL / r["file"]).exists():
                self.alone(r, folder)
        return self.alone(row, folder)

    @staticmethod
    def alone(row: dict, dest: Path) -> Path:
        return unpack(row["file"], dest, as_name=row["path"].rsplit("/", 1)[-1])


# -- damaged images: no crash, no hang ------------------------------------------

@pytest.fixture
def no_big_leftovers(tmp_path):
    """Delete files of a test's tmp_path that take over 32 MiB on disk
    (qemu-img's references of 512 MiB real images): pytest keeps the last
    runs' tmp dirs."""
    yield
    for p in tmp_path.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink() and p.stat().st_blocks * 512 > 32 << 20:
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


def assert_refused_or_warned(path: Path) -> None:
    """A malformed image opens with a warning, reads with damaged ranges or
    fails with a clear error naming it: never a crash or a hang."""
    from rescue.errors import DamagedRange, RescueError
    with time_limit(60):
        try:
            disk = open_path(path)
            for r in disk.runs(0, disk.size):
                if r.kind == "data":
                    disk.read(r.offset, min(r.length, 1 << 20))
            assert disk.info.warnings, f"{path.name} opened without error or warning"
        except RescueError as exc:
            assert str(path) in exc.one_line()
        except DamagedRange:
            pass


def patched(src: Path, dst: Path, edits: dict[int, bytes]) -> Path:
    """A copy of `src` with bytes replaced at the given offsets."""
    data = bytearray(src.read_bytes())
    for at, b in edits.items():
        data[at:at + len(b)] = b
    dst.write_bytes(data)
    return dst


def _open_and_read_all(q, module: str, path: str) -> None:
    from rescue.disk import DiskOptions
    from rescue.errors import RescueError
    from rescue.source import FileSource
    import importlib
    mod = importlib.import_module(f"rescue.disk.{module}")
    try:
        img = mod.open(FileSource(path), DiskOptions())
        warnings = list(img.info.warnings)
        try:
            for r in img.runs(0, img.size):
                if r.kind == "data":
                    for pos in range(r.offset, r.offset + r.length, CHUNK):
                        img.read(pos, min(CHUNK, r.offset + r.length - pos))
        except OSError as e:      # DamagedRange: a damaged region, reported
            warnings.append(f"damaged: {e}")
        q.put(("ok", warnings))
    except RescueError as e:
        q.put(("error", e.one_line()))
    except BaseException as e:  # noqa: BLE001 - the test fails on this
        q.put(("crash", f"{type(e).__name__}: {e}"))


def open_guarded(module: str, path: Path, timeout: float = 60) -> tuple[str, object]:
    """Open and read a suspicious image in a child process with a time limit:
    ('ok', warnings) | ('error', text) | ('crash', text) | ('hang', '')."""
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_open_and_read_all, args=(q, module, str(path)))
    p.start()
    p.join(timeout)
    if p.is_alive():
        p.kill()
        p.join()
        return ("hang", "")
    return q.get(timeout=5) if not q.empty() else ("crash", f"exit code {p.exitcode}")


def fuzz(directory: Path, names: list[str], seed: int, rounds: int) -> list[str]:
    """Open and read copies of the images with random bytes changed in their
    metadata (and sometimes cut short): anything but a RescueError or a
    DamagedRange, or taking over 20 s, is returned as a failure."""
    from rescue.disk import DiskOptions, open_disk
    from rescue.errors import DamagedRange, RescueError
    from rescue.source import FileSource

    rnd = random.Random(seed)
    failures = []
    work = directory / f"fuzz{seed}"
    work.mkdir(exist_ok=True)
    for sibling in directory.iterdir():      # parents and extents stay intact next to the victim
        if sibling.is_file() and not (work / sibling.name).exists():
            os.symlink(sibling, work / sibling.name)
    for i in range(rounds):
        name = rnd.choice(names)
        data = bytearray((directory / name).read_bytes())
        for _ in range(rnd.randrange(1, 20)):
            r = rnd.random()
            top = 4096 if r < 0.5 else (2 << 20) if r < 0.8 else None
            at = rnd.randrange(0, min(len(data), top)) if top else \
                rnd.randrange(max(0, len(data) - 1536), len(data))
            data[at] = rnd.randrange(256)
        if rnd.random() < 0.2:
            data = data[:rnd.randrange(0, len(data))]
        victim = work / f"{i}-{name}"
        victim.write_bytes(data)
        try:
            with time_limit(20):
                img = open_disk(FileSource(victim), DiskOptions())
                sum(r.length for r in img.runs(0, img.size))
                for pos in range(0, min(img.size, 6 << 20), 1 << 20):
                    try:
                        img.read(pos, 1 << 20)
                    except DamagedRange:
                        pass
                img.close()
        except RescueError:
            pass
        except Exception as e:  # noqa: BLE001 - what the test looks for
            failures.append(f"{name} round {i}: {type(e).__name__}: {e}")
        victim.unlink()
    return failures
