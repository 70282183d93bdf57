"""Helpers for the XFS tests: the native reader's view of an image in the same
record shape as scripts/xfs_trees.kernel_view, and a readable comparison."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from repo_paths import REPO
sys.path.insert(0, str(REPO / "scripts"))
import xfs_trees  # noqa: E402

from kernel_view_support import view_differences  # noqa: E402
from rescue.fs.base import FileSystem  # noqa: E402


def reader_view(fs: FileSystem, with_data: bool = True) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for e in fs.walk("/"):
        digest = None
        if e.kind == "file" and with_data:
            h = hashlib.sha256()
            for chunk in fs.read_chunks(e):
                h.update(chunk)
            digest = h.hexdigest()
        out[e.path] = (e.kind, e.mode, e.uid, e.gid, e.size, e.mtime_ns, e.ctime_ns, e.nlink, e.inode,
                       e.link_target, e.rdev, fs.xattrs(e), digest)
    return out


FIELDS = ("kind", "mode", "uid", "gid", "size", "mtime_ns", "ctime_ns", "nlink", "inode", "target",
          "rdev", "xattrs", "sha256")


def differences(expected: dict[str, tuple], got: dict[str, tuple], limit: int = 20) -> list[str]:
    return view_differences(FIELDS, expected, got, limit)


def forms(fs) -> set[str]:
    """Which on-disk forms an XFS image exercises (so a test can show it covered them):
    dir:shortform/block/leaf/node/btree, file:extents/btree/bmbt-levels-N, unwritten,
    symlink:inline/remote, attr:shortform/leaf/node/remote."""
    import struct

    from rescue.fs.xfs.structs import DIR2_LEAF_OFFSET

    seen: set[str] = set()
    reader = fs.reader
    for e in fs.walk("/"):
        inode = reader.inode(e.inode)
        fmt = inode.data_format
        if e.kind == "dir":
            if fmt == 1:
                seen.add("dir:shortform")
            else:
                if fmt == 3:
                    seen.add("dir:btree")
                exts = reader.extents(inode)
                leaf = [x for x in exts if x.offset << fs.sb.block_log >= DIR2_LEAF_OFFSET]
                if not leaf:
                    seen.add("dir:block")
                else:
                    block = reader.read_fsb(leaf[0].block, 1, "leaf")
                    magic = struct.unpack_from(">H", block, 8)[0]
                    seen.add("dir:leaf" if magic in (0xD2F1, 0x3DF1) else "dir:node")
        elif e.kind == "file" and fmt in (2, 3):
            seen.add("file:extents" if fmt == 2 else "file:btree")
            if fmt == 3:
                seen.add(f"bmbt-levels-{struct.unpack_from('>H', inode.data_fork)[0]}")
            if any(x.unwritten for x in reader.extents(inode)):
                seen.add("unwritten")
        elif e.kind == "symlink":
            seen.add("symlink:inline" if fmt == 1 else "symlink:remote")
        if inode.forkoff:
            if inode.attr_format == 1:
                seen.add("attr:shortform")
            elif inode.anextents:
                exts = reader.extents(inode, attr=True)
                block = reader.read_mapped(exts, 0, 1, "attr")
                magic = struct.unpack_from(">H", block, 8)[0]
                seen.add("attr:node" if magic in (0xFEBE, 0x3EBE) else "attr:leaf")
                if sum(x.count for x in exts) > 1 and magic in (0xFBEE, 0x3BEE):
                    seen.add("attr:remote")
    return seen
