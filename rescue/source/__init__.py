"""Source layer: where the snapshot's bytes live (local file, URL, archive member).

`open_source` is imported on first use: `rescue --help` and the layers that
only need the byte-source interface do not pay for the archive and codec modules.
"""

from __future__ import annotations

from typing import Any

from .base import ByteSource, BytesSource, FileSource, Run, Window, open_relative, runs


def open_source(spec: str, *args: Any, **kwargs: Any) -> ByteSource:
    """See `rescue.source.open.open_source`."""
    from .open import open_source as opener
    return opener(spec, *args, **kwargs)


__all__ = ["ByteSource", "BytesSource", "FileSource", "Run", "Window", "open_relative",
           "open_source", "runs"]
