"""The Python API: what every `rescue` command does, callable without the CLI.

    from rescue import api
    report = api.inspect("snapshot.qcow2")
    print(report.os_name, [v.id for v in report.volumes])
    result = api.extract("snapshot.qcow2", "volumes.tar.zst", paths=["/var/lib/docker/volumes"])
    if result.skipped: ...
    listing = api.ls("snapshot.qcow2", "/etc")          # entries, names, owners, damage
    data = b"".join(api.cat("snapshot.qcow2", "/etc/fstab"))

Each function opens the stack (source -> disk -> volume -> fs -> guest), does
one job and returns a typed report; `to_json()` of a report is what `--json`
prints. Errors are `rescue.errors.RescueError` subclasses (one line each).
Progress comes back through callbacks, never printed here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .errors import FilesystemError, GuestPathError, TargetError
from .extract.select import select_file, select_path
from .fs.base import DIR, FILE, Entry
from .fs.names import listed_name, visible
from .guest import Snapshot, SnapshotOptions, open_snapshot

if TYPE_CHECKING:   # the extract machinery is imported when an extract runs: `ls` and `cat` start lean
    from .extract.run import Plan, Report
    from .extract.targets import TargetOptions

# (bytes done, files done, guest path being written)
Progress = Callable[[int, int, str], None]


@dataclass
class VolumeReport:
    """One partition, logical volume or bare filesystem, as `inspect` shows it."""

    id: str
    start: int
    size: int
    filesystem: str | None = None
    label: str | None = None
    uuid: str | None = None
    description: str = ""
    backend: str | None = None        # which reader opened it ("tsk", "xfs", ...)
    used: int | None = None
    free: int | None = None
    error: str | None = None          # why it could not be read
    raw: dict[str, Any] = field(default_factory=dict, repr=False)   # every field, as --json shows it

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> "VolumeReport":
        details = row.get("details") or {}
        return cls(id=row["id"], start=row["start"], size=row["size"], filesystem=row.get("filesystem"),
                   label=row.get("label"), uuid=row.get("uuid"), description=row.get("description", ""),
                   backend=row.get("backend"), used=details.get("used"), free=details.get("free"),
                   error=row.get("error"), raw=row)


@dataclass
class InspectReport:
    """Everything `rescue inspect` finds: container, volumes, guest OS, what is worth rescuing."""

    snapshot: str
    format: str                        # disk container: "raw", "qcow2", ...
    virtual_size: int
    partition_table: str | None
    volumes: list[VolumeReport]
    root_volume: str | None = None
    root_error: str | None = None
    os: dict[str, str] | None = None
    mounts: list[dict[str, Any]] = field(default_factory=list)
    valuables: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict, repr=False)   # the whole report, as --json prints it

    @property
    def os_name(self) -> str | None:
        return (self.os or {}).get("pretty_name") or (self.os or {}).get("id")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "InspectReport":
        return cls(snapshot=data["snapshot"], format=data["format"], virtual_size=data["virtual_size"],
                   partition_table=data.get("partition_table"),
                   volumes=[VolumeReport.from_json(v) for v in data.get("volumes", [])],
                   root_volume=data.get("root_volume"), root_error=data.get("root_error"), os=data.get("os"),
                   mounts=list(data.get("mounts") or []), valuables=list(data.get("valuables") or []),
                   warnings=list(data.get("warnings") or []), data=data)

    def to_json(self) -> dict[str, Any]:
        return self.data


@dataclass
class ExtractRequest:
    """What to rescue: guest paths and/or applications, and how to lay it out."""

    paths: list[str] = field(default_factory=list)    # default "/" unless an application is chosen
    apps: list[str] = field(default_factory=list)     # compose projects (--app)
    containers: list[str] = field(default_factory=list)
    docker_volumes: list[str] = field(default_factory=list)
    excludes: list[str] = field(default_factory=list)
    strip_components: int = 0
    xattrs: bool = True
    manifest: str | None = None        # also write the manifest to this file
    embed_manifest: bool = False       # store it in the target (always, for applications)

    @property
    def by_application(self) -> bool:
        return bool(self.apps or self.containers or self.docker_volumes)


@dataclass
class ExtractJob:
    """The planned work, handed to `on_plan` before anything is written."""

    plan: Plan
    notes: list[str]                   # what was added so a database is not split, ...
    warnings: list[str]                # about the snapshot (truncation, fstab, ...)
    fetched: Callable[[], int | None]  # bytes fetched over the network so far (None: local)


def _shown(owner: str | None) -> str | None:
    """An owner name for JSON: a name that is not UTF-8 (kept as surrogate escapes) as `\\xNN`."""
    return None if owner is None else visible(owner)


@dataclass
class ExtractReport:
    """What an extract wrote (or would write, for a dry run) and what it skipped."""

    report: Report                     # files, dirs, links, bytes, skipped, warnings, seconds, target
    plan: Plan
    warnings: list[str] = field(default_factory=list)   # about the snapshot (truncation, fstab ...)
    notes: list[str] = field(default_factory=list)
    bytes_read: int | None = None      # read from a local snapshot file
    bytes_fetched: int | None = None   # fetched over the network (URL, SSH)
    dry_run: bool = False
    databases: list[Any] = field(default_factory=list)   # guest.databases.Database found in the selection
    restore_commands: list[str] = field(default_factory=list)   # applications: how to put them back
    restore_notes: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when everything selected was rescued (exit code 0)."""
        return not self.report.skipped

    def to_json(self) -> dict[str, Any]:
        data = self.report.to_json()
        if self.bytes_read is not None:
            data["bytes_read_from_snapshot"] = self.bytes_read
        if self.bytes_fetched is not None:
            data["bytes_fetched"] = self.bytes_fetched
        if self.restore_commands or self.restore_notes:
            data["restore"] = {"commands": self.restore_commands, "notes": self.restore_notes}
        if self.databases:
            data["databases"] = [d.to_json() for d in self.databases]
            data["database_notes"] = self.notes
        return data


def inspect(snapshot: str, options: SnapshotOptions | None = None) -> InspectReport:
    """What is inside `snapshot`. Raises VolumeError when it is not a disk image at all."""
    with open_snapshot(snapshot, options) as snap:
        return InspectReport.from_json(snap.inspect())


@dataclass
class Listing:
    """What `rescue ls` shows: a guest directory's entries, or the one entry a
    file path names. Names are whole (a crafted one may hold '/'); show them
    with `fs.names.escape_name`, which `ls`, `cat` and `extract --path` take back."""

    path: str                          # as asked, normalised (an unwritable last name in escaped form)
    entry: Entry                       # what `path` names (a symlink to a directory: the directory)
    entries: list[Entry]               # sorted by path
    names: list[str]                   # each entry's name as its directory holds it
    users: dict[int, str] = field(default_factory=dict)    # uid -> name, from the guest's /etc/passwd
    groups: dict[int, str] = field(default_factory=dict)
    damage: list[str] = field(default_factory=list)        # why entries may be missing (a damaged directory)

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "type": self.entry.kind, "damage": self.damage,
                "entries": [{"path": e.path, "name": name, "type": e.kind, "mode": f"{e.mode:04o}", "uid": e.uid,
                             "gid": e.gid, "user": _shown(self.users.get(e.uid)), "group": _shown(self.groups.get(e.gid)),
                             "size": e.size, "mtime_ns": e.mtime_ns, "nlink": e.nlink, "inode": e.inode,
                             "link_target": e.link_target}
                            for e, name in zip(self.entries, self.names)]}


def ls(snapshot: str | Snapshot, path: str = "/", options: SnapshotOptions | None = None) -> Listing:
    """List a guest directory (symlinks shown, not followed; a symlink named
    itself is followed to a directory). `path` may name an entry as `ls` shows
    it escaped ('/srv/..\\x2fx'). A directory listed only in part (damaged) is
    listed as far as it reads, with the reason in `damage`."""
    snap = snapshot if isinstance(snapshot, Snapshot) else open_snapshot(snapshot, options)
    try:
        fs = snap.filesystem()
        users, groups = snap.user_names(), snap.group_names()
        chosen = select_path(fs, path)
        entry = chosen.entry
        if entry.kind != DIR:
            return Listing(chosen.shown, entry, [entry],
                           [chosen.renamed or entry.name], users, groups)
        entries = sorted(fs.listdir(entry.path), key=lambda e: e.path)
        damage = fs.listing_damage(entry.path)
        prefix = entry.path.rstrip("/") + "/"
        cut = len(prefix)
        names = [e.path[cut:] if e.path.startswith(prefix) and len(e.path) > cut else listed_name(entry.path, e.path)
                 for e in entries]
        return Listing(chosen.shown, entry, entries, names, users, groups, [damage] if damage else [])
    finally:
        if snap is not snapshot:
            snap.close()


def cat(snapshot: str, path: str, options: SnapshotOptions | None = None) -> Iterator[bytes]:
    """A guest file's bytes in chunks (symlinks followed inside the guest; `path`
    may name an entry as `ls` shows it escaped). Errors (no such file, not a
    file, damaged) are raised before the first chunk."""
    from .extract.run import check_file
    with open_snapshot(snapshot, options) as snap:
        fs = snap.filesystem()
        entry = select_file(fs, path)
        if entry.kind != FILE:
            raise GuestPathError(f"{path} is a {entry.kind}, not a file", file=snapshot,
                                 hint=f"rescue ls {snapshot} {path}")
        damage = check_file(fs, entry)
        if damage:
            raise FilesystemError(f"{path}: {damage}", file=snapshot)
        yield from fs.read_chunks(entry)


def listdir(snapshot: str, path: str = "/", options: SnapshotOptions | None = None) -> list[Entry]:
    """The entries of a guest directory (or the one entry, for a file), sorted by name."""
    return ls(snapshot, path, options).entries


read_file = cat   # the earlier name


def extract(snapshot: str | Snapshot, output: str | None, request: ExtractRequest | None = None, *,
            dry_run: bool = False, target: TargetOptions | None = None, options: SnapshotOptions | None = None,
            on_plan: Callable[[ExtractJob], Progress | None] | None = None,
            paths: list[str] | None = None) -> ExtractReport:
    """Copy what `request` selects into `output` (OUT.tar[.gz|.zst], '-', DIR/,
    rsync or rclone target); with `dry_run`, only plan. A database in the
    selection is never split (its WAL, redo logs and tablespaces come along).
    `on_plan` sees the plan before anything is written and may return a
    progress callback. `snapshot` may be an open `Snapshot` (left open) or what
    the CLI takes (opened and closed here)."""
    from .extract.db_closure import databases_in, plan_with_databases
    from .extract.manifest import ManifestWriter
    from .extract.run import HOLD_BUDGET, ExtractOptions, Report
    from .extract.run import extract as run_extract
    from .extract.targets import open_sink
    from .source.stats import bytes_fetched

    request = request or ExtractRequest(paths=list(paths or []))
    chosen_options = ExtractOptions(paths=list(request.paths) or ([] if request.by_application else ["/"]),
                                    excludes=list(request.excludes), strip_components=request.strip_components,
                                    xattrs=request.xattrs)
    snap = snapshot if isinstance(snapshot, Snapshot) else open_snapshot(snapshot, options)
    try:
        fs = snap.filesystem()
        users, groups = snap.user_names(), snap.group_names()
        chosen = None
        if request.by_application:
            from .extract.app_select import plan_apps
            chosen = plan_apps(fs, chosen_options, snapshot=snap.spec, projects=request.apps,
                               containers=request.containers, volumes=request.docker_volumes)
            work = chosen.plan
            databases = databases_in(fs, [s.guest_path for s in chosen.selection.sources])
            notes: list[str] = []
        else:
            work, closure = plan_with_databases(fs, chosen_options, hold_budget=HOLD_BUDGET)
            databases, notes = closure.databases, closure.notes
            chosen_options.paths = list(chosen_options.paths) + closure.added
        result = ExtractReport(report=Report(skipped=list(work.skipped), warnings=list(work.warnings)), plan=work, warnings=list(snap.warnings),
                               notes=list(notes), databases=list(databases), dry_run=dry_run or output is None)
        if chosen is not None:
            result.restore_commands = list(chosen.commands)
            result.restore_notes = list(chosen.selection.notes)
        if result.dry_run:
            return result
        progress = None
        if on_plan is not None:
            progress = on_plan(ExtractJob(plan=work, notes=result.notes, warnings=result.warnings,
                                          fetched=lambda: bytes_fetched(snap.source)))
        sink = open_sink(output, target)   # type: ignore[arg-type]
        embed = request.embed_manifest or chosen is not None   # an application always carries its manifest
        writer = None
        if request.manifest or embed:
            writer = ManifestWriter.for_extract(snap.spec, chosen_options.paths, chosen_options.excludes,
                                                chosen_options.strip_components)
            if chosen is not None:
                writer.header.update(chosen.selection.header())
        result.report = run_extract(fs, sink, chosen_options, users=users, groups=groups, progress=progress,
                                    planned=work, manifest=writer, embed_manifest=embed,
                                    trailer=chosen.trailer if chosen is not None else None)
        if writer is not None and request.manifest:
            try:
                writer.write_file(request.manifest)
            except OSError as exc:
                raise TargetError(f"cannot write the manifest: {exc.strerror or exc}",
                                  file=request.manifest) from None
        result.bytes_read = getattr(snap.source, "bytes_read", None)
        result.bytes_fetched = bytes_fetched(snap.source)
        return result
    finally:
        if snap is not snapshot:
            snap.close()


def __getattr__(name: str) -> Any:
    if name == "TargetOptions":   # api.TargetOptions, without importing the extract machinery for ls/cat
        from .extract.targets import TargetOptions
        return TargetOptions
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ExtractJob", "ExtractReport", "ExtractRequest", "InspectReport", "Listing", "VolumeReport", "cat",
           "extract", "inspect", "listdir", "ls", "read_file", "SnapshotOptions", "TargetOptions"]
