"""xz (the .xz file format 1.1.0) through python-xz, which seeks by xz block
from the stream's own index (no scan, nothing cached)."""

from __future__ import annotations

from ...errors import BAD_BYTES, DamagedRange, describe, is_bad_bytes
from ..base import ByteSource
from ..fileobj import SourceFile
from .base import CACHE_CHUNK, SINGLE_BLOCK_WARNING, ChunkCache, CompressedSource

NAME = "xz"


def detect(source: ByteSource) -> bool:
    return source.read(0, 6) == b"\xfd7zXZ\x00"


def open(source: ByteSource, *, name: str | None = None, **_ignored) -> CompressedSource:   # noqa: A001
    return XzSource(source, name=name)


class XzSource(CompressedSource):
    """xz through python-xz (block-level seeking from the xz index)."""

    codec = "xz"

    def __init__(self, source: ByteSource, *, name: str | None = None, **_ignored) -> None:
        import xz  # python-xz (this module is rescue.source.codecs.xz)
        super().__init__(source, name)
        try:
            self._f = xz.open(SourceFile(source), "rb")
            self.size = len(self._f)
            blocks = len(self._f.block_boundaries)
        except BAD_BYTES as exc:   # XZError, LZMAError, and OSError for a seek before the start
            if not is_bad_bytes(exc):
                raise
            raise self._error(f"xz data is damaged or truncated: {describe(exc)}",
                              hint="re-download the snapshot and compare its checksum") from None
        if blocks <= 1 and self.size > SINGLE_BLOCK_WARNING:
            self._note_single_block("xz stream has a single block")
        self._cache = ChunkCache(self._fetch)

    def _fetch(self, offset: int) -> bytes:
        try:
            self._f.seek(offset)
            return self._f.read(CACHE_CHUNK)
        except BAD_BYTES as exc:   # XZError "Corrupt input data", LZMAError, EOFError...
            if not is_bad_bytes(exc):
                raise
            raise DamagedRange(f"{self.name}: xz data at {offset}: {describe(exc)}") from None

    def _close_stream(self) -> None:
        try:
            self._f.close()
        except Exception:
            pass
