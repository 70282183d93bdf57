"""Source layer: where the snapshot's bytes live (local file, URL, archive member)."""

from .base import ByteSource, BytesSource, FileSource, Run, Window, open_relative, runs
from .open import open_source

__all__ = ["ByteSource", "BytesSource", "FileSource", "Run", "Window", "open_relative",
           "open_source", "runs"]
