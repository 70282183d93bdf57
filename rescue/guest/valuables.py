"""What is worth rescuing in a Linux server: Docker and Podman volumes, database
directories, web roots, home directories, /etc.

`rescue inspect` lists these so a user in trouble knows which `--path` to pass
without browsing the tree by hand. Detection is by what is on disk (a
PostgreSQL cluster has PG_VERSION, a Docker volume has `_data`), never by
guessing from installed packages. Sizes come from a walk with an entry budget:
a huge tree is reported as "at least" instead of making inspect slow.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any, Iterator

from ..errors import RescueError
from ..fs.base import DIR, FILE, Entry, FileSystem

WALK_BUDGET = 10_000   # entries listed per finding for its size (keeps inspect under seconds)

# Plain directories that matter when they hold anything: (path, what).
PLAIN_DIRS = (
    ("/var/lib/mysql", "MySQL/MariaDB data directory"),
    ("/var/lib/mongodb", "MongoDB data directory"),
    ("/var/lib/mongo", "MongoDB data directory"),
    ("/var/lib/redis", "Redis data directory"),
    ("/var/lib/influxdb", "InfluxDB data directory"),
    ("/var/lib/elasticsearch", "Elasticsearch data directory"),
    ("/var/lib/couchdb", "CouchDB data directory"),
    ("/var/www", "web root"),
    ("/srv", "service data (/srv)"),
    ("/opt", "add-on software and compose projects (/opt)"),
    ("/var/mail", "mailboxes"),
    ("/var/vmail", "mailboxes (virtual users)"),
    ("/var/spool/cron", "crontabs"),
    ("/etc/letsencrypt", "TLS certificates and keys (Let's Encrypt)"),
    ("/root", "root's home directory"),
    ("/etc", "system configuration"),
)
# Container volume stores: one finding per volume.
VOLUME_STORES = (
    ("/var/lib/docker/volumes", "Docker volume"),
    ("/var/lib/containers/storage/volumes", "Podman volume"),
)
# PostgreSQL clusters live at different depths on Debian and Red Hat systems.
POSTGRES_GLOBS = (
    "/var/lib/postgresql/*/*",      # Debian/Ubuntu: <version>/<cluster>
    "/var/lib/pgsql/data",          # RHEL/Fedora, distribution packages
    "/var/lib/pgsql/*/data",        # RHEL, PGDG packages
)


@dataclass
class Finding:
    path: str
    what: str
    files: int = 0
    bytes: int = 0
    complete: bool = True          # False: the walk budget ran out, sizes are a lower bound
    allocated: int = 0             # bytes the files hold: a sparse file's holes are not counted

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "what": self.what, "files": self.files, "bytes": self.bytes,
                "allocated_bytes": self.allocated, "sizes_complete": self.complete}


def find_valuables(fs: FileSystem, *, budget: int = WALK_BUDGET) -> list[Finding]:
    """Known places with data in them, in the order a user would rescue them."""
    findings: list[Finding] = []
    for store, what in VOLUME_STORES:
        for volume in _subdirs(fs, store):
            data = posixpath.join(volume.path, "_data")
            if _is_dir(fs, data):
                findings.append(Finding(data, f"{what} {volume.name}"))
    for pattern in POSTGRES_GLOBS:
        for cluster in _glob_dirs(fs, pattern):
            version = _small_text(fs, posixpath.join(cluster, "PG_VERSION"))
            if version is not None:
                findings.append(Finding(cluster, f"PostgreSQL {version} cluster"))
    homes = [Finding(home.path, f"home of {home.name}") for home in _subdirs(fs, "/home")]
    for path, what in PLAIN_DIRS:
        if path == "/root":
            findings.extend(homes)
        if _has_entries(fs, path) and not any(f.path == path for f in findings):
            findings.append(Finding(path, what))
    _measure(fs, findings, budget)
    return findings


def _measure(fs: FileSystem, findings: list[Finding], budget: int) -> None:
    """Fill in files/bytes; nested findings (a volume under /srv) are counted in both.
    Each finding has its own budget, so one huge tree does not blank the others."""
    for finding in findings:
        size = measure(fs, finding.path, budget)
        finding.files, finding.bytes, finding.allocated, finding.complete = (
            size.files, size.bytes, size.allocated, size.complete)


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
    for entry in _walk(fs, path):
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


def _walk(fs: FileSystem, top: str) -> Iterator[Entry]:
    """Entries below `top`; unreadable directories are skipped (inspect is a survey)."""
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


def _stat(fs: FileSystem, path: str) -> Entry | None:
    try:
        return fs.stat(path)
    except (RescueError, OSError):
        return None


def _is_dir(fs: FileSystem, path: str) -> bool:
    entry = _stat(fs, path)
    return entry is not None and entry.kind == DIR


def _subdirs(fs: FileSystem, path: str) -> list[Entry]:
    if not _is_dir(fs, path):
        return []
    try:
        return sorted((e for e in fs.listdir(path) if e.kind == DIR), key=lambda e: e.name)
    except (RescueError, OSError):
        return []


def _has_entries(fs: FileSystem, path: str) -> bool:
    if not _is_dir(fs, path):
        return False
    try:
        return bool(fs.listdir(path))
    except (RescueError, OSError):
        return False


def _glob_dirs(fs: FileSystem, pattern: str) -> list[str]:
    """Directories matching a pattern whose only wildcards are whole '*' parts."""
    paths = ["/"]
    for part in pattern.strip("/").split("/"):
        if part == "*":
            paths = [e.path for p in paths for e in _subdirs(fs, p)]
        else:
            paths = [q for q in (posixpath.join(p, part) for p in paths) if _is_dir(fs, q)]
    return paths


def _small_text(fs: FileSystem, path: str) -> str | None:
    entry = _stat(fs, path)
    if entry is None or entry.kind != FILE or entry.size > 64:
        return None
    try:
        return fs.read_file(path, limit=64).decode("ascii", "replace").strip()
    except (RescueError, OSError):
        return None
