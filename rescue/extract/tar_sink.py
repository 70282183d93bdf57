"""Tar output: .tar, .tar.gz, .tar.zst, or a stream (stdout, a pipe to rclone).

Headers come from `tarfile.TarInfo.tobuf` (PAX format, so long names, big
numbers, nanosecond mtimes and binary xattrs survive); file data is written
straight to the stream in large chunks, never through tarfile's 16 KiB copy.
Sparse files use the PAX 1.0 sparse format that GNU tar and libarchive read.
"""

from __future__ import annotations

import errno
import gzip
import itertools
import os
import sys
import tarfile
from typing import BinaryIO

from ..errors import TargetError
from ..fs.base import BLOCK, CHAR, DIR, FIFO, FILE, SYMLINK, FileReadError
from .base import Item, Sink, SinkResult
from .copy import data_pieces, sparse_ranges

BLOCKSIZE = tarfile.BLOCKSIZE
_TYPES = {FILE: tarfile.REGTYPE, DIR: tarfile.DIRTYPE, SYMLINK: tarfile.SYMTYPE,
          FIFO: tarfile.FIFOTYPE, CHAR: tarfile.CHRTYPE, BLOCK: tarfile.BLKTYPE}
# Sparse members only pay off when the holes are big.
SPARSE_MIN_HOLE = 64 * 1024


def compression_for(path: str) -> str | None:
    lower = path.lower()
    if lower.endswith((".tar.gz", ".tgz")):
        return "gz"
    if lower.endswith((".tar.zst", ".tzst", ".tar.zstd")):
        return "zst"
    return None


class _Counting:
    """Wraps the output stream: counts bytes, turns ENOSPC into a clear error."""

    def __init__(self, raw: BinaryIO, label: str) -> None:
        self.raw, self.label, self.written = raw, label, 0

    def write(self, data) -> int:
        try:
            self.raw.write(data)
        except BrokenPipeError:
            raise TargetError("the reader of the output went away (broken pipe)", file=self.label) from None
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise TargetError("no space left on device", file=self.label,
                                  hint="write to a disk with more free space, or extract less") from None
            raise TargetError(f"cannot write: {exc.strerror or exc}", file=self.label) from None
        self.written += len(data)
        return len(data)


class TarSink(Sink):
    keeps = frozenset({"owners", "names", "modes", "mtimes", "symlinks", "hardlinks", "xattrs",
                       "devices", "fifos", "sparse", "empty"})

    def __init__(self, target: str | BinaryIO, compression: str | None = "auto", label: str | None = None) -> None:
        self._final: str | None = None
        self._part: str | None = None
        if isinstance(target, str) and target != "-":
            if compression == "auto":
                compression = compression_for(target)
            self._final = target
            self._part = target + ".part"
            try:
                self._file: BinaryIO = open(self._part, "wb")
            except OSError as exc:
                raise TargetError(f"cannot create output: {exc.strerror or exc}", file=target) from None
            self.label = target
        else:
            if compression == "auto":
                compression = None
            self._file = sys.stdout.buffer if target == "-" else target  # type: ignore[assignment]
            self.label = label or ("<stdout>" if target == "-" else "<stream>")
        self._compressor = None
        if compression == "gz":
            # mtime=0 keeps the archive reproducible; level 6 is gzip's own default
            self._stream: BinaryIO = gzip.GzipFile(fileobj=self._file, mode="wb", compresslevel=6, mtime=0)
        elif compression == "zst":
            import zstandard
            self._compressor = zstandard.ZstdCompressor(level=3, threads=-1)
            self._stream = self._compressor.stream_writer(self._file, closefd=False)
        else:
            self._stream = self._file
        self._out = _Counting(self._stream, self.label)
        self.files = 0
        self.bytes = 0
        self.warnings: list[str] = []

    # -- headers -------------------------------------------------------------

    def _info(self, item: Item) -> tarfile.TarInfo:
        e = item.entry
        ti = tarfile.TarInfo(item.name)
        ti.mode = e.mode & 0o7777
        ti.uid, ti.gid = e.uid, e.gid
        ti.uname, ti.gname = item.user or "", item.group or ""
        ti.mtime = e.mtime_ns // 1_000_000_000
        pax: dict[str, str] = {}
        if e.mtime_ns % 1_000_000_000:
            # sign and magnitude, as GNU tar writes it: -1.5 s is "-1.500000000", not "-2.500000000"
            sign, mag = ("-" if e.mtime_ns < 0 else ""), abs(e.mtime_ns)
            pax["mtime"] = f"{sign}{mag // 1_000_000_000}.{mag % 1_000_000_000:09d}"
        if item.hardlink_to is not None:
            ti.type = tarfile.LNKTYPE
            ti.linkname = item.hardlink_to
        else:
            ti.type = _TYPES[e.kind]
            if e.kind == SYMLINK:
                ti.linkname = e.link_target or ""
            elif e.kind in (CHAR, BLOCK) and e.rdev:
                ti.devmajor, ti.devminor = e.rdev
        for key, value in (e.xattrs or {}).items():
            pax["SCHILY.xattr." + key] = value.decode("utf-8", "surrogateescape")
        ti.pax_headers = pax
        return ti

    def _header(self, ti: tarfile.TarInfo) -> None:
        self._out.write(fast_header(ti) or ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))

    # -- items ---------------------------------------------------------------

    def add(self, item: Item) -> None:
        ti = self._info(item)
        content = item.content
        if content is None or ti.type != tarfile.REGTYPE:
            ti.size = 0
            self._header(ti)
            return
        ranges = sparse_ranges(content)
        if ranges is not None and _worth_sparse(ranges, content.size):
            self._add_sparse(ti, item, ranges)
        else:
            # The first chunk is read before the header is written: a file unreadable from
            # its start (a damaged inode claiming 4 GiB) is skipped without a member, instead
            # of a header followed by gigabytes of zero padding.
            chunks = iter(content.chunks())
            first = next(chunks, b"") if content.size else b""
            ti.size = content.size
            self._header(ti)
            self._copy(item, itertools.chain((first,), chunks), content.size)
        self.files += 1
        self.bytes += content.size

    def _copy(self, item: Item, chunks, size: int) -> None:
        written = 0
        try:
            for chunk in chunks:
                if written + len(chunk) > size:
                    chunk = chunk[:size - written]
                self._out.write(chunk)
                written += len(chunk)
        except FileReadError:
            self._pad_member(size - written, written)
            raise
        if written < size:   # the file shrank under us: keep the archive valid
            self._pad_member(size - written, written)
            raise FileReadError(f"{item.entry.path}: only {written} of {size} bytes could be read")
        self._pad(written)

    def _pad_member(self, missing: int, written: int) -> None:
        """Fill a member whose reading failed, so the archive stays readable."""
        total = written + missing
        while missing > 0:
            n = min(missing, 1 << 20)
            self._out.write(bytes(n))
            missing -= n
        self.warnings.append("a damaged file's tar member was filled with zeros after the damage; "
                             "it is listed as skipped")
        self._pad(total)

    def _pad(self, size: int) -> None:
        rem = size % BLOCKSIZE
        if rem:
            self._out.write(bytes(BLOCKSIZE - rem))

    def _add_sparse(self, ti: tarfile.TarInfo, item: Item, ranges: list[tuple[int, int]]) -> None:
        """GNU PAX sparse format 1.0: the map as decimal lines in the data area."""
        size = item.content.size  # type: ignore[union-attr]
        # The map must end at the file's size (a zero-length last extent marks it).
        if not ranges or ranges[-1][0] + ranges[-1][1] < size:
            ranges = list(ranges) + [(size, 0)]
        lines = [str(len(ranges))] + [f"{off}\n{length}" for off, length in ranges]
        sparse_map = ("\n".join(lines) + "\n").encode("ascii")
        map_size = len(sparse_map) + (-len(sparse_map)) % BLOCKSIZE
        data_size = sum(length for _, length in ranges)
        real_name = ti.name
        ti.pax_headers.update({"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                               "GNU.sparse.name": real_name, "GNU.sparse.realsize": str(size)})
        # GNU tar names the member's placeholder like this; readers use GNU.sparse.name.
        head, _, tail = real_name.rpartition("/")
        ti.name = (head + "/" if head else "") + f"GNUSparseFile.0/{tail}"
        ti.size = map_size + data_size
        self._header(ti)
        self._out.write(sparse_map + bytes(map_size - len(sparse_map)))
        written = 0
        try:
            for _, data in data_pieces(item.content, item.entry.path, ranges):  # type: ignore[arg-type]
                self._out.write(data)
                written += len(data)
        except FileReadError:
            self._pad_member(data_size - written, map_size + written)
            raise
        self._pad(map_size + data_size)

    # -- end -----------------------------------------------------------------

    def close(self) -> SinkResult:
        self._out.write(bytes(BLOCKSIZE * 2))
        try:
            if self._stream is not self._file:
                self._stream.close()
            if self._final is not None:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
                os.replace(self._part, self._final)
            else:
                self._file.flush()
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise TargetError("no space left on device", file=self.label) from None
            raise TargetError(f"cannot finish the archive: {exc}", file=self.label) from None
        return SinkResult(target=self._final or self.label, files=self.files, bytes=self.bytes,
                          warnings=self.warnings)

    def abort(self) -> None:
        try:
            if self._final is not None:
                self._file.close()
                if self._part and os.path.exists(self._part):
                    os.unlink(self._part)
        except OSError:
            pass


def _worth_sparse(ranges: list[tuple[int, int]], size: int) -> bool:
    pos = 0
    for offset, length in ranges:
        if offset - pos >= SPARSE_MIN_HOLE:
            return True
        pos = offset + length
    return size - pos >= SPARSE_MIN_HOLE


def fast_header(ti: tarfile.TarInfo) -> bytes | None:
    """The ustar header tarfile would write for a plain member (ASCII names
    that fit, no PAX records), built directly: tarfile's generic path costs
    ~30 us a member, which is most of the time for 200 000 tiny files.
    Returns None when the member needs tarfile's full treatment. A test checks
    the bytes are identical to `ti.tobuf(PAX_FORMAT)`."""
    if ti.pax_headers:
        return None
    name = ti.name + "/" if ti.type == tarfile.DIRTYPE and not ti.name.endswith("/") else ti.name
    try:
        raw_name, link = name.encode("ascii"), ti.linkname.encode("ascii")
        user, group = ti.uname.encode("ascii"), ti.gname.encode("ascii")
    except UnicodeEncodeError:
        return None
    if len(raw_name) > 100 or len(link) > 100 or len(user) > 32 or len(group) > 32:
        return None
    if not (0 <= ti.uid < 8 ** 7 and 0 <= ti.gid < 8 ** 7 and 0 <= ti.size < 8 ** 11
            and isinstance(ti.mtime, int) and 0 <= ti.mtime < 8 ** 11):
        return None
    if ti.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        if not (0 <= ti.devmajor < 8 ** 7 and 0 <= ti.devminor < 8 ** 7):
            return None
        devices = b"%07o\0%07o\0" % (ti.devmajor, ti.devminor)
    else:
        devices = bytes(16)
    buf = b"".join((
        raw_name.ljust(100, b"\0"), b"%07o\0" % (ti.mode & 0o7777), b"%07o\0" % ti.uid, b"%07o\0" % ti.gid,
        b"%011o\0" % ti.size, b"%011o\0" % ti.mtime, b"        ", ti.type, link.ljust(100, b"\0"),
        tarfile.POSIX_MAGIC, user.ljust(32, b"\0"), group.ljust(32, b"\0"), devices,
    )).ljust(BLOCKSIZE, b"\0")
    return buf[:148] + b"%06o\0" % sum(buf) + buf[155:]
