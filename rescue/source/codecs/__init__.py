"""Compressed streams read in place, with random access and a cached seek index.

References: RFC 1952 (gzip), RFC 1951 (deflate), RFC 8878 (Zstandard frames),
the .xz file format 1.1.0, bzip2 (Seward). We write no decompressor and no
gzip index of our own: gzip (and zip deflate members) through indexed_gzip,
zstd through python-zstandard, xz through python-xz, bzip2 through the stdlib.

`CODECS` is the registry: modules with `NAME`, `detect(source)` (magic bytes
at offset 0) and `open(source, **options)` returning a `CompressedSource`
(codecs/base.py: the chunk cache and what every codec shares).
"""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

from ...errors import SourceError
from ..base import ByteSource
from ..cache import IndexCache
from .base import STATS, CompressedSource, Progress

# Module names under rescue.source.codecs, tried in order; each codec registers here.
CODECS: list[str] = ["gzip", "zstd", "xz", "bzip2"]


def _codec(name: str) -> ModuleType:
    return import_module(f"{__name__}.{name}")


def detect_codec(source: ByteSource) -> str | None:
    """The codec `source` is compressed with, or None."""
    for name in CODECS:
        if _codec(name).detect(source):
            return name
    return None


def open_compressed(source: ByteSource, codec: str, *, cache: IndexCache | None = None,
                    progress: Progress | None = None, name: str | None = None,
                    cache_name: str = "stream", size_hint: int | None = None,
                    partial: bool = False) -> CompressedSource:
    """A random-access decompressed view of `source` compressed with `codec`;
    `partial`: a gzip, zstd, xz or bzip2 stream cut short is read up to the cut (a note says so)."""
    if codec not in CODECS:
        raise SourceError(f"unknown compression {codec!r}", file=source.name)
    return _codec(codec).open(source, cache=cache, progress=progress, name=name, cache_name=cache_name,
                              size_hint=size_hint, partial=partial)


__all__ = ["CODECS", "STATS", "CompressedSource", "Progress", "detect_codec", "open_compressed"]
