"""Fuzz targets for rescue's parsers of untrusted bytes (issue 14).

Each target takes one input (bytes) and drives one layer the way the CLI does.
What damaged input may raise is rescue's own classified errors: RescueError
(one line for the user), DamagedRange (a byte range to skip) and FileReadError
(one file to skip). Anything else escaping a target is a bug (a "crash"), and
so is a hang (the runners set a time limit per input).

Two kinds of target:

- raw: the input *is* the file (a container, an archive, a disk with a
  partition table or LVM). Seeds: tests/fuzz/corpus/<target>/, small files
  made by real tools (scripts/fuzz --make-seeds).
- patch: for filesystems, whose smallest real images are MiBs (XFS, btrfs), the
  input is a list of byte edits over a real image from fixtures/, applied only
  where a clean pass read metadata. Mutations then stay deep inside a
  mostly valid filesystem instead of failing at the superblock.

Used by tests/fuzz/run.py (atheris, coverage-guided), by scripts/fuzz (longer
runs) and by tests/fuzz/test_fuzz.py (every seed and every kept crash input replayed,
plus a short deterministic mutation run; no atheris needed).
"""

from __future__ import annotations

import bisect
import functools
import os
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

from rescue.errors import DamagedRange, RescueError
from rescue.fs.base import DIR, FILE, FileReadError
from rescue.source.base import BytesSource

ROOT = Path(__file__).resolve().parent.parent.parent
FIXTURES = ROOT / "fixtures"
CORPUS = Path(__file__).resolve().parent / "corpus"
REGRESSIONS = Path(__file__).resolve().parent / "regressions"
EXPECTED = (RescueError, DamagedRange, FileReadError)

READ = 64 << 10          # bytes read per probe: enough to cross tables and clusters
MAX_ENTRIES = 300        # filesystem walk bounds: per input, work stays small
MAX_FILES = 30


def _reads(source, offsets) -> None:
    for offset in offsets:
        if 0 <= offset < source.size:
            try:
                source.read(offset, READ)
            except EXPECTED:
                pass


# -- raw targets ---------------------------------------------------------------

def container(data: bytes) -> None:
    """The disk FORMATS registry: detect, open, read, truncation check."""
    from rescue.disk import open_disk
    try:
        disk = open_disk(BytesSource(data, name="fuzz.img"))
    except EXPECTED:
        return
    try:
        size = disk.size
        _reads(disk, (0, size // 2, max(0, size - READ)))
        check = getattr(disk, "truncation", None)
        if check is not None:
            try:
                check()
            except EXPECTED:
                pass
    finally:
        disk.close()


def archive(data: bytes) -> None:
    """tar (plain, gz, zst, xz, bz2), zip and bare compressed streams."""
    from rescue.source.archives import describe_archive, open_archive
    try:
        describe_archive(BytesSource(data, name="fuzz.tar"))
    except EXPECTED:
        pass
    try:
        inner = open_archive(BytesSource(data, name="fuzz.tar"))
    except EXPECTED:
        return
    if inner is None:
        return
    try:
        _reads(inner, (0, inner.size // 2, max(0, inner.size - READ)))
    finally:
        inner.close()


def volume(data: bytes) -> None:
    """MBR/GPT partitions, LVM2 metadata, superblock probing."""
    from rescue.disk.base import RawDisk
    from rescue.volume import discover
    try:
        found = discover(RawDisk(BytesSource(data, name="fuzz.img")))
    except EXPECTED:
        return
    for v in found.volumes:
        _reads(v.source, (0,))


# -- patch targets (filesystems) -----------------------------------------------

class PatchedSource:
    """A base image with byte edits laid over it, without copying the base."""

    def __init__(self, base, patches: dict[int, int], name: str) -> None:
        self.base, self.patches, self.name, self.size = base, patches, name, base.size
        self._at = sorted(patches)

    def read(self, offset: int, length: int) -> bytes:
        data = self.base.read(offset, length)
        lo = bisect.bisect_left(self._at, offset)
        hi = bisect.bisect_left(self._at, offset + len(data))
        if lo == hi:
            return data
        out = bytearray(data)
        for at in self._at[lo:hi]:
            out[at - offset] = self.patches[at]
        return bytes(out)

    def close(self) -> None:
        pass


class Recorder:
    """Notes every range a clean pass reads: where patches go."""

    def __init__(self, base) -> None:
        self.base, self.name, self.size, self.ranges = base, base.name, base.size, []

    def read(self, offset: int, length: int) -> bytes:
        data = self.base.read(offset, length)
        if data:
            self.ranges.append((offset, len(data)))
        return data

    def close(self) -> None:
        pass


def walk_fs(fs) -> None:
    """List and read a bounded part of a filesystem as extract would."""
    seen = files = 0
    todo = ["/"]
    while todo and seen < MAX_ENTRIES:
        path = todo.pop()
        try:
            entries = fs.listdir(path)
            fs.listing_damage(path)
        except EXPECTED:
            continue
        for e in entries:
            seen += 1
            if seen >= MAX_ENTRIES:
                break
            try:
                fs.stat(e.path)
                fs.xattrs(e)
                if e.kind == DIR:
                    todo.append(e.path)
                elif e.kind == FILE and files < MAX_FILES:
                    files += 1
                    fs.file_runs(e)
                    fs.read_range(e, 0, min(e.size, READ))
                    if e.size > READ:
                        fs.read_range(e, e.size - READ, READ)
            except EXPECTED:
                continue


def _zstd_image(path: Path) -> Path:
    """A committed .img.zst decompressed once into the temp dir."""
    out = Path(tempfile.gettempdir()) / f"rescue-fuzz-{os.getuid()}-{path.name[:-4]}"
    if not out.exists() or out.stat().st_mtime < path.stat().st_mtime:
        tmp = out.with_suffix(".part")
        subprocess.run(["zstd", "-q", "-d", "-f", str(path), "-o", str(tmp)], check=True)
        os.replace(tmp, out)
    return out


FS_BASES = {   # target -> (reader "module:Class", base images by preference)
    "ext": ("ext:ExtFileSystem", ["fs/ext2.img", "fs/ext3.img"]),
    "xfs": ("xfs:XfsFileSystem", ["xfs/v5.img.zst", "xfs/b1k.img.zst", "xfs/v4.img.zst"]),
    "btrfs": ("btrfs:BtrfsFileSystem", ["btrfs/mixed-4k.img.zst", "btrfs/subvols-xxhash.img.zst"]),
}


def _reader(spec: str):
    from importlib import import_module
    module, _, cls = spec.partition(":")
    return getattr(import_module(f"rescue.fs.{module}"), cls)


@functools.lru_cache(maxsize=None)
def fs_base(target: str):
    """(reader class, base image source, hot ranges) for a patch target, or None
    when this checkout has no base image for it (or no reader yet)."""
    from rescue.source.base import FileSource
    spec, candidates = FS_BASES[target]
    try:
        reader = _reader(spec)
    except (ImportError, AttributeError):
        return None
    for rel in candidates:
        path = FIXTURES / rel
        if not path.exists():
            continue
        if path.suffix == ".zst":
            path = _zstd_image(path)
        base = FileSource(str(path))
        rec = Recorder(base)
        walk_fs(reader(rec, name=f"fuzz-{target}"))
        starts, total, merged = [], 0, []
        for offset, length in sorted(set(rec.ranges)):
            if merged and offset <= merged[-1][0] + merged[-1][1]:
                last = merged[-1]
                merged[-1] = (last[0], max(last[1], offset + length - last[0]))
            else:
                merged.append((offset, length))
        for offset, length in merged:
            starts.append((total, offset))
            total += length
        return reader, base, (starts, total)
    return None


def patches_from(data: bytes, hot: tuple[list[tuple[int, int]], int]) -> dict[int, int]:
    """Input bytes as edits: each 5-byte record is (u32 position in the hot
    ranges, u8 value). Up to 64 edits per input."""
    starts, total = hot
    keys = [s for s, _ in starts]
    out: dict[int, int] = {}
    for i in range(0, min(len(data), 5 * 64) - 4, 5):
        pos, value = struct.unpack_from("<IB", data, i)
        pos %= max(total, 1)
        j = bisect.bisect_right(keys, pos) - 1
        out[starts[j][1] + pos - starts[j][0]] = value
    return out


def _fs_target(target: str) -> Callable[[bytes], None]:
    def run(data: bytes) -> None:
        setup = fs_base(target)
        if setup is None:
            return
        reader, base, hot = setup
        source = PatchedSource(base, patches_from(data, hot), name=f"fuzz-{target}.img")
        try:
            fs = reader(source, name=f"fuzz-{target}.img")
        except EXPECTED:
            return
        try:
            walk_fs(fs)
        finally:
            fs.close()
    run.__name__ = target
    run.__doc__ = f"{target} reader over a real image with byte edits where metadata lies"
    return run


TARGETS: dict[str, Callable[[bytes], None]] = {
    "container": container,
    "archive": archive,
    "volume": volume,
    "ext": _fs_target("ext"),
    "xfs": _fs_target("xfs"),
    "btrfs": _fs_target("btrfs"),
}
RAW = ("container", "archive", "volume")


def seeds(target: str) -> list[bytes]:
    """The seed corpus (raw targets) or a few edit lists (patch targets)."""
    if target in RAW:
        folder = CORPUS / target
        return [seed_bytes(p) for p in sorted(folder.iterdir())] if folder.is_dir() else []
    return [b"", bytes(5), b"\x00\x00\x00\x00\xff" * 8, bytes(range(250))]


def seed_bytes(path: Path) -> bytes:
    """A seed file's input: NAME.seed.gz is stored gzip-wrapped to keep the repo small."""
    if path.name.endswith(".seed.gz"):
        import gzip
        return gzip.decompress(path.read_bytes())
    return path.read_bytes()


def regressions(target: str) -> list[Path]:
    folder = REGRESSIONS / target
    return sorted(folder.iterdir()) if folder.is_dir() else []
