"""Databases in a snapshot: which server and version, whether it was shut down
cleanly, and which files must travel with it.

References (the on-disk facts read here):
- PostgreSQL `src/include/catalog/pg_control.h`: ControlFileData starts with
  system_identifier (u64), pg_control_version (u32), catalog_version_no (u32),
  state (DBState, i32) — stable since 9.x. DB_SHUTDOWNED (1) or
  DB_SHUTDOWNED_IN_RECOVERY (2) is a clean stop; DB_IN_PRODUCTION (6) means the
  server was running (or crashed) and will run crash recovery. `postmaster.pid`
  is removed by a clean stop. `pg_wal` may be a symlink (initdb --waldir), each
  `pg_tblspc/<oid>` is a symlink to a tablespace elsewhere.
- MariaDB `storage/innobase/include/log0log.h` (10.8+ "Phys" redo format):
  ib_logfile0 header: "Phys", first LSN (u64 BE at 8), creator string at 16;
  checkpoint blocks at 0x1000 and 0x2000 start with the checkpoint LSN (u64 BE).
  After a clean shutdown the log ends right after the checkpoint's own
  FILE_CHECKPOINT mini-transaction (16 bytes); anything after it is redo that
  crash recovery will apply. `mysql_upgrade_info` holds the server version.
- MongoDB: `mongod.lock` is emptied by a clean shutdown (it holds the pid while
  running); `WiredTiger` holds the WiredTiger version line.
- Redis RDB: "REDIS" + 4-digit RDB version (rdb.h RDB_VERSION).
- SQLite (fileformat2.html): "SQLite format 3\\0" header, offset 96 = the
  SQLITE_VERSION_NUMBER that last wrote it; a non-empty NAME-wal beside it holds
  committed transactions not yet in the main file.
"""

from __future__ import annotations

import posixpath
import struct
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from construct import Int32sl, Int32ul, Int64ul, Struct

from ..errors import RescueError
from ..fs.base import DIR, FILE, SYMLINK, Entry, FileSystem, normalize
from . import survey

PG_CONTROL = Struct("system_identifier" / Int64ul, "pg_control_version" / Int32ul,
                    "catalog_version_no" / Int32ul, "state" / Int32sl)
PG_STATES = {0: "starting up", 1: "shut down", 2: "shut down in recovery", 3: "shutting down",
             4: "in crash recovery", 5: "in archive recovery", 6: "in production"}
PG_CLEAN = {1, 2}
INNODB_PHYS = b"Phys"
INNODB_FIRST_LSN_OFFSET = 0x3000     # the redo records start here in the 10.8+ file
FILE_CHECKPOINT_SIZE = 16            # type+len, space, page, LSN, sequence bit, CRC-32C
SQLITE_MAGIC = b"SQLite format 3\0"
SQLITE_NAMES = (".db", ".sqlite", ".sqlite3", ".db3")
RDB_TO_REDIS = {6: "3.0", 7: "3.2", 8: "4", 9: "5", 10: "7.0", 11: "7.2", 12: "7.4"}
RECOVERY = "will run crash recovery on first start (keep every file of it together)"

# Where servers keep their data by default; container volumes are searched too.
KNOWN_DIRS = ("/var/lib/postgresql/*/*", "/var/lib/pgsql/data", "/var/lib/pgsql/*/data", "/var/lib/mysql",
              "/var/lib/mariadb", "/var/lib/mongodb", "/var/lib/mongo", "/var/lib/redis", "/var/lib/redis/*")
VOLUME_STORES = ("/var/lib/docker/volumes", "/var/lib/containers/storage/volumes")


@dataclass
class Database:
    kind: str                    # "postgresql", "mariadb", "mysql", "mongodb", "redis", "sqlite"
    path: str                    # data directory (or the file, for SQLite)
    version: str | None = None
    clean: bool | None = None    # None: not known
    state: str = ""
    image: str | None = None     # the official image tag to start it with
    together: list[str] = field(default_factory=list)   # guest paths outside `path` that belong to it
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        what = f"{self.kind} {self.version or '(version unknown)'}"
        start = f"; start it with image {self.image}" if self.image else ""
        recovery = f", {RECOVERY}" if self.clean is False else ""
        return f"{self.path}: {what}, {self.state}{recovery}{start}"


# -- small readers ----------------------------------------------------------------

def _read(fs: FileSystem, path: str, length: int, offset: int = 0) -> bytes | None:
    entry = survey.stat(fs, path)
    if entry is None or entry.kind != FILE:
        return None
    try:
        return fs.read_range(entry, offset, min(length, max(0, entry.size - offset)))
    except (RescueError, OSError):
        return None


def _text(fs: FileSystem, path: str, limit: int = 256) -> str | None:
    raw = _read(fs, path, limit)
    return None if raw is None else raw.decode("utf-8", "replace").strip()


def _link_target(path: str, entry: Entry) -> str:
    target = entry.link_target or ""
    return normalize(target if target.startswith("/") else posixpath.join(posixpath.dirname(path), target))


# -- one directory --------------------------------------------------------------------

def detect_dir(fs: FileSystem, path: str, names: dict[str, Entry] | None = None) -> Database | None:
    """The database whose data directory `path` is, or None."""
    names = names if names is not None else survey.names(fs, path)
    if "PG_VERSION" in names and "global" in names:
        return _postgres(fs, path, names)
    if "ib_logfile0" in names or "mysql_upgrade_info" in names or ("ibdata1" in names and "mysql" in names):
        return _mysql(fs, path, names)
    if "mongod.lock" in names or "WiredTiger" in names:
        return _mongo(fs, path, names)
    if "dump.rdb" in names or "appendonlydir" in names:
        return _redis(fs, path, names)
    return None


def _postgres(fs: FileSystem, path: str, names: dict[str, Entry]) -> Database:
    version = _text(fs, posixpath.join(path, "PG_VERSION"), 16)
    db = Database("postgresql", path, version, image=f"postgres:{version}" if version else None)
    raw = _read(fs, posixpath.join(path, "global", "pg_control"), PG_CONTROL.sizeof())
    state = None
    if raw is not None and len(raw) >= PG_CONTROL.sizeof():
        state = PG_CONTROL.parse(raw).state
    pid = "postmaster.pid" in names
    if state is None:
        db.state = "control file unreadable: state unknown"
    elif state not in PG_STATES:   # not a pg_control PostgreSQL wrote (damaged, or a stand-in file)
        db.state = f"control file holds no known cluster state ({state}): state unknown"
    elif state in PG_CLEAN and not pid:
        db.clean, db.state = True, "shut down cleanly"
    else:
        db.clean = False
        db.state = f"{PG_STATES.get(state, f'state {state}')} (not shut down cleanly" + \
            ("; postmaster.pid left behind)" if pid else ")")
    wal = names.get("pg_wal") or names.get("pg_xlog")
    if wal is not None and wal.kind == SYMLINK:
        target = _link_target(posixpath.join(path, wal.name), wal)
        db.together.append(target)
        db.notes.append(f"{wal.name} is a symlink to {target} (initdb --waldir): the WAL lives there")
    for e in sorted(survey.names(fs, posixpath.join(path, "pg_tblspc")).values(), key=lambda e: e.name):
        if e.kind == SYMLINK:
            target = _link_target(e.path, e)
            db.together.append(target)
            db.notes.append(f"tablespace {e.name} lives in {target}")
    return db


def _mysql(fs: FileSystem, path: str, names: dict[str, Entry]) -> Database:
    info = _text(fs, posixpath.join(path, "mysql_upgrade_info"), 64)
    head = _read(fs, posixpath.join(path, "ib_logfile0"), 0x3000) or b""
    creator = ""
    if head[:4] == INNODB_PHYS:
        creator = head[16:48].split(b"\0", 1)[0].decode("ascii", "replace")
    kind = "mariadb" if "MariaDB" in (info or "") or creator.startswith("MariaDB") else "mysql"
    version = (info or "").replace("-MariaDB", "").split("-")[0] or creator.split(" ")[-1] or None
    series = ".".join(version.split(".")[:2]) if version else None
    db = Database(kind, path, version, image=f"{kind}:{series}" if series else None)
    if head[:4] == INNODB_PHYS:
        db.clean = _innodb_clean(fs, posixpath.join(path, "ib_logfile0"), head)
        db.state = {True: "shut down cleanly (no redo after the last checkpoint)",
                    False: "not shut down cleanly (redo after the last checkpoint)",
                    None: "redo log unreadable: state unknown"}[db.clean]
    elif "ib_logfile0" in names or "#innodb_redo" in names:
        db.state = "redo log in an older format: shutdown state not read"
    else:
        db.state = "no InnoDB redo log found"
    return db


def _innodb_clean(fs: FileSystem, log: str, head: bytes) -> bool | None:
    if len(head) < 0x2008:
        return None
    first_lsn = struct.unpack_from(">Q", head, 8)[0]
    checkpoint = max(struct.unpack_from(">Q", head, 0x1000)[0], struct.unpack_from(">Q", head, 0x2000)[0])
    entry = survey.stat(fs, log)
    if entry is None or checkpoint < first_lsn or entry.size <= INNODB_FIRST_LSN_OFFSET:
        return None
    capacity = entry.size - INNODB_FIRST_LSN_OFFSET

    def at(lsn: int) -> int:
        return INNODB_FIRST_LSN_OFFSET + (lsn - first_lsn) % capacity

    rec = _read(fs, log, 1, at(checkpoint))
    nxt = _read(fs, log, 1, at(checkpoint + FILE_CHECKPOINT_SIZE))
    if not rec or nxt is None or rec[0] & 0xF0 != 0xF0:   # the checkpoint's own FILE_CHECKPOINT record
        return None
    return not nxt or nxt[0] == 0


def _mongo(fs: FileSystem, path: str, names: dict[str, Entry]) -> Database:
    wt = _text(fs, posixpath.join(path, "WiredTiger"), 128) or ""
    version = wt.splitlines()[1].split(":")[0] if len(wt.splitlines()) > 1 else None
    db = Database("mongodb", path, version, image="mongo")
    lock = names.get("mongod.lock")
    if lock is None:
        db.state = "no mongod.lock: state unknown"
    elif lock.size == 0:
        db.clean, db.state = True, "shut down cleanly (mongod.lock empty)"
    else:
        db.clean, db.state = False, "not shut down cleanly (mongod.lock holds a pid)"
    db.notes.append("the version shown is WiredTiger's; start with the MongoDB release that wrote it")
    return db


def _redis(fs: FileSystem, path: str, names: dict[str, Entry]) -> Database:
    head = _read(fs, posixpath.join(path, "dump.rdb"), 9) or b""
    db = Database("redis", path)
    if head[:5] == b"REDIS" and head[5:9].isdigit():
        rdb = int(head[5:9])
        db.version = f"RDB {rdb}"
        series = RDB_TO_REDIS.get(rdb)
        db.image = f"redis:{series}" if series else "redis"
    db.state = "RDB snapshot: holds the data as of the last save" + \
        ("; appendonlydir/ holds what came after" if "appendonlydir" in names else "")
    return db


def detect_sqlite(fs: FileSystem, path: str, entry: Entry | None = None) -> Database | None:
    head = _read(fs, path, 100)
    if head is None or head[:16] != SQLITE_MAGIC:
        return None
    version = None
    if len(head) >= 100:
        n = struct.unpack_from(">I", head, 96)[0]
        version = f"{n // 1000000}.{n // 1000 % 1000}.{n % 1000}" if n else None
    db = Database("sqlite", path, version)
    wal = survey.stat(fs, path + "-wal")
    journal = survey.stat(fs, path + "-journal")
    for suffix in ("-wal", "-shm", "-journal"):
        if survey.stat(fs, path + suffix) is not None:
            db.together.append(path + suffix)
    if wal is not None and wal.size > 0:
        db.clean, db.state = False, "has a write-ahead log (-wal) not yet checkpointed: keep it beside the file"
    elif journal is not None and journal.size > 0:
        db.clean, db.state = False, "has a hot rollback journal: a write was interrupted"
    else:
        db.clean, db.state = True, "self-contained (no pending -wal or journal)"
    return db


# -- surveys -----------------------------------------------------------------------------

def find_databases(fs: FileSystem, extra_roots: Iterable[str] = (), *, budget: int = 5000,
                   known: bool = True, depth_limit: int = 2) -> list[Database]:
    """Databases at the usual places and in container volumes (unless
    known=False), and under `extra_roots`, searched `depth_limit` levels down;
    SQLite files by name and magic. The search stops after `budget` entries."""
    found: dict[str, Database] = {}
    candidates: list[str] = []
    if known:
        for pattern in KNOWN_DIRS:
            candidates += sorted(survey.glob_dirs(fs, pattern))
        for store in VOLUME_STORES:
            for vol in survey.names(fs, store).values():
                if vol.kind == DIR:
                    candidates.append(posixpath.join(vol.path, "_data"))
    candidates += list(extra_roots)
    left = budget
    for top in candidates:
        st = survey.stat(fs, top)
        if st is not None and st.kind == FILE:
            lite = detect_sqlite(fs, top, st)
            if lite is not None:
                found[top] = lite
            continue
        stack = [(top, 0)]
        while stack and left > 0:
            path, depth = stack.pop()
            names = survey.names(fs, path)
            left -= len(names) + 1
            db = detect_dir(fs, path, names)
            if db is not None:
                found.setdefault(path, db)
                continue
            for e in names.values():
                if e.kind == FILE and e.name.lower().endswith(SQLITE_NAMES) and e.path not in found:
                    lite = detect_sqlite(fs, e.path, e)
                    if lite is not None:
                        found[e.path] = lite
                elif e.kind == DIR and depth < depth_limit:
                    stack.append((e.path, depth + 1))
    return sorted(found.values(), key=lambda d: d.path)


def database_at_or_above(fs: FileSystem, path: str) -> Database | None:
    """The database whose data directory holds `path` (or is it)."""
    cur = normalize(path)
    while True:
        st = survey.stat(fs, cur)
        if st is not None and st.kind == DIR:
            db = detect_dir(fs, cur)
            if db is not None:
                return db
        if cur == "/":
            return None
        cur = posixpath.dirname(cur)
