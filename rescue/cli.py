"""The `rescue` command line: parse, open the stack, call one function, render.

Progress and messages go to stderr (rich); data and --json go to stdout.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator, List, Optional

import typer
from rich.console import Console

from .errors import (EXIT_ERROR, EXIT_OK, EXIT_PARTIAL, DamagedRange, RescueError, install_signal_handlers,
                     interruption)
from .fs.base import DIR, FILE, SYMLINK, FileReadError
from .fs.names import escape_name
from .fs.names import visible as _visible   # names from an image may hold a NUL, an escape sequence, a newline
from .units import human_size

if TYPE_CHECKING:   # rich's progress and tables are imported when one is shown: start-up stays lean
    from rich.progress import Progress

    from .api import Listing

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Get your data out of a dead server's snapshot, without mounting anything.")
err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)

_state = {"debug": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors.")) -> None:
    _state["debug"] = debug
    # Damage the layers notice while reading (logged, not raised) reaches the
    # user as "warning: ..." lines, names escaped like every other message.
    logger = logging.getLogger("rescue")
    _WarningLines.recent = []   # per command (CliRunner runs several in one process)
    if not any(isinstance(h, _WarningLines) for h in logger.handlers):
        logger.addHandler(_WarningLines())
    logger.setLevel(logging.INFO if debug else logging.WARNING)


class _WarningLines(logging.Handler):
    recent: list[str] = []   # the last warnings printed, so a command does not repeat one

    def emit(self, record: logging.LogRecord) -> None:
        prefix = "warning" if record.levelno >= logging.WARNING else "info"
        text = record.getMessage()
        _WarningLines.recent = [*_WarningLines.recent[-99:], text]
        err.print(f"{prefix}: {_visible(text)}", markup=False)

    @staticmethod
    def said(text: str) -> bool:
        return any(text in line for line in _WarningLines.recent)


# -- shared pieces ------------------------------------------------------------

SnapshotArg = typer.Argument(..., metavar="SNAPSHOT", show_default=False,
                             help="Disk image, snapshot archive or URL (detected by content).")
VolumeOpt = typer.Option(None, "--volume", "-V", metavar="ID", help="Volume to read (see `rescue inspect`): 2, vg0/root, whole.")
MemberOpt = typer.Option(None, "--member", metavar="NAME", help="File inside an archive, when it holds several disks.")
BackingOpt = typer.Option(None, "--backing", metavar="FILE", help="Parent image of a qcow2/VHD/VMDK overlay.")
QSnapOpt = typer.Option(None, "--internal-snapshot", metavar="NAME", help="qcow2 internal snapshot to read (name or id); for a Proxmox VMA, the disk (e.g. drive-scsi1).")
# --snapshot was --internal-snapshot's name: kept, hidden, so scripts that use it keep working.
QSnapAlias = typer.Option(None, "--snapshot", metavar="NAME", hidden=True)
BackendOpt = typer.Option("auto", "--backend", metavar="NAME",
                          help="Filesystem reader: auto (libguestfs last), native (never libguestfs), tsk, guestfs.")
DiskOpt = typer.Option([], "--disk", metavar="FILE",
                       help="Another disk of the same server (an LVM volume group spread over disks); repeatable.")
PartialOpt = typer.Option(False, "--partial", help="Read a truncated image anyway: rescue what it still holds.")


def _options(volume, member, backing, internal_snapshot, backend, partial=False, disks=()):
    from .guest import SnapshotOptions
    return SnapshotOptions(volume=volume, member=member, backing=backing, internal_snapshot=internal_snapshot,
                           backend=backend, partial=partial, extra_disks=list(disks), progress=_IndexProgress(),
                           # a library's message may hold [brackets]: never rich markup
                           status=lambda text: err.print(f"{_visible(text)}...", style="dim", markup=False))


class _IndexProgress:
    """Progress of the first open of a compressed archive (building its seek index)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.bar: Optional[Progress] = None
        self.task = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            # Not a terminal (2>log, a pipe): a live bar would write only empty lines there.
            if not err.is_terminal or time.monotonic() - self.started < 1.0 or done >= total:
                return
            self.bar = _bar("indexing archive")
            self.bar.start()
            self.task = self.bar.add_task("index", total=total or None)
        self.bar.update(self.task, completed=done)
        if total and done >= total:
            self.bar.stop()


@contextmanager
def _errors(snapshot: Optional[str] = None) -> Iterator[None]:
    """One clear line and exit 2 for anything that goes wrong (traceback with --debug)."""
    try:
        yield
    except typer.Exit:
        raise
    except RescueError as exc:
        if exc.file is None and snapshot:
            exc.file = snapshot   # every line names the file it is about
        if _state["debug"]:
            err.print_exception()
        err.print(f"rescue: {_visible(exc.one_line())}", markup=False)
        raise typer.Exit(EXIT_ERROR)
    except (DamagedRange, FileReadError) as exc:   # damaged data the command could not do without
        if _state["debug"]:
            err.print_exception()
        problem = str(exc)
        if snapshot and problem.startswith(snapshot + ": "):
            problem = problem[len(snapshot) + 2:]
        if isinstance(exc, DamagedRange):
            damaged = RescueError(f"damaged data: {problem}", file=snapshot, layer="disk",
                                  hint="the image is damaged there; `rescue convert` writes the rest of the disk "
                                       "with the damaged ranges as zeros")
        else:
            damaged = RescueError(problem, file=snapshot, layer="fs",
                                  hint="the filesystem is damaged there; `rescue extract` skips what it cannot "
                                       "read and rescues the rest")
        err.print(f"rescue: {damaged.one_line()}", markup=False)
        raise typer.Exit(EXIT_ERROR)
    except KeyboardInterrupt as exc:   # Ctrl-C, or SIGTERM/SIGHUP (errors.Interrupted): already cleaned up
        name = getattr(exc, "name", "SIGINT")
        err.print(f"rescue: interrupted ({name})", markup=False)
        exc.reported = True
        raise typer.Exit(getattr(exc, "exit_code", 130))
    except Exception as exc:  # a bug or an unforeseen input: still one line
        if _state["debug"]:
            err.print_exception()
        err.print(f"rescue: internal error: {type(exc).__name__}: {exc} (run with --debug for details)",
                  markup=False)
        raise typer.Exit(EXIT_ERROR)


def _open(snapshot: str, volume, member, backing, qsnap, backend, partial=False, disks=()):
    from .guest import open_snapshot
    return open_snapshot(snapshot, _options(volume, member, backing, qsnap, backend, partial, disks))


def _human(n: Optional[int]) -> str:
    return "" if n is None else human_size(n)


def _print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


# -- inspect ------------------------------------------------------------------

@app.command()
def inspect(snapshot: str = SnapshotArg, volume: Optional[str] = VolumeOpt, member: Optional[str] = MemberOpt,
            backing: Optional[str] = BackingOpt, qsnap: Optional[str] = QSnapOpt,
            qsnap_alias: Optional[str] = QSnapAlias,
            backend: str = BackendOpt, disk: List[str] = DiskOpt,
            as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Show what is inside a snapshot: disk format, partitions, volumes, filesystems, and the guest OS."""
    from . import api
    with _errors(snapshot):
        report = api.inspect(snapshot, _options(volume, member, backing, qsnap or qsnap_alias, backend, disks=disk))
        if as_json:
            _print_json(report.to_json())
            return
        _render_inspect(report.to_json())


def _render_inspect(data: dict) -> None:
    head = f"{data['snapshot']}: {data['format']}"
    if data.get("subformat"):
        head += f" ({data['subformat']})"
    head += f", {_human(data['virtual_size'])} virtual"
    if data.get("allocated_size") is not None:
        head += f", {_human(data['allocated_size'])} allocated"
    out.print(head, markup=False)
    for key in ("cluster_size", "compression"):
        if data.get(key):
            out.print(f"  {key.replace('_', ' ')}: {data[key]}", markup=False)
    for parent in data.get("backing_chain") or []:
        out.print(f"  backing file: {parent}", markup=False)
    for snap in data.get("snapshots") or []:
        if isinstance(snap, dict):
            line = f"  snapshot {snap.get('id', '?')}: {snap.get('name') or '(no name)'}"
            if snap.get("date"):
                line += f", taken {snap['date']}"
            if snap.get("disk_size"):
                line += f", disk {_human(snap['disk_size'])}"
            out.print(line + " (read it with --internal-snapshot NAME)", markup=False)
        else:
            out.print(f"  snapshot: {snap}", markup=False)
    if data.get("archive"):
        out.print(f"  archive: {data['archive']}", markup=False)
    out.print(f"Partition table: {data.get('partition_table') or 'none'}", markup=False)
    from rich.table import Table
    table = Table(show_header=True, header_style="bold")
    for col in ("volume", "start", "size", "type", "filesystem", "label", "uuid", "used", "free"):
        table.add_column(col, overflow="fold")
    for v in data["volumes"]:
        details = v.get("details") or {}
        fs = v.get("filesystem") or "?"
        if v.get("error"):
            fs += " (unreadable)"
        if v["id"] == data.get("root_volume"):
            fs += " [root]"
        table.add_row(v["id"], str(v["start"]), _human(v["size"]), v.get("description", ""), fs,
                      v.get("label") or "", v.get("uuid") or "", _human(details.get("used")),
                      _human(details.get("free")))
    out.print(table)
    for v in data["volumes"]:
        if v.get("subvolumes"):   # btrfs: what `--volume ID:PATH` can pick
            out.print(f"btrfs subvolumes of volume {v['id']} (pick one with --volume {v['id']}:PATH):",
                      markup=False)
            for sv in v["subvolumes"]:
                what = f"snapshot of {sv['snapshot_of']}" if sv.get("snapshot") else "subvolume"
                out.print(f"  {sv['path']}  (id {sv['id']}, {what}{', read-only' if sv.get('readonly') else ''})",
                          markup=False)
    for vg in data.get("volume_groups") or []:
        try:
            from .volume.lvm import vg_summary
            line = vg_summary(vg)
        except Exception:   # a summary must never hide the rest of the report
            line = f"{vg.get('name')}: {len(vg.get('lvs', []))} logical volumes"
        out.print(line[0].upper() + line[1:], markup=False)
    if data.get("mounts"):
        out.print("Mount table (from /etc/fstab):")
        for row in data["mounts"]:
            out.print(f"  {row.get('mountpoint')}  {row.get('spec')}  -> {row.get('volume') or '-'}  "
                      f"{row.get('status', '')}", markup=False)
    if data.get("os"):
        out.print(f"Guest OS: {data['os'].get('pretty_name') or data['os'].get('id')}", markup=False)
    elif data.get("root_error"):
        out.print(f"Guest root: {data['root_error']}", markup=False)
    if data.get("valuables"):
        out.print("Worth rescuing (pass as --path):")
        for found in data["valuables"]:
            held = found.get("allocated_bytes", found["bytes"])   # holes of sparse files not counted
            size = _human(held) + ("" if found["sizes_complete"] else "+")
            if held != found["bytes"]:
                size += f" ({_human(found['bytes'])} apparent)"
            files = f"{found['files']}{'' if found['sizes_complete'] else '+'} file" + ("" if found["files"] == 1 else "s")
            out.print(f"  {found['path']:<44} {found['what']}, {files}, {size}", markup=False)
    if data.get("applications"):
        _render_apps(data["applications"])
    if data.get("databases"):
        out.print("Databases:")
        for db in data["databases"]:
            recovery = ", will run crash recovery on first start" if db["clean"] is False else ""
            image = f"; start with image {db['image']}" if db.get("image") else ""
            out.print(f"  {_visible(db['path'])}: {db['kind']} {db['version'] or '?'}, {db['state']}{recovery}"
                      f"{image}", markup=False)
            for note in db.get("notes") or []:
                out.print(f"      {_visible(note)}", markup=False)
    for warning in data.get("warnings") or []:
        _warn(warning)


def _render_apps(apps: dict) -> None:
    """Containers, compose projects and volumes (rescue/guest/apps.py)."""
    def size(s: Optional[dict]) -> str:
        if not s:
            return "empty"
        more = "" if s.get("complete", True) else "+"
        held = f" ({_human(s['allocated'])}{more} data)" if s["allocated"] != s["bytes"] else ""
        return f"{s['files']}{more} files, {_human(s['bytes'])}{more}{held}"

    for eng in apps.get("engines") or []:
        where = eng["root"] + (f" -> {eng['real_root']}" if eng.get("real_root") not in (None, eng["root"]) else "")
        state = "" if eng["found"] else " (not in this snapshot)"
        out.print(f"{eng['engine'].capitalize()} data: {where} ({eng['why']}){state}", markup=False)
    if apps.get("containers"):
        out.print("Containers (rescue one with --container NAME):")
    for c in apps.get("containers") or []:
        proj = f", project {c['project']}/{c['service']}" if c.get("project") else ""
        out.print(f"  {_visible(c['name']):<24} {_visible(c['image'])}, {c['state']}{proj}", markup=False)
        for m in c.get("mounts") or []:
            if m["kind"] == "tmpfs":
                out.print(f"      tmpfs {m['destination']} (memory only: nothing to rescue)", markup=False)
                continue
            missing = "" if m["present"] else " (NOT in this snapshot)"
            out.print(f"      {m['kind']} {_visible(m['source'])} -> {_visible(m['destination'])}"
                      f"{'' if m['rw'] else ' (ro)'}{missing}", markup=False)
        if c.get("layer"):
            out.print(f"      writable layer: {size(c['layer'])} written inside the container "
                      f"({c['layer_path']})", markup=False)
    if apps.get("projects"):
        out.print("Compose projects (rescue one with --app NAME):")
    for p in apps.get("projects") or []:
        files = ", ".join(p["config_files"] + p["env_files"]) or "no compose file recorded"
        out.print(f"  {_visible(p['name'])}: {_visible(files)}", markup=False)
        out.print(f"      services {', '.join(p['services']) or '-'}; volumes {', '.join(p['volumes']) or '-'}; "
                  f"binds {', '.join(p['binds']) or '-'}", markup=False)
        for gone in p.get("missing") or []:
            out.print(f"      {_visible(gone)} is NOT in this snapshot", markup=False)
    vols = apps.get("volumes") or []
    if vols:
        out.print("Volumes (rescue one with --docker-volume NAME):")
    for v in vols:
        users = ", ".join(v["used_by"]) if v["used_by"] else \
            "UNUSED (no container)" if v.get("usage_known", True) else "users unknown"
        out.print(f"  {_visible(v['name']):<24} {size(v['size'])}; {users}", markup=False)


# -- ls and cat -----------------------------------------------------------------

def _mode_string(kind: str, mode: int) -> str:
    import stat
    from .fs.base import Entry
    return stat.filemode(Entry(path="/", kind=kind, mode=mode).st_mode)


@app.command()
def ls(snapshot: str = SnapshotArg, path: str = typer.Argument("/", help="Directory or file in the guest "
                                                                        "(a name as ls shows it, escapes included)."),
       long: bool = typer.Option(False, "-l", "--long", help="Modes, owners, sizes, times."),
       volume: Optional[str] = VolumeOpt, member: Optional[str] = MemberOpt,
       backing: Optional[str] = BackingOpt, qsnap: Optional[str] = QSnapOpt,
       qsnap_alias: Optional[str] = QSnapAlias, backend: str = BackendOpt,
       partial: bool = PartialOpt, disk: List[str] = DiskOpt,
       as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List a directory inside the snapshot (like ls; symlinks are shown, not followed).

    Every name is shown whole: a byte no file name can hold or a terminal could
    misread as an escape (a '/' inside a crafted name as \\x2f, a backslash
    doubled); `cat` and `extract --path` take names in that form."""
    from . import api
    with _errors(snapshot):
        listing = api.ls(snapshot, path,
                         _options(volume, member, backing, qsnap or qsnap_alias, backend, partial, disk))
        for damage in listing.damage:   # once: the reader may have said it already
            if not _WarningLines.said(damage):
                _warn(f"{listing.path}: listed only in part: {damage}")
        if as_json:
            _print_json(listing.to_json())
            return
        _print_lines(_ls_lines(listing, long))


def _ls_lines(listing: "Listing", long: bool) -> list[str]:
    users, groups = listing.users, listing.groups
    lines = []
    for e, name in zip(listing.entries, listing.names):
        name = escape_name(name)
        if e.kind == SYMLINK:
            name += f" -> {_visible(e.link_target or '')}"
        if long:
            when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(e.mtime_ns // 1_000_000_000))
            size = f"{e.rdev[0]}, {e.rdev[1]}" if e.rdev else str(e.size)
            user, group = _visible(str(users.get(e.uid, e.uid))), _visible(str(groups.get(e.gid, e.gid)))
            lines.append(f"{_mode_string(e.kind, e.mode)} {e.nlink:>3} {user:<8} "
                         f"{group:<8} {size:>10} {when} {name}")
        else:
            lines.append(name + ("/" if e.kind == DIR else ""))
    return lines


def _print_lines(lines: list[str]) -> None:
    """Plain lines to stdout in one write: rich's print costs ~0.1 ms a line
    (20 s for a directory of 200 000 names), and these need no styling."""
    if lines:
        sys.stdout.flush()
        sys.stdout.buffer.write(("\n".join(lines) + "\n").encode(sys.stdout.encoding or "utf-8", "backslashreplace"))
        sys.stdout.flush()


@app.command()
def cat(snapshot: str = SnapshotArg,
        path: str = typer.Argument(..., help="File in the guest (a name as ls shows it, escapes included)."),
        volume: Optional[str] = VolumeOpt, member: Optional[str] = MemberOpt,
        backing: Optional[str] = BackingOpt, qsnap: Optional[str] = QSnapOpt,
        qsnap_alias: Optional[str] = QSnapAlias, backend: str = BackendOpt,
        partial: bool = PartialOpt, disk: List[str] = DiskOpt) -> None:
    """Print a file from the snapshot to stdout (symlinks followed inside the guest)."""
    from . import api
    with _errors(snapshot):
        sink = sys.stdout.buffer
        for chunk in api.cat(snapshot, path,
                             _options(volume, member, backing, qsnap or qsnap_alias, backend, partial, disk)):
            sink.write(chunk)
        sink.flush()


# -- extract --------------------------------------------------------------------

@app.command()
def extract(snapshot: str = SnapshotArg,
            paths: List[str] = typer.Option([], "--path", "-p", metavar="PATH",
                                            help="Guest path to rescue (repeatable; default / unless an application is chosen)."),
            app: List[str] = typer.Option([], "--app", metavar="PROJECT",
                                          help="A compose project: its compose/.env files, volumes, bind mounts, layers."),
            container: List[str] = typer.Option([], "--container", metavar="NAME",
                                                help="A container: its volumes, bind mounts and writable layer."),
            docker_volume: List[str] = typer.Option([], "--docker-volume", metavar="NAME", help="A named volume."),
            output: Optional[str] = typer.Option(None, "-o", "--output", metavar="OUT",
                                                 help="OUT.tar, OUT.tar.gz, OUT.tar.zst, - (stdout), DIR/, "
                                                      "rsync://..., USER@HOST:PATH/, rclone:REMOTE:PATH/"),
            exclude: List[str] = typer.Option([], "--exclude", "-x", metavar="GLOB", help="Glob to leave out (repeatable)."),
            strip_components: int = typer.Option(0, "--strip-components", metavar="N", help="Drop N leading path parts."),
            dry_run: bool = typer.Option(False, "--dry-run", help="Write nothing."),
            list_: bool = typer.Option(False, "--list", help="List what is (or would be) written."),
            devices: bool = typer.Option(False, "--devices", help="Create device nodes in a directory (root)."),
            keep_setuid: bool = typer.Option(False, "--keep-setuid", help="Keep setuid/setgid bits in a directory target (dropped by default, as GNU tar does for a user)."),
            no_xattrs: bool = typer.Option(False, "--no-xattrs", help="Do not copy extended attributes."),
            force: bool = typer.Option(False, "--force", help="Overwrite an existing output file."),
            rsync_opt: List[str] = typer.Option([], "--rsync-opt", metavar="OPT", help="Extra rsync option (repeatable)."),
            scratch_limit: str = typer.Option("1G", "--scratch-limit",
                                              help="Local scratch space for rsync/rclone tree targets (e.g. 512M)."),
            volume: Optional[str] = VolumeOpt, member: Optional[str] = MemberOpt,
            backing: Optional[str] = BackingOpt, qsnap: Optional[str] = QSnapOpt,
            qsnap_alias: Optional[str] = QSnapAlias, backend: str = BackendOpt,
            partial: bool = PartialOpt, disk: List[str] = DiskOpt,
            manifest: Optional[str] = typer.Option(None, "--manifest", metavar="FILE",
                                                   help="Also write the manifest (every entry with its SHA-256) to FILE."),
            embed_manifest: bool = typer.Option(False, "--embed-manifest",
                                                help="Store the manifest inside the target as .rescue-manifest.jsonl."),
            as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON.")) -> None:
    """Copy directories out of the snapshot into a tarball, a folder, or a remote target.

    Example: rescue extract snapshot.tar.gz --path /var/lib/docker/volumes -o volumes.tar.zst
    """
    from contextlib import ExitStack

    from . import api
    from .extract.remote_target import parse_size
    from .extract.targets import TargetOptions
    with _errors(snapshot):
        if output is None and not dry_run:
            raise RescueError("say where the data should go with -o (a .tar/.tar.gz/.tar.zst file, a "
                              "directory ending in '/', '-' for stdout) or use --dry-run --list", layer="extract")
        if output == "-" and sys.stdout.isatty():
            raise RescueError("refusing to write a tar archive to the terminal", layer="extract",
                              hint="redirect it (`-o - > out.tar`, `-o - | tar tvf -`) or name a file with -o")
        request = api.ExtractRequest(paths=paths, apps=app, containers=container, docker_volumes=docker_volume,
                                     excludes=exclude, strip_components=strip_components, xattrs=not no_xattrs,
                                     manifest=manifest, embed_manifest=embed_manifest)
        target = TargetOptions(devices=devices, keep_setuid=keep_setuid or None, force=force, rsync_opts=rsync_opt,
                               scratch_limit=parse_size(scratch_limit))

        with ExitStack() as bars:
            def on_plan(job: "api.ExtractJob"):
                for note in job.notes:
                    err.print(f"note: {_visible(note)}", markup=False)
                for warning in job.warnings:
                    _warn(warning)
                update = bars.enter_context(_progress(job.plan.total_bytes, output == "-", wire=job.fetched))

                def progress(done: int, files: int, path: str) -> None:
                    update(done, files)
                    if list_:
                        err.print(_visible(path), markup=False)
                return progress

            result = api.extract(snapshot, output, request, dry_run=dry_run, target=target,
                                 options=_options(volume, member, backing, qsnap or qsnap_alias, backend, partial, disk),
                                 on_plan=on_plan)
        if result.dry_run:
            for note in result.notes:
                err.print(f"note: {_visible(note)}", markup=False)
            for warning in result.warnings:
                _warn(warning)
            _render_plan(result.plan, list_, as_json)
            raise typer.Exit(EXIT_PARTIAL if result.plan.skipped else EXIT_OK)
        report = result.report
        if as_json:
            _print_json(result.to_json())
        else:
            from .extract.run import SOCKET_REASON, shown_skips
            for skip in shown_skips(report.skipped):
                err.print(f"skipped: {_visible(skip.path)}: {_visible(skip.reason)}", markup=False)
            for sock in report.skipped_sockets:   # named, but no exit 1: a socket holds no data
                err.print(f"skipped socket {_visible(sock)} ({SOCKET_REASON})", markup=False)
            for warning in report.warnings:
                _warn(warning)
            line = (f"rescued {report.files} files, {report.dirs} directories, {report.links} links"
                    f"{f', {report.others} other' if report.others else ''}: {_human(report.bytes)} "
                    f"in {report.seconds:.1f} s -> {report.target}")
            if result.bytes_fetched is not None:
                line += f" ({_human(result.bytes_fetched)} fetched)"
            if report.skipped:
                line += f"; {len(report.skipped)} skipped (listed above)"
            if report.skipped_sockets:
                n = len(report.skipped_sockets)
                line += f"; {n} socket{'s' if n > 1 else ''} not written (hold no data)"
            err.print(line, markup=False)
            if result.restore_commands or result.restore_notes:
                _render_restore(result)
            for db in result.databases:
                err.print(f"database: {_visible(db.summary())}", markup=False)
        raise typer.Exit(EXIT_PARTIAL if report.skipped else EXIT_OK)


def _render_restore(result) -> None:
    from .extract.app_select import README_NAME
    for note in result.restore_notes:
        err.print(f"note: {_visible(note)}", markup=False)
    err.print(f"To put it back on a new server (also in {README_NAME} in the output; R = the output, unpacked):",
              markup=False)
    for line in result.restore_commands:
        err.print(f"  {_visible(line)}", markup=False)


def _render_plan(work, list_: bool, as_json: bool) -> None:
    if as_json:
        _print_json({"entries": [{"name": name, "type": e.kind, "size": e.size}
                                 for e, name in work.entries()] if list_ else work.count,
                     "bytes": work.total_bytes,
                     "skipped": [{"path": s.path, "reason": s.reason} for s in work.skipped],
                     "warnings": work.warnings})
        return
    if list_:
        for e, name in work.entries():   # a plan too large to hold walks the selection again
            size = e.size if e.kind == FILE else 0
            suffix = "/" if e.kind == DIR else ""
            out.print(f"{e.kind:<8} {size:>12} {_visible(name)}{suffix}", markup=False)
    from .extract.run import SOCKET_REASON, shown_skips
    for skip in shown_skips(work.skipped):
        err.print(f"would skip: {_visible(skip.path)}: {_visible(skip.reason)}", markup=False)
    for path in work.socket_paths():   # named, no exit 1 (as the extract itself)
        err.print(f"would skip socket {_visible(path)} ({SOCKET_REASON})", markup=False)
    for warning in work.warnings:
        _warn(warning)
    err.print(f"would write {work.count} entries, {_human(work.total_bytes)} (dry run: nothing written)",
              markup=False)


def _bar(label: str) -> "Progress":
    """A transient progress bar on stderr: label, bar, bytes, speed, time left."""
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)
    return Progress(TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                    console=err, transient=True)


@contextmanager
def _progress(total: int, quiet: bool, wire=None):
    """A progress bar on stderr once the work takes more than a second; `wire()`
    gives the bytes fetched over the network so far (None: a local snapshot)."""
    started = time.monotonic()
    bar: Optional[Progress] = None
    task = None

    last = 0.0

    def update(done: int, files: int) -> None:
        nonlocal bar, task, last
        now = time.monotonic()
        if now - last < 0.1 and done < total:   # ten redraws a second are plenty
            return
        last = now
        if bar is None:
            if quiet and not err.is_terminal or time.monotonic() - started < 1.0:
                return
            bar = _bar("{task.fields[files]} files{task.fields[wire]}")
            bar.start()
            task = bar.add_task("extract", total=total or None, files=0, wire="")
        fetched = wire() if wire is not None else None
        extra = "" if fetched is None else (f", {human_size(fetched)} over the wire at "
                                            f"{human_size(int(fetched / max(now - started, 0.001)))}/s")
        bar.update(task, completed=done, files=files, wire=extra)

    try:
        yield update
    finally:
        if bar is not None:
            bar.stop()


# -- verify -----------------------------------------------------------------------

@app.command()
def verify(args: List[str] = typer.Argument(..., metavar="[SNAPSHOT] TARGET",
                                            help="The snapshot (optional with --manifest) and what an extract wrote."),
           manifest: Optional[str] = typer.Option(None, "--manifest", metavar="FILE",
                                                  help="Compare with this manifest (from extract --manifest)."),
           paths: List[str] = typer.Option([], "--path", "-p", metavar="PATH",
                                           help="The --path the extract used (default: from the manifest, else /)."),
           exclude: List[str] = typer.Option([], "--exclude", "-x", metavar="GLOB", help="The --exclude the extract used."),
           strip_components: Optional[int] = typer.Option(None, "--strip-components", metavar="N"),
           volume: Optional[str] = VolumeOpt, member: Optional[str] = MemberOpt,
           backing: Optional[str] = BackingOpt, qsnap: Optional[str] = QSnapOpt,
           qsnap_alias: Optional[str] = QSnapAlias, backend: str = BackendOpt,
           partial: bool = PartialOpt, disk: List[str] = DiskOpt,
           as_json: bool = typer.Option(False, "--json", help="Print the result as JSON.")) -> None:
    """Check that a tarball, folder, rsync or rclone target holds exactly what the snapshot (or a manifest) does.

    Lists what is missing, extra or different; exit 0 when equal, 1 otherwise.

    \b
    Examples:
      rescue verify snapshot.qcow2 volumes.tar.zst --path /var/lib/docker/volumes
      rescue verify --manifest volumes.manifest.jsonl rsync://backup/mod/volumes/
    """
    from .extract.manifest import read_manifest
    from .extract.verify import verify_target
    if len(args) not in (1, 2):
        err.print("rescue: verify takes [SNAPSHOT] TARGET", markup=False)
        raise typer.Exit(EXIT_ERROR)
    snapshot, target = (args[0], args[1]) if len(args) == 2 else (None, args[0])
    with _errors(snapshot):
        given = None
        if manifest:
            try:
                with open(manifest, "rb") as f:
                    given = read_manifest(f, manifest)
            except OSError as exc:
                raise RescueError(f"cannot read the manifest: {exc.strerror or exc}", file=manifest,
                                  layer="verify") from None
        if snapshot is None:
            report = verify_target(target, manifest=given)
        else:
            with _open(snapshot, volume, member, backing, qsnap or qsnap_alias, backend, partial, disk) as snap:
                fs = snap.filesystem()

                def expected(header):
                    from .extract.run import ExtractOptions
                    from .extract.verify import expected_from_snapshot
                    header = header or {}
                    options = ExtractOptions(paths=paths or header.get("paths") or ["/"],
                                             excludes=exclude or header.get("excludes") or [],
                                             strip_components=strip_components if strip_components is not None
                                             else int(header.get("strip_components") or 0))
                    if header.get("sources"):
                        from .extract.app_select import plan_from_header
                        if not paths:
                            options.paths = list(header.get("paths") or [])
                        return expected_from_snapshot(fs, options,
                                                      plan_fn=lambda f, o: plan_from_header(f, o, header))
                    return expected_from_snapshot(fs, options)

                report = verify_target(target, manifest=given, snapshot_expected=expected)
        if as_json:
            _print_json(report.to_json())
        else:
            for name in report.missing:
                out.print(f"missing:   {_visible(name)}", markup=False)
            for name in report.extra:
                out.print(f"extra:     {_visible(name)}", markup=False)
            for name, fields in report.different:
                out.print(f"different: {_visible(name)}: {_visible('; '.join(fields))}", markup=False)
            for note in report.notes:
                err.print(f"note: {_visible(note)}", markup=False)
            verdict = "equal" if report.equal else (f"NOT equal: {len(report.missing)} missing, "
                                                    f"{len(report.extra)} extra, {len(report.different)} different")
            err.print(f"{report.target} ({report.kind}) vs {report.expected_from}: {report.compared} entries "
                      f"compared, {verdict}", markup=False)
        raise typer.Exit(EXIT_OK if report.equal else EXIT_PARTIAL)


# -- convert ----------------------------------------------------------------------

@app.command()
def convert(snapshot: str = SnapshotArg,
            output: str = typer.Option(..., "-o", "--output", help="Raw disk file to write (sparse)."),
            force: bool = typer.Option(False, "--force", help="Overwrite an existing output file."),
            member: Optional[str] = MemberOpt, backing: Optional[str] = BackingOpt,
            qsnap: Optional[str] = QSnapOpt,
            qsnap_alias: Optional[str] = QSnapAlias,
            as_json: bool = typer.Option(False, "--json", help="Print the result as JSON.")) -> None:
    """Write the whole virtual disk as a sparse raw file, to hand it to any other tool.

    Unallocated and zero areas stay holes; the file appears under its name only
    when complete. Damaged ranges are written as zeros and listed (exit code 1).

    Example: rescue convert snapshot.qcow2 -o disk.raw
    """
    from .disk import DiskOptions, open_disk
    from .extract.convert import convert as run_convert
    from .source import open_source
    with _errors():
        source = open_source(snapshot, member=member)
        try:
            disk = open_disk(source, DiskOptions(backing=backing, internal_snapshot=qsnap or qsnap_alias))
            try:
                for warning in disk.info.warnings:
                    _warn(warning)
                with _download_bar(as_json) as (update, label):
                    label(os.path.basename(output))
                    stats = run_convert(disk, output, progress=update, force=force)
            finally:
                disk.close()
        finally:
            source.close()
        damaged = [{"offset": o, "length": n, "reason": why} for o, n, why in stats.damaged]
        if as_json:
            _print_json({"path": os.path.abspath(output), "format": disk.info.format,
                         "virtual_size": stats.total, "written": stats.written, "holes": stats.holes,
                         "damaged": damaged, "seconds": round(stats.seconds, 3)})
        else:
            for d in damaged:
                err.print(f"damaged: bytes {d['offset']}..{d['offset'] + d['length']} written as zeros: "
                          f"{d['reason']}", markup=False)
            err.print(f"converted {disk.info.format} -> {output}: {_human(stats.total)} virtual, "
                      f"{_human(stats.written)} data, {_human(stats.holes)} holes, {stats.seconds:.1f} s",
                      markup=False)
        raise typer.Exit(EXIT_PARTIAL if stats.damaged else EXIT_OK)


# -- download and provider snapshots ---------------------------------------------

@app.command()
def download(source: str = typer.Argument(..., metavar="URL|kiwivm",
                                          help="http(s):// link to download, or the word kiwivm."),
             output: str = typer.Option(..., "-o", "--output",
                                        help="File to write (a URL), or folder (kiwivm)."),
             md5: Optional[str] = typer.Option(None, "--md5", help="Expected MD5 (hex) of the file."),
             sha256: Optional[str] = typer.Option(None, "--sha256", help="Expected SHA-256 (hex)."),
             connections: int = typer.Option(1, "--connections", "-c", min=1, max=16,
                                             help="Parallel ranges (servers that allow it)."),
             force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
             veid: Optional[str] = typer.Option(None, "--veid", help="kiwivm: the VPS id (VEID)."),
             snap_name: Optional[str] = typer.Option(None, "--snapshot", metavar="NAME",
                                                     help="kiwivm: snapshot fileName to download."),
             latest: bool = typer.Option(False, "--latest", help="kiwivm: the newest snapshot."),
             api_key: Optional[str] = typer.Option(None, "--api-key",
                                                   help="kiwivm: API key (better: env RESCUE_KIWIVM_API_KEY)."),
             api_url: Optional[str] = typer.Option(None, "--api-url",
                                                   help="kiwivm: API base URL (env RESCUE_KIWIVM_API_URL)."),
             as_json: bool = typer.Option(False, "--json", help="Print the result as JSON.")) -> None:
    """Download a snapshot so it survives a bad network: resumes, retries, verifies.

    Writes OUT.part and renames it to OUT only when complete and verified; run the
    same command again after an interruption and it continues where it stopped.

    Examples:

    \b
      rescue download 'https://bucket.s3.amazonaws.com/disk.vmdk?X-Amz-...' -o disk.vmdk --md5 HEX
      rescue download kiwivm --veid 123456 --latest -o snapshots/
    """
    with _errors():
        kiwi = source.lower() == "kiwivm"
        if kiwi:
            if md5 or sha256:
                raise RescueError("--md5/--sha256 are for URLs; KiwiVM's listed md5 is checked anyway",
                                  layer="download")
            if not veid:
                raise RescueError("kiwivm needs --veid ID (KiwiVM panel -> API)", layer="download")
            from .providers.kiwivm import download_snapshot
            with _download_bar(as_json) as (update, label):
                snap, res = download_snapshot(
                    veid, output, api_key=api_key, api_url=api_url, snapshot=snap_name, latest=latest,
                    connections=connections, progress=update, force=force, warn=_warn,
                    on_chosen=lambda s: label(s.file_name))
        else:
            if veid or snap_name or latest or api_key or api_url:
                raise RescueError("--veid/--snapshot/--latest/--api-key/--api-url belong to "
                                  "`rescue download kiwivm`", layer="download")
            if not source.lower().startswith(("http://", "https://")):
                raise RescueError(f"{source!r} is neither an http(s):// URL nor 'kiwivm'", layer="download",
                                  hint="quote the URL: shells cut it at '&'")
            from .download import download as run_download
            with _download_bar(as_json) as (update, label):
                label(os.path.basename(output))
                res = run_download(source, output, md5=md5, sha256=sha256, connections=connections,
                                   progress=update, force=force, warn=_warn)
        if as_json:
            data = {"path": res.path, "size": res.size, "fetched": res.fetched,
                    "resumed_from": res.resumed_from, "requests": res.requests,
                    "verified": res.digests, "warnings": res.warnings}
            if kiwi:
                data["snapshot"] = {k: v for k, v in snap.to_json().items() if not k.startswith("download")}
            _print_json(data)
            return
        checks = ", ".join(f"{k} verified" for k in res.digests) or "no checksum given, not verified"
        resumed = f", resumed at {_human(res.resumed_from)}" if res.resumed_from else ""
        err.print(f"downloaded {_human(res.size)} -> {res.path} ({checks}{resumed}; "
                  f"{_human(res.fetched)} fetched)", markup=False)


@app.command()
def snapshots(provider: str = typer.Argument(..., metavar="kiwivm", help="Provider (kiwivm)."),
              veid: str = typer.Option(..., "--veid", help="The VPS id (VEID)."),
              api_key: Optional[str] = typer.Option(None, "--api-key",
                                                    help="API key (better: env RESCUE_KIWIVM_API_KEY)."),
              api_url: Optional[str] = typer.Option(None, "--api-url",
                                                    help="API base URL (env RESCUE_KIWIVM_API_URL)."),
              as_json: bool = typer.Option(False, "--json", help="The API's fields as JSON.")) -> None:
    """List the snapshots a provider keeps for your server (then: rescue download kiwivm ...)."""
    with _errors():
        if provider.lower() != "kiwivm":
            raise RescueError(f"unknown provider {provider!r}; known: kiwivm", layer="kiwivm")
        from .providers.kiwivm import list_snapshots
        snaps = list_snapshots(veid, api_key, api_url)
        if as_json:
            _print_json([s.to_json() for s in snaps])
            return
        if not snaps:
            err.print("no snapshots (create one in KiwiVM -> Snapshots)", markup=False)
            return
        from rich.table import Table
        table = Table(show_header=True, header_style="bold")
        for col in ("fileName", "os", "description", "size", "md5", "sticky", "purges in"):
            table.add_column(col, overflow="fold")
        for s in snaps:
            days = f"{s.purges_in / 86400:.1f} days" if s.purges_in is not None else ""
            table.add_row(s.file_name, s.os, s.description, _human(s.size), s.md5 or "",
                          "yes" if s.sticky else "", days)
        out.print(table)
        err.print(f"download one: rescue download kiwivm --veid {veid} --snapshot FILE -o DIR",
                  markup=False)


def _warn(text: str) -> None:
    err.print(f"warning: {_visible(text)}", markup=False)


@contextmanager
def _download_bar(quiet: bool):
    """Bytes, rate and ETA on stderr (only on a terminal); thread-safe updates."""
    bar: Optional[Progress] = None
    task = None
    name = {"text": "download"}

    def update(done: int, total: Optional[int]) -> None:
        nonlocal bar, task
        if bar is None:
            if not err.is_terminal:
                return
            bar = _bar("{task.description}")
            bar.start()
            task = bar.add_task(name["text"], total=total)
        bar.update(task, completed=done, total=total)

    def label(text: str) -> None:
        name["text"] = text

    try:
        yield update, label
    finally:
        if bar is not None:
            bar.stop()


def main() -> None:
    install_signal_handlers()   # SIGTERM and SIGHUP clean up like Ctrl-C
    try:
        try:
            app()
        except SystemExit:
            caught = interruption()   # a signal before a command's own handling (Typer says 130 or 1)
            if caught is None or caught.reported:
                raise
            err.print(f"rescue: interrupted ({caught.name})", markup=False)
            sys.exit(caught.exit_code)
        except KeyboardInterrupt as exc:   # while Typer builds the command, before any work
            err.print(f"rescue: interrupted ({getattr(exc, 'name', 'SIGINT')})", markup=False)
            sys.exit(getattr(exc, "exit_code", 130))
    except BrokenPipeError:   # `rescue cat ... | head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        sys.exit(0)


if __name__ == "__main__":
    main()
