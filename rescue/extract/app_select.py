"""Selecting by application: `--app PROJECT`, `--container NAME`, `--docker-volume NAME`.

A selection becomes a list of sources, each a guest path and the name it gets
in the output, laid out so that restoring is obvious:

    volumes/<name>/...         a named volume's content (its _data directory)
    binds/<host path>/...      a bind mount's source, under its original path
    compose/<project>/...      the project's compose files and .env files
    layer/<container>/...      files written inside a container (its writable layer;
                               overlay whiteouts, the 0:0 devices marking deletions, left out)

The output also gets README_NAME with the commands that put each piece back on
a new server, and the same commands are printed by `rescue extract`.
"""

from __future__ import annotations

import posixpath
import re
import shlex
import time
from dataclasses import dataclass, field

from ..errors import GuestPathError, RescueError
from ..fs.base import CHAR, FILE, Entry, FileSystem
from ..guest.apps import Applications
from .base import Content, Item
from .run import ExtractOptions, Plan, Planned, Skipped, plan

README_NAME = "README-rescue.txt"
# Close to Docker's own rule for container and volume names; applied to the names
# taken from the engine's records that become output components.
_SAFE = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.@:+, =-]*")


@dataclass
class Source:
    guest_path: str
    name: str                    # output name of guest_path itself ("volumes/blog_dbdata")
    what: str                    # "volume", "bind", "compose", "layer", "path"
    label: str = ""              # volume / container / project it belongs to
    project: str | None = None
    optional: bool = False       # a bind source missing from the snapshot is reported, not fatal


@dataclass
class AppSelection:
    sources: list[Source] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)       # what could not be included, and why
    projects: list[str] = field(default_factory=list)
    containers: list[str] = field(default_factory=list)

    def add(self, src: Source) -> None:
        # Names come from the engine's records (untrusted): each output component
        # must be a plain name, like the names Docker itself allows.
        parts = src.name.split("/")
        checked = parts[1:] if src.what != "bind" else []   # a bind's parts come from a normalised path
        bad = next((part for part in checked if part in (".", "..") or not _SAFE.fullmatch(part)), None)
        if bad is not None:
            self.notes.append(f"{src.guest_path} left out: the name {bad!r} from the engine's records "
                              "cannot be a file name")
            return
        if not any(s.name == src.name for s in self.sources):
            self.sources.append(src)

    def header(self) -> dict:
        """What a manifest records so `verify` can walk the same selection again."""
        return {"layout": "apps", "sources": [[s.guest_path, s.name, s.what] for s in self.sources]}


def select_apps(apps: Applications, *, projects: list[str] = (), containers: list[str] = (),
                volumes: list[str] = ()) -> AppSelection:
    """The sources of the named projects, containers and volumes. Unknown names
    raise one RescueError that lists the known ones."""
    sel = AppSelection()
    for name in projects:
        p = apps.project(name)
        if p is None:
            known = ", ".join(x.name for x in apps.projects) or "none found"
            raise RescueError(f"no compose project {name!r} in this snapshot (projects: {known})",
                              layer="extract", hint="`rescue inspect SNAPSHOT` lists containers and projects")
        sel.projects.append(p.name)
        for f in p.config_files + p.env_files:
            sel.add(Source(f, f"compose/{p.name}/{posixpath.basename(f)}", "compose", p.name, p.name, optional=True))
        for cname in p.containers:
            _container(apps, cname, sel, project=p.name, with_layer=True)
        for vname in p.volumes:
            _volume(apps, vname, sel, p.name)
    for name in containers:
        c = apps.container(name)
        if c is None:
            known = ", ".join(x.name for x in apps.containers) or "none found"
            raise RescueError(f"no container {name!r} in this snapshot (containers: {known})", layer="extract",
                              hint="`rescue inspect SNAPSHOT` lists containers and projects")
        _container(apps, c.name, sel, project=c.project, with_layer=True)
    for name in volumes:
        if apps.volume(name) is None:
            known = ", ".join(v.name for v in apps.volumes) or "none found"
            raise RescueError(f"no volume {name!r} in this snapshot (volumes: {known})", layer="extract",
                              hint="`rescue inspect SNAPSHOT` lists volumes")
        _volume(apps, name, sel, None)
    return sel


def _container(apps: Applications, name: str, sel: AppSelection, *, project: str | None, with_layer: bool) -> None:
    c = apps.container(name)
    if c is None:
        return
    if c.name not in sel.containers:
        sel.containers.append(c.name)
    for m in c.mounts:
        if m.kind == "volume" and m.source:
            _volume(apps, m.source, sel, project)
        elif m.kind == "bind" and m.guest_path:
            if not m.present:
                sel.notes.append(f"{c.name}: bind mount source {m.source} is not in this snapshot")
                continue
            sel.add(Source(m.guest_path, "binds/" + m.guest_path.strip("/"), "bind", c.name, project, optional=True))
        elif m.kind == "tmpfs":
            sel.notes.append(f"{c.name}: {m.destination} was a tmpfs (memory only): nothing of it is on disk")
    if with_layer and c.layer_path and c.layer:
        sel.add(Source(c.layer_path, f"layer/{c.name}", "layer", c.name, project))


def _volume(apps: Applications, name: str, sel: AppSelection, project: str | None) -> None:
    v = apps.volume(name)
    if v is None:
        sel.notes.append(f"volume {name} is used by a container but is not in this snapshot")
        return
    if project is None:   # a volume chosen alone still gets its compose project's labels back
        project = next((p.name for p in apps.projects if v.name in p.volumes), None)
    sel.add(Source(v.path, f"volumes/{v.name}", "volume", v.name, project))


def plan_sources(fs: FileSystem, sources: list[Source] | list[list[str]], options: ExtractOptions,
                 on_missing=None) -> Plan:
    """Walk every source like `plan` walks a --path, naming entries below the
    source's output name. `sources` may be Source records or a manifest's
    [guest_path, name, what] triples."""
    items: list[Planned] = []
    skipped: list[Skipped] = []
    total = 0
    seen: set[str] = set()
    for src in sources:
        guest, out, what = (src.guest_path, src.name, src.what) if isinstance(src, Source) else tuple(src[:3])
        depth = len([p for p in guest.split("/") if p])
        sub = ExtractOptions(paths=[guest], excludes=options.excludes, strip_components=depth - 1,
                             xattrs=options.xattrs)
        try:
            part = plan(fs, sub)
        except GuestPathError as exc:
            if on_missing is not None and (not isinstance(src, Source) or src.optional):
                on_missing(guest, exc.problem)
                continue
            raise
        skipped.extend(part.skipped)
        for p in part.items:
            rest = p.name.split("/", 1)
            name = out if len(rest) == 1 else f"{out}/{rest[1]}"
            if what == "layer" and _is_whiteout(p.entry):
                continue
            if name in seen:
                continue
            seen.add(name)
            items.append(Planned(p.entry, name))
            if p.entry.kind == FILE:
                total += p.entry.size
    return Plan(items, total, skipped)


def _is_whiteout(entry: Entry) -> bool:
    return entry.kind == CHAR and tuple(entry.rdev or (0, 0)) == (0, 0)


def merge_plans(*plans: Plan) -> Plan:
    items: list[Planned] = []
    seen: set[str] = set()
    skipped: list[Skipped] = []
    total = 0
    for pl in plans:
        skipped.extend(pl.skipped)
        for p in pl.items:
            if p.name in seen:
                continue
            seen.add(p.name)
            items.append(p)
            if p.entry.kind == FILE:
                total += p.entry.size
    return Plan(items, total, skipped)


# -- putting it back -----------------------------------------------------------------

def restore_commands(sel: AppSelection, apps: Applications, root: str = "R") -> list[str]:
    """Shell lines that put each source back on a new server, from the unpacked output in `root`."""
    q = shlex.quote
    lines: list[str] = []
    for s in sel.sources:
        if s.what == "volume":
            labels = ""
            if s.project and s.label.startswith(s.project + "_"):
                labels = (f"--label com.docker.compose.project={q(s.project)} "
                          f"--label com.docker.compose.volume={q(s.label[len(s.project) + 1:])} ")
            lines.append(f"docker volume create {labels}{q(s.label)} && "
                         f"cp -a {q(root + '/' + s.name)}/. \"$(docker volume inspect -f '{{{{.Mountpoint}}}}' "
                         f"{q(s.label)})/\"")
    for s in sel.sources:
        if s.what == "bind":
            lines.append(f"mkdir -p {q(s.guest_path)} && cp -a {q(root + '/' + s.name)}/. {q(s.guest_path)}/")
    for project in sel.projects:
        p = apps.project(project)
        if p is None or not p.working_dir:
            continue
        lines.append(f"mkdir -p {q(p.working_dir)} && cp -a {q(root + '/compose/' + p.name)}/. {q(p.working_dir)}/")
        lines.append(f"cd {q(p.working_dir)} && docker compose up -d")
    for s in sel.sources:
        if s.what == "layer":
            lines.append(f"# after {s.label} is recreated (files it had written outside its volumes):")
            lines.append(f"docker cp {q(root + '/' + s.name)}/. {q(s.label)}:/")
    return lines


def readme(sel: AppSelection, apps: Applications, snapshot: str, extra_notes: list[str] = ()) -> str:
    layout = {"volume": "the content of the Docker volume of that name",
              "bind": "a bind-mount source, under its original host path",
              "compose": "a compose or .env file of the project",
              "layer": "files written inside that container outside any volume: its writable layer"}
    out = [f"Rescued by `rescue` from {snapshot} on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", ""]
    if sel.projects:
        out.append("Compose projects: " + ", ".join(sel.projects))
    if sel.containers:
        out.append("Containers: " + ", ".join(sel.containers))
    out += ["", "What is here:"]
    for s in sel.sources:
        slash = "" if s.what == "compose" else "/"
        out.append(f"  {s.name}{slash}  <- {s.guest_path}  ({layout.get(s.what, s.what)})")
    out += ["", "To put it back on a new server (as root, with Docker installed): unpack this output",
            "into a directory R first if it is a tarball (mkdir R && tar -xpf OUTPUT.tar -C R --numeric-owner),",
            "then run:", ""]
    out += ["  " + line for line in restore_commands(sel, apps)]
    notes = list(sel.notes) + list(extra_notes)
    if notes:
        out += ["", "Notes:"] + [f"  - {n}" for n in notes]
    out += ["", "Check what arrived against the snapshot with: rescue verify SNAPSHOT OUTPUT", ""]
    return "\n".join(out)


def text_item(name: str, text: str) -> Item:
    import os
    data = text.encode("utf-8", "surrogateescape")
    uid = os.geteuid() if hasattr(os, "geteuid") else 0
    gid = os.getegid() if hasattr(os, "getegid") else 0
    entry = Entry(path="/" + name, kind=FILE, mode=0o644, uid=uid, gid=gid, size=len(data), mtime_ns=time.time_ns())
    return Item(name=name, entry=entry, content=Content(size=len(data), chunks=lambda: iter((data,)),
                                                        read_range=lambda o, n: data[o:o + n]))


__all__ = ["AppSelection", "README_NAME", "Source", "merge_plans", "plan_sources", "readme", "restore_commands",
           "select_apps", "text_item"]


@dataclass
class AppPlan:
    """Everything `extract` needs for an application selection."""

    plan: Plan
    selection: AppSelection
    apps: Applications
    trailer: list[Item]
    commands: list[str]


def plan_apps(fs: FileSystem, options: ExtractOptions, *, snapshot: str, projects: list[str] = (),
              containers: list[str] = (), volumes: list[str] = ()) -> AppPlan:
    """Plan --path entries (as usual) plus the named applications' sources."""
    from ..guest.apps import find_applications
    apps = find_applications(fs)
    sel = select_apps(apps, projects=list(projects), containers=list(containers), volumes=list(volumes))
    missing: list[str] = []
    parts = [plan(fs, options)] if options.paths else []
    parts.append(plan_sources(fs, sel.sources, options,
                              on_missing=lambda path, why: missing.append(f"{path} is not in this snapshot")))
    sel.notes.extend(missing)
    work = merge_plans(*parts)
    trailer = [text_item(README_NAME, readme(sel, apps, snapshot))]
    return AppPlan(work, sel, apps, trailer, restore_commands(sel, apps))


def plan_from_header(fs: FileSystem, options: ExtractOptions, header: dict) -> Plan:
    """The plan a manifest's header describes (for `verify` against the snapshot)."""
    sources = header.get("sources") or []
    parts = [plan(fs, options)] if options.paths else []
    if sources:
        parts.append(plan_sources(fs, [list(s) for s in sources], options, on_missing=lambda *_: None))
    return merge_plans(*parts) if parts else Plan([], 0, [])
