"""Keep a database's files together when a selection would split them.

A PostgreSQL cluster is useless without its pg_wal (which initdb --waldir puts
elsewhere, behind a symlink) and the tablespaces pg_tblspc links to; an SQLite
database's committed data may still be in its -wal; an InnoDB data directory
needs its redo log and system tablespace. When a selection holds part of such a
set, the rest is added, and each addition is said (guest/databases.py finds them).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

from ..errors import RescueError
from ..fs.base import FileSystem, normalize
from ..guest.databases import Database, database_at_or_above, find_databases
from .run import ExtractOptions, Plan, plan
from .select import resolve_selection


@dataclass
class Closure:
    databases: list[Database] = field(default_factory=list)
    added: list[str] = field(default_factory=list)      # guest paths added to the selection
    notes: list[str] = field(default_factory=list)


def _covered(path: str, selected: list[str]) -> bool:
    return any(path == s or path.startswith(s.rstrip("/") + "/") for s in selected)


def complete_selection(fs: FileSystem, options: ExtractOptions) -> Closure:
    """Databases the --path selection touches, and the paths to add so none is split."""
    out = Closure()
    selected: list[str] = []
    for p in options.paths:
        try:
            _, entry = resolve_selection(fs, p)
            selected.append(normalize(entry.path if entry.kind == "dir" else p))
        except RescueError:
            continue
    dbs: dict[str, Database] = {}
    for path in list(selected):
        above = database_at_or_above(fs, path)
        if above is not None and above.path != path:
            if not _covered(above.path, selected):
                selected.append(above.path)
                out.added.append(above.path)
                out.notes.append(f"{path} is part of the {above.kind} data directory {above.path}: "
                                 "the whole directory was included (a part of it cannot be started)")
            dbs[above.path] = above
        elif above is not None:
            dbs[above.path] = above
        for db in find_databases(fs, [path], known=False, depth_limit=4):
            dbs.setdefault(db.path, db)
    for db in dbs.values():
        for extra in db.together:
            if not _covered(extra, selected):
                selected.append(extra)
                out.added.append(extra)
                why = next((n for n in db.notes if extra in n), f"it belongs to {db.path}")
                out.notes.append(f"included {extra}: {why} ({db.kind} at {db.path})")
    out.databases = sorted(dbs.values(), key=lambda d: d.path)
    return out


def plan_with_databases(fs: FileSystem, options: ExtractOptions,
                        hold_budget: int | None = None) -> tuple[Plan, Closure]:
    closure = complete_selection(fs, options)
    if not closure.added:
        return plan(fs, options, hold_budget=hold_budget), closure
    wider = ExtractOptions(paths=list(options.paths) + closure.added, excludes=options.excludes,
                           strip_components=options.strip_components, xattrs=options.xattrs)
    return plan(fs, wider, hold_budget=hold_budget), closure


def databases_in(fs: FileSystem, paths: list[str]) -> list[Database]:
    """Databases inside already-chosen sources (application extracts), for the summary."""
    found: dict[str, Database] = {}
    for p in paths:
        for db in find_databases(fs, [p], known=False, depth_limit=4):
            found.setdefault(db.path, db)
    return sorted(found.values(), key=lambda d: posixpath.normpath(d.path))
