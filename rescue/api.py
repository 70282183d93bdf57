"""The Python API: what every `rescue` command does, callable without the CLI.

    from rescue import api
    report = api.inspect("snapshot.qcow2")
    print(report.os_name, [v.id for v in report.volumes])
    result = api.extract("snapshot.qcow2", "volumes.tar.zst", paths=["/var/lib/docker/volumes"])
    if result.skipped: ...

Each function opens the stack (source -> disk -> volume -> fs -> guest), does
one job and returns a typed report; `to_json()` of a report is what `--json`
prints. Errors are `rescue.errors.RescueError` subclasses (one line each).
Progress comes back through callbacks, never printed here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from .errors import FilesystemError, GuestPathError, TargetError
from .extract.run import ExtractOptions, Plan, Report, check_file, plan
from .extract.targets import TargetOptions, open_sink
from .fs.base import DIR, FILE, Entry
from .guest import Snapshot, SnapshotOptions, open_snapshot

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


def listdir(snapshot: str, path: str = "/", options: SnapshotOptions | None = None) -> list[Entry]:
    """The entries of a guest directory (or the one entry, for a file), sorted by name."""
    from .extract.select import resolve_selection
    with open_snapshot(snapshot, options) as snap:
        fs = snap.filesystem()
        _, entry = resolve_selection(fs, path)
        return sorted(fs.listdir(entry.path), key=lambda e: e.path) if entry.kind == DIR else [entry]


def read_file(snapshot: str, path: str, options: SnapshotOptions | None = None) -> Iterator[bytes]:
    """A guest file's bytes in chunks (symlinks followed inside the guest)."""
    with open_snapshot(snapshot, options) as snap:
        fs = snap.filesystem()
        entry = fs.resolve(path)
        if entry.kind != FILE:
            raise GuestPathError(f"{path} is a {entry.kind}, not a file", file=snapshot)
        damage = check_file(fs, entry)
        if damage:
            raise FilesystemError(f"{path}: {damage}", file=snapshot)
        yield from fs.read_chunks(entry)


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
    from .extract.run import extract as run_extract
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
            work, closure = plan_with_databases(fs, chosen_options)
            databases, notes = closure.databases, closure.notes
            chosen_options.paths = list(chosen_options.paths) + closure.added
        result = ExtractReport(report=Report(skipped=list(work.skipped)), plan=work, warnings=list(snap.warnings),
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


__all__ = ["ExtractJob", "ExtractReport", "ExtractRequest", "InspectReport", "VolumeReport", "extract", "inspect", "listdir", "read_file",
           "SnapshotOptions", "TargetOptions"]
