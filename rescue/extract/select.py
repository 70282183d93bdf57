"""Which entries a selection means: --path, --exclude, --strip-components."""

from __future__ import annotations

import fnmatch
import posixpath

from ..errors import GuestPathError
from ..fs.base import DIR, SYMLINK, Entry, FileSystem, normalize

UNSAFE_NAME_CHARS = ("/", "\0")


def unsafe_name(name: str) -> str | None:
    """Why a name from the image cannot become a path component, or None."""
    if name in ("", ".", ".."):
        return f"name {name!r} is not a file name"
    for ch in UNSAFE_NAME_CHARS:
        if ch in name:
            return f"name {name!r} contains {ch!r}"
    return None


def excluded(path: str, patterns: list[str]) -> bool:
    """tar-like --exclude: a pattern without '/' matches any name along the
    path; one with '/' matches the whole path (leading '/' optional)."""
    if not patterns:
        return False
    rel = path.lstrip("/")
    names = rel.split("/")
    for pattern in patterns:
        if "/" in pattern.strip("/"):
            if fnmatch.fnmatchcase(rel, pattern.strip("/")) or fnmatch.fnmatchcase(rel, pattern.strip("/") + "/*"):
                return True
        elif any(fnmatch.fnmatchcase(n, pattern.strip("/")) for n in names):
            return True
    return False


def resolve_selection(fs: FileSystem, path: str) -> tuple[str, Entry]:
    """The entry the user means by `path`: symlinked parent directories are
    followed inside the guest (so /var/lib/docker -> /srv/docker works), and a
    symlink named itself is followed when it points at a directory."""
    path = normalize(path)
    parent, name = posixpath.split(path)
    if name:
        parent_entry = fs.resolve(parent)
        if parent_entry.kind != DIR:
            raise GuestPathError(f"not a directory: {parent}")
        real = posixpath.join(parent_entry.path, name)
    else:
        real = "/"
    entry = fs.stat(real)
    if entry.kind == SYMLINK:
        try:
            target = fs.resolve(real)
            if target.kind == DIR:
                return path, target
        except Exception:
            pass
    return path, entry


def output_name(guest_path: str, strip: int) -> str | None:
    """The member name for a guest path ('/etc/x' -> 'etc/x'), after stripping
    leading components; None when nothing is left (as tar skips it)."""
    parts = [p for p in guest_path.split("/") if p]
    if strip:
        parts = parts[strip:]
    if not parts:
        return None
    return "/".join(parts)
