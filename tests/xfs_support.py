"""Helpers for the XFS tests: the native reader's view of an image in the same
record shape as scripts/xfs_trees.kernel_view, and a readable comparison."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import xfs_trees  # noqa: E402

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
    """Human-readable differences, empty when the views agree."""
    out = []
    for path in sorted(set(expected) | set(got)):
        if path not in got:
            out.append(f"{path!r}: missing from the reader")
        elif path not in expected:
            out.append(f"{path!r}: not in the kernel's view")
        elif expected[path] != got[path]:
            for name, a, b in zip(FIELDS, expected[path], got[path]):
                if a != b and name == "xattrs":
                    for key in sorted(set(a) | set(b)):
                        if a.get(key) != b.get(key):
                            out.append(f"{path!r}: xattr {key} kernel={a.get(key)!r:.120} reader={b.get(key)!r:.120}")
                elif a != b:
                    out.append(f"{path!r}: {name} kernel={a!r:.200} reader={b!r:.200}")
        if len(out) >= limit:
            out.append("...")
            break
    return out
