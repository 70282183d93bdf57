"""Shared checks for the VMDK/VHD/VHDX tests: our reader against qemu-img.

The reference is `qemu-img convert -O raw`, a sparse file; large images are
compared over the union of its data extents (SEEK_DATA/SEEK_HOLE) and our
data runs, everything else being holes in both.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import sys
import multiprocessing
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from rescue.disk.base import DiskImage

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures" / "vdisk"   # not fixtures/disk: the qcow2 set there is regenerated wholesale
REAL = ROOT.parent / "shared" / "real-images"
CHUNK = 4 << 20


def need_qemu_img() -> str:
    exe = shutil.which("qemu-img")
    if exe is None:
        pytest.skip("qemu-img not installed (apt-get install qemu-utils)")
    return exe


def qemu_raw(image: Path, fmt: str, out: Path) -> Path | str:
    """`qemu-img convert -O raw`; returns the error text when qemu cannot read it."""
    need_qemu_img()
    r = subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(image), str(out)],
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        return r.stderr.strip()
    return out


def data_extents(path: Path) -> list[tuple[int, int]]:
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
    finally:
        os.close(fd)
    return out


def _union(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def assert_same_as(img: DiskImage, ref: Path, reads: int = 200, seed: int = 0,
                   grain: int = 64 << 10) -> None:
    """Whole disk + `reads` random unaligned reads equal the reference raw file."""
    size = ref.stat().st_size
    assert img.size == size, f"virtual size {img.size} != qemu's {size}"
    runs = list(img.runs(0, img.size))
    assert sum(r.length for r in runs) == img.size
    ours = [(r.offset, r.offset + r.length) for r in runs if r.kind == "data"]
    with open(ref, "rb") as f:
        for a, b in _union(data_extents(ref) + ours):
            for pos in range(a, b, CHUNK):
                n = min(CHUNK, b - pos)
                f.seek(pos)
                assert img.read(pos, n) == f.read(n), f"bytes differ in {pos}..{pos + n}"
        # What our runs call zero must read as zeros (and qemu agrees: a hole there).
        for r in runs:
            if r.kind == "zero":
                n = min(r.length, CHUNK)
                assert img.read(r.offset, n) == bytes(n)
                f.seek(r.offset)
                assert f.read(n) == bytes(n), f"zero run at {r.offset} holds data in qemu's output"
        rnd = random.Random(seed)
        span = min(3 * grain, 1 << 20)       # reads stay small; their offsets find the edges
        for i in range(reads):
            if i % 10 == 0:      # some reads run into and past the end
                off = max(0, size - rnd.randrange(1, span))
            elif i % 3 == 0 and ours:   # start just before a data run's edge, crossing it
                a, b = rnd.choice(ours)
                off = max(0, rnd.choice((a, b)) - rnd.randrange(1, span // 2))
            elif i % 3 == 1:     # cross a grain/block boundary
                off = max(0, rnd.randrange(0, size // grain + 1) * grain - rnd.randrange(1, span // 2))
            else:
                off = rnd.randrange(0, size)
            n = rnd.randrange(1, span)
            f.seek(off)
            assert img.read(off, n) == f.read(n), f"random read {off}+{n} differs"


def unpack(name: str, tmp: Path) -> Path:
    """Copy a real image from ../shared/real-images to tmp, decompressing it."""
    src = REAL / name
    if not src.exists():
        pytest.skip(f"{src} not available (real images live outside this repo)")
    base = src.name.removesuffix(".gz").removesuffix(".bz2")
    dst = tmp / base
    if dst.exists():
        return dst
    opener = gzip.open if src.name.endswith(".gz") else bz2.open if src.name.endswith(".bz2") else open
    with opener(src, "rb") as fi, open(dst, "wb") as fo:
        shutil.copyfileobj(fi, fo, CHUNK)
    return dst


def _guarded(q, module: str, path: str) -> None:
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
    p = ctx.Process(target=_guarded, args=(q, module, str(path)))
    p.start()
    p.join(timeout)
    if p.is_alive():
        p.kill()
        p.join()
        return ("hang", "")
    return q.get(timeout=5) if not q.empty() else ("crash", f"exit code {p.exitcode}")


SCRIPT = ROOT / "scripts" / "make-vmdk-vhd-fixtures"
CAN_BUILD = all(shutil.which(t) for t in ("qemu-img", "qemu-io", "mkfs.ext4"))


@pytest.fixture(scope="session")
def small(tmp_path_factory) -> Path:
    """The committed fixtures/disk/{vmdk,vhd,vhdx}_*.gz, unpacked."""
    d = tmp_path_factory.mktemp("vdisk-small")
    for gz in sorted(FIXTURES.glob("vhd*.gz")) + sorted(FIXTURES.glob("vmdk_*.gz")):
        with gzip.open(gz, "rb") as fi, open(d / gz.name.removesuffix(".gz"), "wb") as fo:
            shutil.copyfileobj(fi, fo, CHUNK)
    return d


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> Path:
    """Everything the script makes (small and large variants), freshly built."""
    if not CAN_BUILD:
        pytest.skip("qemu-img, qemu-io and mkfs.ext4 are needed to build the large variants")
    d = tmp_path_factory.mktemp("vdisk-built")
    subprocess.run([sys.executable, str(SCRIPT), str(d), "--all"], check=True, timeout=120)
    return d


def reference(image: Path, fmt: str, tmp: Path, size: int | None = None) -> Path:
    """What the image should read as: qemu-img's reading when it is installed,
    else the committed expected file (made by qemu-img when the fixtures were)."""
    expected = image.parent / (image.name.split(".")[0] + ".expected.raw")
    if expected.exists():
        return expected
    if shutil.which("qemu-img"):
        got = qemu_raw(image, fmt, tmp / (image.name + ".qemu.raw"))
        assert not isinstance(got, str), got
        return got
    base = image.parent / "vmdk_base.raw"
    if size is None or size == base.stat().st_size:
        return base
    padded = tmp / (image.name + ".base.raw")   # a CHS-sized VHD is a little larger
    padded.write_bytes(base.read_bytes()[:size].ljust(size, b"\0"))
    return padded


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def patched(src: Path, dst: Path, edits: dict[int, bytes]) -> Path:
    """A copy of `src` with bytes replaced at the given offsets."""
    data = bytearray(src.read_bytes())
    for at, b in edits.items():
        data[at:at + len(b)] = b
    dst.write_bytes(data)
    return dst


def fuzz(directory: Path, names: list[str], seed: int, rounds: int) -> list[str]:
    """Open and read copies of the images with random bytes changed in their
    metadata (and sometimes cut short): anything but a RescueError or a
    DamagedRange, or taking over 20 s, is returned as a failure."""
    import signal
    from rescue.disk import DiskOptions, open_disk
    from rescue.errors import DamagedRange, RescueError
    from rescue.source import FileSource

    def too_slow(*_):
        raise TimeoutError("hang")
    old = signal.signal(signal.SIGALRM, too_slow)
    rnd = random.Random(seed)
    failures = []
    work = directory / f"fuzz{seed}"
    work.mkdir(exist_ok=True)
    for sibling in directory.iterdir():      # parents and extents stay intact next to the victim
        if sibling.is_file() and not (work / sibling.name).exists():
            os.symlink(sibling, work / sibling.name)
    try:
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
            signal.alarm(20)
            try:
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
            finally:
                signal.alarm(0)
            victim.unlink()
    finally:
        signal.signal(signal.SIGALRM, old)
    return failures
