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
import stat
import struct
import sys
import tarfile
import zlib
from typing import BinaryIO

from ..errors import TargetError
from ..fs.base import BLOCK, CHAR, DIR, FIFO, FILE, SYMLINK, FileReadError
from .base import Item, Sink, SinkResult
from . import zerocopy
from .copy import CHUNK, data_pieces, sparse_ranges

BLOCKSIZE = tarfile.BLOCKSIZE
_TYPES = {FILE: tarfile.REGTYPE, DIR: tarfile.DIRTYPE, SYMLINK: tarfile.SYMTYPE,
          FIFO: tarfile.FIFOTYPE, CHAR: tarfile.CHRTYPE, BLOCK: tarfile.BLKTYPE}
# Sparse members only pay off when the holes are big.
SPARSE_MIN_HOLE = 64 * 1024
# Smaller files are read and written: a kernel copy costs a flush of the buffered header.
KERNEL_COPY_MIN = 64 * 1024
OUT_BUFFER = 1 << 20   # small members gathered into writes of about this size


def compression_for(path: str) -> str | None:
    lower = path.lower()
    if lower.endswith((".tar.gz", ".tgz")):
        return "gz"
    if lower.endswith((".tar.zst", ".tzst", ".tar.zstd")):
        return "zst"
    return None


class _Counting:
    """Wraps the output stream: counts bytes, turns ENOSPC into a clear error.
    Small writes (a small file's member) are gathered into pieces of about
    OUT_BUFFER bytes: one write call per hundred small files, not one each."""

    def __init__(self, raw: BinaryIO, label: str) -> None:
        self.raw, self.label, self.written = raw, label, 0
        self._pending: list = []
        self._pending_len = 0

    def write(self, data) -> int:
        n = len(data)
        if n < OUT_BUFFER:
            self._pending.append(data)
            self._pending_len += n
            self.written += n
            if self._pending_len >= OUT_BUFFER:
                self.flush()
            return n
        self.flush()
        self._write(data)
        self.written += n
        return n

    def flush(self) -> None:
        """Hand what is gathered to the stream (before anything else writes to it)."""
        if self._pending:
            data = b"".join(self._pending) if len(self._pending) > 1 else self._pending[0]
            self._pending.clear()
            self._pending_len = 0
            self._write(data)

    def _write(self, data) -> None:
        try:
            self.raw.write(data)
        except BrokenPipeError:
            raise TargetError("the reader of the output went away (broken pipe)", file=self.label) from None
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise TargetError("no space left on device", file=self.label,
                                  hint="write to a disk with more free space, or extract less") from None
            raise TargetError(f"cannot write: {exc.strerror or exc}", file=self.label) from None


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
            _widen_pipe(self._file)
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
        self._out_fd = _fileno(self._file) if self._stream is self._file and zerocopy.SENDFILE else None
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
            if key in ACL_RECORDS:   # also as the text GNU tar and bsdtar restore with --acls
                text = acl_text(value)
                if text:
                    pax[ACL_RECORDS[key]] = text
        ti.pax_headers = pax
        return ti

    def _header(self, ti: tarfile.TarInfo) -> None:
        self._out.write(self._header_bytes(ti))

    def _header_bytes(self, ti: tarfile.TarInfo) -> bytes:
        return fast_header(ti) or without_hdrcharset(ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))

    # -- items ---------------------------------------------------------------

    def add(self, item: Item) -> None:
        ti = self._info(item)
        content = item.content
        if content is None or ti.type != tarfile.REGTYPE:
            ti.size = 0
            self._header(ti)
            return
        pieces = self._plain(content)
        holes = pieces is None or any(fd == zerocopy.HOLE for fd, _, _ in pieces)
        ranges = sparse_ranges(content) if holes else None   # pieces without a hole: dense
        if ranges is not None and _worth_sparse(ranges, content.size):
            self._add_sparse(ti, item, ranges)
        elif pieces is not None and content.size >= KERNEL_COPY_MIN:
            ti.size = content.size   # stored as is in a local image file: the kernel copies it
            self._header(ti)
            self._send(item, pieces)
        elif pieces is not None and (data := zerocopy.read_pieces(pieces)) is not None:
            ti.size = content.size   # a small file: one pread, one write with its header
            self._out.write(b"".join((self._header_bytes(ti), data, bytes(-len(data) % BLOCKSIZE))))
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

    def _plain(self, content) -> list[zerocopy.Piece] | None:
        """The file as pieces of local image files: copied by the kernel when
        big and the output is a plain fd, else read with one pread each."""
        plain = getattr(content, "plain", None)
        if plain is None or (content.size >= KERNEL_COPY_MIN and self._out_fd is None):
            return None
        return plain()

    def _send(self, item: Item, pieces: list[zerocopy.Piece]) -> None:
        """Copy the pieces with sendfile; where the kernel will not (EINVAL for
        an O_APPEND output, EIO reading the image), the rest goes through the
        buffered path, which reports a damaged file as such."""
        size = item.content.size  # type: ignore[union-attr]
        fd, written = self._out_fd, 0
        try:
            self._out.flush()    # the header (and the small members before it) first
            self._file.flush()
            for src, offset, length in pieces:
                if src == zerocopy.HOLE:
                    zerocopy.write_zeros(fd, length)
                    done = length
                else:
                    done = zerocopy.send(fd, src, offset, length, item.entry.path)
                written += done
                self._out.written += done
                if done < length:
                    break
        except FileReadError:
            self._pad_member(size - written, written)
            raise
        except OSError as exc:   # only the output's errors get here (zerocopy.OUTPUT_ERRORS)
            raise _output_error(exc, self.label) from None
        if written < size:
            self._out_fd = None   # the kernel would not: buffered from now on
            rest = (item.content.read_range(pos, min(CHUNK, size - pos))  # type: ignore[union-attr,misc]
                    for pos in range(written, size, CHUNK))
            self._copy(item, rest, size, written)
        else:
            self._pad(size)

    def _copy(self, item: Item, chunks, size: int, written: int = 0) -> None:
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
        self._out.flush()
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


# POSIX.1e ACLs as the Linux kernel stores them in xattrs (include/uapi/linux/posix_acl_xattr.h):
# u32 version 2, then entries of (u16 tag, u16 perm, u32 id). The text form is
# what GNU tar (xattrs.c: acl_to_text, extra fields removed) writes and reads as
# SCHILY.acl.access/.default: "user::rw-,user:1000:r--,group::r--,mask::r--,other::r--".
ACL_RECORDS = {"system.posix_acl_access": "SCHILY.acl.access",
               "system.posix_acl_default": "SCHILY.acl.default"}
_ACL_TAGS = {0x01: "user", 0x02: "user", 0x04: "group", 0x08: "group", 0x10: "mask", 0x20: "other"}
_ACL_QUALIFIED = (0x02, 0x08)


def acl_text(blob: bytes) -> str | None:
    """The short text form of a Linux ACL xattr; None when it is not one."""
    if len(blob) < 4 or (len(blob) - 4) % 8 or int.from_bytes(blob[:4], "little") != 2:
        return None
    entries = []
    for pos in range(4, len(blob), 8):
        tag = int.from_bytes(blob[pos:pos + 2], "little")
        perm = int.from_bytes(blob[pos + 2:pos + 4], "little")
        if tag not in _ACL_TAGS:
            return None
        who = str(int.from_bytes(blob[pos + 4:pos + 8], "little")) if tag in _ACL_QUALIFIED else ""
        rwx = "".join(c if perm & bit else "-" for c, bit in (("r", 4), ("w", 2), ("x", 1)))
        entries.append(f"{_ACL_TAGS[tag]}:{who}:{rwx}")
    return ",".join(entries) or None


_HDRCHARSET = b"21 hdrcharset=BINARY\n"
# where a short raw name can go instead: ustar name, linkname, uname, gname (offset, size)
_USTAR_FIELDS = {b"path": (0, 100), b"linkpath": (157, 100), b"uname": (265, 32), b"gname": (297, 32)}


def _utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _checksum(head: bytearray) -> None:
    head[148:156] = b"        "
    head[148:155] = b"%06o\0" % sum(head)


def without_hdrcharset(buf: bytes) -> bytes:
    """tarfile marks a PAX header holding non-UTF-8 bytes (a binary xattr or
    ACL, an undecodable name) with 'hdrcharset=BINARY', which GNU tar (1.34 too)
    warns about for every member ("Ignoring unknown extended header keyword").
    GNU tar and tarfile take xattr values as raw bytes without it; bsdtar does
    too, but wants names in PAX records to be UTF-8. So the record is dropped,
    and an undecodable name or link target moves to the ustar field (up to 100
    bytes) or a GNU long-name record before the member, both raw bytes that all
    three read as they are. An undecodable user or group name goes raw into
    the ustar field (32 bytes, raw bytes for all three as well); a longer
    one is dropped, the numeric id kept: every tool then restores by the id."""
    if _HDRCHARSET not in buf[:BLOCKSIZE * 64] or buf[156:157] != tarfile.XHDTYPE:
        return buf
    size = int(buf[124:136].rstrip(b"\0 ") or b"0", 8)
    data = buf[BLOCKSIZE:BLOCKSIZE + size]
    member = bytearray(buf[BLOCKSIZE + size + (-size) % BLOCKSIZE:])
    records: list[bytes] = []
    pos = 0
    while pos < len(data):   # "LEN key=value\n", LEN counting the whole record
        length = int(data[pos:data.index(b" ", pos)])
        records.append(data[pos:pos + length])
        pos += length
    keep: list[bytes] = []
    long_names = b""
    for record in records:
        key, _, value = record[record.index(b" ") + 1:-1].partition(b"=")
        if key == b"hdrcharset":
            continue
        field = _USTAR_FIELDS.get(key)
        if field and not _utf8(value) and b"\0" not in value:
            at, size = field
            if len(value) <= size:   # raw in the ustar field
                member[at:at + size] = value.ljust(size, b"\0")
            elif key in (b"path", b"linkpath"):   # GNU long-name record: raw bytes for all three
                long_names += tarfile.TarInfo._create_gnu_long_header(
                    os.fsdecode(value), tarfile.GNUTYPE_LONGNAME if key == b"path"
                    else tarfile.GNUTYPE_LONGLINK, "utf-8", "surrogateescape")
            else:   # a user/group name over 32 bytes: dropped; restored by the numeric id
                member[at:at + size] = bytes(size)
            continue
        keep.append(record)
    if len(member) >= BLOCKSIZE:
        head_block = bytearray(member[:BLOCKSIZE])
        _checksum(head_block)
        member[:BLOCKSIZE] = head_block
    if not keep:
        return long_names + bytes(member)
    records_out = b"".join(keep)
    head = bytearray(buf[:BLOCKSIZE])
    head[124:136] = b"%011o\0" % len(records_out)
    _checksum(head)
    return bytes(head) + records_out + bytes((-len(records_out)) % BLOCKSIZE) + long_names + bytes(member)


def _widen_pipe(stream) -> None:
    """A pipe to the reader (`-o - | ...`) widened from 64 KiB to 1 MiB where
    Linux allows: the two sides take turns once a megabyte, not once per
    64 KiB. Best effort: anything else is left as it is."""
    fd = _fileno(stream)
    if fd is None or not sys.platform.startswith("linux"):
        return
    import fcntl
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), OUT_BUFFER)
    except OSError:
        pass


def _fileno(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):   # io.UnsupportedOperation is both
        return None


def _output_error(exc: OSError, label: str) -> TargetError:
    if exc.errno == errno.EPIPE:
        return TargetError("the reader of the output went away (broken pipe)", file=label)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return TargetError("no space left on device", file=label,
                           hint="write to a disk with more free space, or extract less")
    return TargetError(f"cannot write: {exc.strerror or exc}", file=label)


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
    the bytes are identical to `ti.tobuf(PAX_FORMAT)`. PAX records of UTF-8
    text (a nanosecond mtime, text xattrs) are written here too: every file of
    a filesystem with nanosecond times has one."""
    pax = _pax_block(ti.pax_headers) if ti.pax_headers else b""
    if pax is None:
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
        major, minor = b"%07o\0" % ti.devmajor, b"%07o\0" % ti.devminor
    else:
        major = minor = b""
    buf = _USTAR.pack(raw_name, b"%07o\0" % (ti.mode & 0o7777), b"%07o\0" % ti.uid, b"%07o\0" % ti.gid,
                      b"%011o\0" % ti.size, b"%011o\0" % ti.mtime, b"        ", ti.type, link, tarfile.POSIX_MAGIC,
                      user, group, major, minor)
    return pax + buf[:148] + b"%06o\0" % _byte_sum(buf) + buf[155:]


def _pax_block(records: dict[str, str]) -> bytes | None:
    """The extended header tarfile writes before a member for `records`
    ("././@PaxHeader", type x, records padded to blocks), or None when a value
    is not UTF-8 text (tarfile's hdrcharset case, left to it)."""
    out = []
    try:
        for keyword, value in records.items():
            key, val = keyword.encode("utf-8"), value.encode("utf-8")
            length = len(key) + len(val) + 3   # ' ' + '=' + '\n'
            total = length + len(str(length))
            if len(str(total)) != len(str(length)):   # the length counts its own digits
                total = length + len(str(total))
            out.append(b"%d %s=%s\n" % (total, key, val))
    except UnicodeEncodeError:
        return None
    data = b"".join(out)
    size = b"%011o\0" % len(data)   # the only field of the header that varies
    return b"".join((_PAX_NAME_TO_GID, size, _PAX_MTIME, b"%06o\0" % (_PAX_SUM + sum(size)), _PAX_REST,
                     data, bytes(-len(data) % BLOCKSIZE)))


# The ustar header as one struct ("s" fields are NUL-padded): name, mode, uid, gid,
# size, mtime, chksum, typeflag, linkname, magic+version, uname, gname, devmajor,
# devminor, then prefix and padding left NUL.
_USTAR = struct.Struct("100s8s8s8s12s12s8sc100s8s32s32s8s8s167x")
# The extended header before a member with PAX records (see _pax_block).
_PAX_HEAD = _USTAR.pack(b"././@PaxHeader", b"0000000\0", b"0000000\0", b"0000000\0", b"", b"00000000000\0",
                        b"        ", tarfile.XHDTYPE, b"", tarfile.POSIX_MAGIC, b"", b"", b"", b"")
_PAX_NAME_TO_GID, _PAX_MTIME, _PAX_REST = _PAX_HEAD[:124], _PAX_HEAD[136:148], _PAX_HEAD[155:]
_PAX_SUM = sum(_PAX_HEAD)   # the size field (NULs here) adds its own digits


def _byte_sum(block: bytes) -> int:
    """The sum of a 512-byte block's bytes (the tar checksum): Adler-32's low
    half is 1 + the byte sum modulo 65521, exact for 256 bytes (at most 65280);
    sum() over the block costs ten times more, per member."""
    view = memoryview(block)
    return (zlib.adler32(view[:256]) & 0xFFFF) + (zlib.adler32(view[256:]) & 0xFFFF) - 2
