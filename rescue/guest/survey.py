"""Reading a guest's tree as a survey: what cannot be read is simply absent.

`inspect` looks for what is worth rescuing (valuables.py), the container
engines' records (apps.py) and databases (databases.py). None of that may
stop on one unreadable path, so these readers answer None, [] or False where
the filesystem raises, and size a tree with a bounded walk: past the budget
the counts are lower bounds ("at least"), so a huge tree keeps inspect fast.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Iterator

from ..errors import RescueError
from ..fs.base import DIR, FILE, Entry, FileSystem

WALK_BUDGET = 10_000   # entries listed per tree sized (keeps inspect under seconds)


def stat(fs: FileSystem, path: str) -> Entry | None:
    try:
        return fs.stat(path)
    except (RescueError, OSError):
        return None


def resolve(fs: FileSystem, path: str) -> Entry | None:
    """The entry at `path` with symlinks followed inside the guest, or None."""
    try:
        return fs.resolve(path)
    except (RescueError, OSError):
        return None


def listdir(fs: FileSystem, path: str) -> list[Entry]:
    """The entries of a directory sorted by name ([] when it cannot be listed)."""
    try:
        return sorted(fs.listdir(path), key=lambda e: e.name)
    except (RescueError, OSError):
        return []


def names(fs: FileSystem, path: str) -> dict[str, Entry]:
    """{name: entry} of a directory ({} when it cannot be listed)."""
    try:
        return {e.name: e for e in fs.listdir(path)}
    except (RescueError, OSError):
        return {}


def is_dir(fs: FileSystem, path: str) -> bool:
    entry = stat(fs, path)
    return entry is not None and entry.kind == DIR


def subdirs(fs: FileSystem, path: str) -> list[Entry]:
    """The directories in `path`, sorted by name."""
    if not is_dir(fs, path):
        return []
    return [e for e in listdir(fs, path) if e.kind == DIR]


def glob_dirs(fs: FileSystem, pattern: str) -> list[str]:
    """Directories matching a pattern whose only wildcards are whole '*' parts."""
    paths = ["/"]
    for part in pattern.strip("/").split("/"):
        if part == "*":
            paths = [e.path for p in paths for e in subdirs(fs, p)]
        else:
            paths = [q for q in (posixpath.join(p, part) for p in paths) if is_dir(fs, q)]
    return paths


def walk(fs: FileSystem, top: str) -> Iterator[Entry]:
    """Entries below `top`; unreadable directories are skipped, each directory
    (by device and inode) is entered once."""
    stack = [top]
    seen: set[tuple[int, int]] = set()
    while stack:
        path = stack.pop()
        try:
            children = fs.listdir(path)
        except (RescueError, OSError):
            continue
        for child in children:
            yield child
            if child.kind == DIR and (child.dev, child.inode) not in seen:
                seen.add((child.dev, child.inode))
                stack.append(child.path)


@dataclass
class Size:
    files: int = 0
    bytes: int = 0               # apparent size (sum of file sizes)
    allocated: int = 0           # what the files hold (holes not counted)
    complete: bool = True        # False: walk budget ran out (lower bounds)


def measure(fs: FileSystem, path: str, budget: int = WALK_BUDGET) -> Size:
    """Files and bytes below `path`, from a walk of at most `budget` entries
    (past it, `complete` is False and the counts are lower bounds)."""
    size = Size()
    left = budget
    for entry in walk(fs, path):
        if left <= 0:
            size.complete = False
            break
        left -= 1
        if entry.kind == FILE:
            size.files += 1
            size.bytes += entry.size
            size.allocated += allocated_bytes(fs, entry)
    return size


def allocated_bytes(fs: FileSystem, entry: Entry) -> int:
    """What a file really holds: the sum of its data ranges (a 1 GiB sparse
    file with 4 KiB written is 4 KiB), its size when the backend has no map."""
    try:
        ranges = fs.data_ranges(entry)
    except (RescueError, OSError):
        return entry.size
    if ranges is None:
        return entry.size
    return min(entry.size, sum(length for _, length in ranges))
