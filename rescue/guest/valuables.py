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
from typing import Any

from ..errors import RescueError
from ..fs.base import FILE, FileSystem
from . import survey
from .survey import WALK_BUDGET

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
        for volume in survey.subdirs(fs, store):
            data = posixpath.join(volume.path, "_data")
            if survey.is_dir(fs, data):
                findings.append(Finding(data, f"{what} {volume.name}"))
    for pattern in POSTGRES_GLOBS:
        for cluster in survey.glob_dirs(fs, pattern):
            version = _small_text(fs, posixpath.join(cluster, "PG_VERSION"))
            if version is not None:
                findings.append(Finding(cluster, f"PostgreSQL {version} cluster"))
    homes = [Finding(home.path, f"home of {home.name}") for home in survey.subdirs(fs, "/home")]
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
        size = survey.measure(fs, finding.path, budget)
        finding.files, finding.bytes, finding.allocated, finding.complete = (
            size.files, size.bytes, size.allocated, size.complete)


def _has_entries(fs: FileSystem, path: str) -> bool:
    return survey.is_dir(fs, path) and bool(survey.names(fs, path))


def _small_text(fs: FileSystem, path: str) -> str | None:
    entry = survey.stat(fs, path)
    if entry is None or entry.kind != FILE or entry.size > 64:
        return None
    try:
        return fs.read_file(path, limit=64).decode("ascii", "replace").strip()
    except (RescueError, OSError):
        return None
