"""zip and zip64 (PKWARE APPNOTE 6.3.10): the central directory read by the
stdlib `zipfile`; a stored member is a window onto the file, a deflate member
is framed as gzip and read by the gzip codec, a bzip2 member by the bzip2 codec."""

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


def detect(source: ByteSource) -> bool:
    return source.read(0, 4) in (b"PK\x03\x04", b"PK\x05\x06")


def open(source: ByteSource, **_ignored) -> list[Member]:   # noqa: A001
    """The member table, from the central directory and each member's local header."""
    import zipfile
    members = []
    try:
        with zipfile.ZipFile(SourceFile(source)) as zf:
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
    if m.method == ZIP_DEFLATED:
        raw, codec = deflate_as_gzip(raw, m.crc, m.size), "gzip"
    elif m.method == ZIP_BZIP2:
        codec = "bzip2"
    else:
        raise SourceError(f"zip member {m.name!r} uses compression method {m.method}, "
                          f"which rescue does not read (only stored, deflate, bzip2)",
                          file=source.name, hint="unpack it with unzip or 7z")
    return open_compressed(raw, codec, cache=cache, name=name, cache_name=f"zip-{index}", size_hint=m.size)
