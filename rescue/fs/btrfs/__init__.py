"""Native read-only btrfs reader (see filesystem.py)."""

from .filesystem import BtrfsFileSystem

__all__ = ["BtrfsFileSystem"]
