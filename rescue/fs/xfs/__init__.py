"""Native read-only XFS reader (see filesystem.py)."""

from .filesystem import XfsFileSystem

__all__ = ["XfsFileSystem"]
