"""zip and zip64 (PKWARE APPNOTE 6.3.10): the central directory read by the
stdlib `zipfile`; a stored member is a window onto the file, a deflate member
is framed as gzip and read by the gzip codec, a bzip2 member by the bzip2 codec.

A zip cut short (an interrupted download) has lost its central directory,
which sits at the end: its members are then found by walking the local
headers from the start (APPNOTE 4.3.7-4.3.9, data descriptors included). That
is refused in one line saying where the data stops; with --partial the whole
members are read, and a stored or deflate member cut by the end is read as
far as its data goes (deflate: everything decompressed before the cut)."""

from __future__ import annotations

from construct import Const, Int16ul, Int32ul, Struct

from ...errors import BAD_BYTES, SourceError, describe, is_bad_bytes
from ..base import ByteSource, Window
from ..cache import IndexCache
from ..codecs import open_compressed
from ..codecs.gzip import deflate_as_gzip
from ..fileobj import SourceFile
from .base import MAX_MEMBERS, Member

NAME = "zip"
IN_STREAM = False   # a zip is never read inside a compressed stream

# APPNOTE 4.3.7: the local header precedes each member's data; its name and
# extra lengths may differ from the central directory's, so we read it.
ZipLocalHeader = Struct(
    "signature" / Const(b"PK\x03\x04"),
    "version" / Int16ul,
    "flags" / Int16ul,
    "method" / Int16ul,
    "mtime" / Int16ul,
    "mdate" / Int16ul,
    "crc32" / Int32ul,
    "compressed_size" / Int32ul,
    "uncompressed_size" / Int32ul,
    "name_length" / Int16ul,
    "extra_length" / Int16ul,
)
ZIP_LOCAL_HEADER_SIZE = 30
ZIP_STORED, ZIP_DEFLATED, ZIP_BZIP2 = 0, 8, 12
ZIP_LOCAL, ZIP_CENTRAL, ZIP_DESCRIPTOR = b"PK\x03\x04", b"PK\x01\x02", b"PK\x07\x08"
FLAG_ENCRYPTED, FLAG_DESCRIPTOR = 0x1, 0x8   # APPNOTE 4.4.4 general purpose bits 0 and 3
ZIP64_EXTRA = 0x0001                         # APPNOTE 4.5.3: sizes that do not fit 32 bits
TRUNCATED_HINT = ("download it again (`rescue download` resumes), or add --partial to rescue "
                  "what lies before the cut")


def detect(source: ByteSource) -> bool:
    return source.read(0, 4) in (b"PK\x03\x04", b"PK\x05\x06")


def open(source: ByteSource, *, partial: bool = False, notes: list[str] | None = None,   # noqa: A001
         **_ignored) -> list[Member]:
    """The member table, from the central directory and each member's local
    header; without a central directory (a zip cut short), from the local headers."""
    import zipfile
    members = []
    try:
        try:
            zf = zipfile.ZipFile(SourceFile(source))
        except zipfile.BadZipFile:
            if source.read(0, 4) != ZIP_LOCAL or _has_end_record(source):
                raise   # not a zip, or its directory is damaged rather than cut off
            return _open_cut(source, partial, notes)
        with zf:
            infos = zf.infolist()
            if len(infos) > MAX_MEMBERS:
                raise SourceError(f"zip holds {len(infos)} members; this is not a disk snapshot",
                                  file=source.name)
            for number, info in enumerate(infos, 1):
                if not info.filename:
                    raise SourceError(f"zip member {number} has an empty name", file=source.name,
                                      hint="the zip is damaged; unpack what is readable with unzip or 7z")
                kind = "dir" if info.is_dir() else "file"
                offset = 0
                if kind == "file":
                    if info.flag_bits & 0x1:
                        raise SourceError(f"zip member {info.filename!r} is encrypted",
                                          file=source.name, hint="unpack it with the password first")
                    if info.header_offset < 0 or info.compress_size < 0:   # a central directory offset
                        raise SourceError(f"zip member {info.filename!r} lies before the start of the "  # too large
                                          f"file (local header at {info.header_offset})", file=source.name,
                                          hint="the zip is damaged or truncated at its start")
                    raw = source.read(info.header_offset, ZIP_LOCAL_HEADER_SIZE)
                    try:
                        head = ZipLocalHeader.parse(raw)
                    except Exception:
                        raise SourceError(f"zip member {info.filename!r}: no local header at byte "
                                          f"{info.header_offset}", file=source.name) from None
                    offset = (info.header_offset + ZIP_LOCAL_HEADER_SIZE + head.name_length
                              + head.extra_length)
                    if offset + info.compress_size > source.size:
                        raise SourceError(f"zip archive is truncated: member {info.filename!r} "
                                          f"needs bytes up to {offset + info.compress_size}",
                                          file=source.name)
                members.append(Member(name=info.filename, size=info.file_size, type=kind,
                                      offset=offset, stored=info.compress_size,
                                      method=info.compress_type, crc=info.CRC))
    except BAD_BYTES as exc:
        if not is_bad_bytes(exc):
            raise
        raise SourceError(f"zip archive is damaged: {describe(exc)}", file=source.name,
                          hint="re-download the snapshot and compare its checksum") from None
    return members


def open_member(source: ByteSource, m: Member, *, cache: IndexCache, name: str, index: int) -> ByteSource | None:
    """A compressed member's decompressed bytes (None for a stored one: a window does)."""
    if m.method == ZIP_STORED:
        return None
    raw: ByteSource = Window(source, m.offset, m.stored, name=name)
    if m.method == ZIP_DEFLATED and m.cut:   # --partial: no trailer to check, decoded up to the cut
        stream = open_compressed(deflate_as_gzip(raw, None, m.size), "gzip", name=name,
                                 size_hint=m.size, partial=True)
        stream.size = min(stream.size, m.size)
        return stream
    if m.method == ZIP_DEFLATED:
        raw, codec = deflate_as_gzip(raw, m.crc, m.size), "gzip"
    elif m.method == ZIP_BZIP2:
        codec = "bzip2"
    else:
        raise SourceError(f"zip member {m.name!r} uses compression method {m.method}, "
                          f"which rescue does not read (only stored, deflate, bzip2)",
                          file=source.name, hint="unpack it with unzip or 7z")
    return open_compressed(raw, codec, cache=cache, name=name, cache_name=f"zip-{index}", size_hint=m.size)


# -- a zip cut short: the members from the local headers -------------------------------------


class _Scan:
    """What walking the local headers found: whole members, and the one the end cuts."""

    def __init__(self) -> None:
        self.members: list[Member] = []
        self.cut: Member | None = None        # the member whose data the end of the file cuts
        self.cut_needs: int | None = None     # where its data should end, when the header says
        self.lost: str | None = None          # a member that cannot be read at all: why
        self.directory = False                # the central directory starts before the end


def _has_end_record(source: ByteSource) -> bool:
    """APPNOTE 4.3.16: the end of central directory record lies in the last
    22 bytes + a comment of up to 64 KiB; a cut file has lost it."""
    at = max(0, source.size - (22 + 0xFFFF))
    tail = source.read(at, source.size - at)
    found = tail.rfind(b"PK\x05\x06")
    while found >= 0:
        comment = int.from_bytes(tail[found + 20:found + 22], "little")
        if found + 22 <= len(tail) and found + 22 + comment <= len(tail):   # whole, comment included
            return True
        found = tail.rfind(b"PK\x05\x06", 0, found)
    return False


def _open_cut(source: ByteSource, partial: bool, notes: list[str] | None) -> list[Member]:
    total = source.size
    scan = _scan_local(source)
    whole = len(scan.members)
    if scan.directory:
        where = "the central directory is cut short; every member's data is there"
    elif scan.cut is not None and scan.cut_needs is not None:
        where = (f"member {scan.cut.name!r} is cut short: its data runs from byte {scan.cut.offset} to "
                 f"{scan.cut_needs}, {scan.cut_needs - total} bytes are missing")
    elif scan.cut is not None:
        where = (f"member {scan.cut.name!r} is cut short: its data starts at byte {scan.cut.offset} "
                 f"and does not end before the end of the file")
    else:
        where = scan.lost or "the local header of the next member is cut short"
    problem = (f"zip archive is truncated: the file ends at byte {total} without its central "
               f"directory; {whole} whole member{'s' if whole != 1 else ''} before the cut, {where}")
    if not partial or not (scan.members or scan.cut):
        raise SourceError(problem, file=source.name, hint=TRUNCATED_HINT)
    if notes is not None:
        notes.append(f"{problem} (--partial: reading what is there)")
    members = list(scan.members)
    cut = scan.cut
    if cut is not None:
        if cut.method == ZIP_STORED:
            cut.size = cut.stored = total - cut.offset
        elif cut.method == ZIP_DEFLATED:
            cut.stored = total - cut.offset
            cut.size = _inflate(source, cut.offset, cut.stored)[1]
        else:
            cut = None
            if notes is not None:
                notes.append(f"zip member {scan.cut.name!r} is lost: it is cut short and compressed with "
                             f"method {scan.cut.method}, which rescue reads only whole")
    if cut is not None:
        cut.cut = True
        members.append(cut)
        if notes is not None:
            notes.append(f"zip member {cut.name!r} is cut short: {cut.size} bytes of it are usable "
                         f"(--partial: reading those)")
    return members


def _scan_local(source: ByteSource) -> _Scan:
    """Walk the local headers from the start of the file (one step per member)."""
    total, pos, scan = source.size, 0, _Scan()
    while pos + 4 <= total and len(scan.members) < MAX_MEMBERS:
        magic = source.read(pos, 4)
        if magic == ZIP_CENTRAL:
            scan.directory = True
            break
        if magic != ZIP_LOCAL:
            scan.lost = f"no local header at byte {pos} (found {magic.hex()}): the rest is damaged"
            break
        raw = source.read(pos, ZIP_LOCAL_HEADER_SIZE)
        if len(raw) < ZIP_LOCAL_HEADER_SIZE:
            break
        head = ZipLocalHeader.parse(raw)
        data_at = pos + ZIP_LOCAL_HEADER_SIZE + head.name_length + head.extra_length
        if data_at > total:
            break   # the cut falls in this header: nothing of the member is there
        name = source.read(pos + ZIP_LOCAL_HEADER_SIZE, head.name_length).decode(
            "utf-8" if head.flags & 0x800 else "cp437", "replace")
        if not name:
            scan.lost = f"the member at byte {pos} has an empty name: the rest is damaged"
            break
        if head.flags & FLAG_ENCRYPTED:
            scan.lost = f"member {name!r} is encrypted"
            break
        csize, usize = _zip64_sizes(source.read(data_at - head.extra_length, head.extra_length),
                                    head.compressed_size, head.uncompressed_size)
        member = Member(name=name, size=usize, type="dir" if name.endswith("/") else "file",
                        offset=data_at, stored=csize, method=head.method, crc=head.crc32)
        if head.flags & FLAG_DESCRIPTOR:   # sizes and CRC follow the data: find its end
            end = _data_end(source, member)
            if end is None:
                scan.cut = member
                break
            pos = _after_descriptor(source, member, end, zip64=csize != head.compressed_size)
        else:
            end = data_at + csize
            if end > total:
                scan.cut, scan.cut_needs = member, end
                break
            pos = end
        scan.members.append(member)
    return scan


def _zip64_sizes(extra: bytes, csize: int, usize: int) -> tuple[int, int]:
    """APPNOTE 4.5.3: in a local header the zip64 extra holds both sizes when either is 0xFFFFFFFF."""
    at = 0
    while at + 4 <= len(extra):
        tag, length = int.from_bytes(extra[at:at + 2], "little"), int.from_bytes(extra[at + 2:at + 4], "little")
        if tag == ZIP64_EXTRA and length >= 16:
            return (int.from_bytes(extra[at + 12:at + 20], "little"),
                    int.from_bytes(extra[at + 4:at + 12], "little"))
        at += 4 + length
    return csize, usize


def _inflate(source: ByteSource, start: int, length: int) -> tuple[int | None, int, int]:
    """Decode a raw deflate stream once (bounded memory): (bytes it takes or None
    when the end of `length` comes first, bytes it decodes, their CRC-32)."""
    import zlib
    dec, pos, end, produced, crc = zlib.decompressobj(-15), start, start + length, 0, 0
    try:
        while pos < end and not dec.eof:
            chunk = source.read(pos, min(1 << 20, end - pos))
            if not chunk:
                break
            pos += len(chunk)
            while not dec.eof:   # at most 16 MiB out per step: a bomb stays bounded
                out = dec.decompress(chunk, 16 << 20)
                produced += len(out)
                crc = zlib.crc32(out, crc)
                chunk = dec.unconsumed_tail
                if not chunk and len(out) < 16 << 20:
                    break   # all of this input decoded, none pending
    except zlib.error:
        return None, produced, crc   # damage right at the cut: what came before stands
    if dec.eof:
        return pos - len(dec.unused_data) - start, produced, crc
    return None, produced, crc


def _data_end(source: ByteSource, m: Member) -> int | None:
    """Where a member written with a data descriptor (sizes unknown in its local
    header: `zip` or zipfile writing to a pipe) ends; None when the file ends first."""
    total = source.size
    if m.method == ZIP_DEFLATED:
        taken, produced, crc = _inflate(source, m.offset, total - m.offset)
        if taken is None:
            return None
        m.stored, m.size, m.crc = taken, produced, crc
        return m.offset + taken
    if m.method == ZIP_STORED:   # the descriptor whose size field matches the distance
        pos = m.offset
        while pos < total:
            chunk = source.read(pos, 1 << 20)
            at = chunk.find(ZIP_DESCRIPTOR)
            while at >= 0:
                here = pos + at
                fields = source.read(here + 4, 12)
                if len(fields) == 12 and int.from_bytes(fields[4:8], "little") == here - m.offset:
                    m.stored = m.size = here - m.offset
                    m.crc = int.from_bytes(fields[:4], "little")
                    return here
                at = chunk.find(ZIP_DESCRIPTOR, at + 1)
            if len(chunk) < 1 << 20:
                break
            pos += len(chunk) - 3   # a signature may straddle two chunks
        return None
    return None   # another method: its end cannot be found without its decoder


def _after_descriptor(source: ByteSource, m: Member, end: int, zip64: bool) -> int:
    """APPNOTE 4.3.9: [signature] CRC-32, compressed and uncompressed sizes (8 bytes each in zip64)."""
    at = end + (4 if source.read(end, 4) == ZIP_DESCRIPTOR else 0)
    for width in ((8, 4) if zip64 else (4, 8)):
        after = at + 4 + 2 * width
        if source.read(after, 4) in (ZIP_LOCAL, ZIP_CENTRAL) or after >= source.size:
            return after
    return at + 4 + 2 * (8 if zip64 else 4)
