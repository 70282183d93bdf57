"""Which entries a selection means: --path, --exclude, --strip-components."""

from __future__ import annotations

import fnmatch
import posixpath
from dataclasses import dataclass

from ..errors import GuestPathError
from ..fs.base import DIR, SYMLINK, Entry, FileSystem, normalize
from ..fs.names import escape_name, listed_name, unescape_name

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


@dataclass
class Selection:
    """What a path the user typed selects."""

    shown: str                  # the path as outputs name it: an unwritable last name in ls's escaped form
    entry: Entry
    renamed: str | None = None  # the real last name, when `shown` ends in its replacement


def resolve_selection(fs: FileSystem, path: str) -> tuple[str, Entry]:
    """(shown path, entry) of `select_path`."""
    chosen = select_path(fs, path)
    return chosen.shown, chosen.entry


def select_path(fs: FileSystem, path: str) -> Selection:
    """The entry the user means by `path`: symlinked parent directories are
    followed inside the guest (so /var/lib/docker -> /srv/docker works), and a
    symlink named itself is followed when it points at a directory.

    A component may be written as `rescue ls` shows it (fs/names.py): a
    crafted name holding '/' or NUL ('..\\x2f..\\x2fesc') is then found by
    listing its directory, and `shown` keeps the escaped form, so the output
    holds it as one safe name (reported as renamed by the caller). A path
    whose escapes match nothing is tried once more as typed."""
    escaped = [part for part in normalize(path).split("/") if part]
    names = [unescape_name(part) for part in escaped]
    if names == escaped:
        return _select(fs, names)
    try:
        return _select(fs, names)
    except GuestPathError as meant:
        try:
            return _select(fs, escaped)   # a name that really holds a backslash, typed as is
        except GuestPathError:
            raise meant from None


def select_file(fs: FileSystem, path: str) -> Entry:
    """What `cat` reads for `path`: `select_path`'s entry with symlinks
    followed inside the guest (a link's target is resolved from its directory)."""
    chosen = select_path(fs, path)
    entry = chosen.entry
    if entry.kind != SYMLINK:
        return entry
    if chosen.renamed is None:
        return fs.resolve(entry.path)
    directory = entry.path[:len(entry.path) - len(chosen.renamed)]   # its name may hold '/'
    return fs.resolve(posixpath.join(directory, entry.link_target or ""))


def _select(fs: FileSystem, names: list[str]) -> Selection:
    unsafe = [i for i, name in enumerate(names) if unsafe_name(name)]
    if not unsafe:
        return _resolve(fs, "/" + "/".join(names))
    shown = "/" + "/".join(escape_name(name) for name in names)
    if unsafe[0] != len(names) - 1:
        raise GuestPathError(f"{shown}: nothing below a name holding '/' or NUL can be reached by path",
                             file=getattr(fs, "name", None))
    parent = fs.resolve("/" + "/".join(names[:-1]))
    if parent.kind != DIR:
        raise GuestPathError(f"not a directory: /{'/'.join(names[:-1])}", file=getattr(fs, "name", None))
    for child in fs.listdir(parent.path):
        if listed_name(parent.path, child.path) == names[-1]:
            if child.kind == DIR:   # readers find a directory's entries by path: this one has none
                raise GuestPathError(f"{shown}: a directory whose name holds '/' or NUL cannot be walked "
                                     "(readers find entries by path)", file=getattr(fs, "name", None))
            return Selection(shown, child, renamed=names[-1])
    raise GuestPathError(f"no such file or directory: {shown}", file=getattr(fs, "name", None))


def _resolve(fs: FileSystem, path: str) -> Selection:
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
                return Selection(path, target)
        except Exception:
            pass
    return Selection(path, entry)


def output_name(guest_path: str, strip: int) -> str | None:
    """The member name for a guest path ('/etc/x' -> 'etc/x'), after stripping
    leading components; None when nothing is left (as tar skips it)."""
    parts = [p for p in guest_path.split("/") if p]
    if strip:
        parts = parts[strip:]
    if not parts:
        return None
    return "/".join(parts)
