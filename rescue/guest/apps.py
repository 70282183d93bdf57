"""Containers, compose projects and volumes, from the engines' own records.

Docker (moby, `daemon/container.go`, `volume/mounts`): every container has
    DATA_ROOT/containers/<id>/config.v2.json   name, image, state, labels, MountPoints
    DATA_ROOT/containers/<id>/hostconfig.json  Binds, Mounts, Tmpfs, RestartPolicy
its writable layer (overlay2 driver) is
    DATA_ROOT/image/overlay2/layerdb/mounts/<id>/mount-id -> DATA_ROOT/overlay2/<mount-id>/diff
and named volumes live in DATA_ROOT/volumes/<name>/_data. DATA_ROOT is
/var/lib/docker unless /etc/docker/daemon.json says "data-root" (older: "graph")
or the service is started with --data-root. Compose (v1 and v2) labels each
container with com.docker.compose.project, .service, .project.working_dir and
.project.config_files: that is how a project is found after the fact.
With the containerd image store (Docker 24+ opt-in) the writable layer is a
containerd snapshot whose id is in containerd's BoltDB: not read here.

Podman (containers/storage, `containers.go`): STORAGE/overlay-containers/
containers.json lists id, names, image and the writable layer id (its files in
STORAGE/overlay/<layer>/diff); volumes are STORAGE/volumes/<name>/_data.
STORAGE is /var/lib/containers/storage (rootful, or graphroot in
/etc/containers/storage.conf) and ~/.local/share/containers/storage (rootless).
Podman keeps state and mounts in libpod's database: db.sql (SQLite, Podman 4.8+)
is read; bolt_state.db (BoltDB, older) is not, and that is said.

Everything here is a survey: an unreadable record becomes a warning naming its
guest path, never an error. Sizes are allocated bytes (a sparse file counts
what it holds), walked with a budget.
"""

from __future__ import annotations

import json
import posixpath
import re
import sqlite3
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import RescueError
from ..fs.base import DIR, FILE, SYMLINK, FileSystem, normalize
from . import survey
from .survey import WALK_BUDGET, Size, measure

DOCKER_DEFAULT_ROOT = "/var/lib/docker"
PODMAN_ROOTFUL = "/var/lib/containers/storage"
PODMAN_ROOTLESS = ".local/share/containers/storage"
RECORD_LIMIT = 8 << 20   # a config.v2.json is a few KiB; a bigger one is not a record
COMPOSE = "com.docker.compose."


@dataclass
class Mount:
    kind: str                    # "volume", "bind", "tmpfs"
    destination: str             # path inside the container
    source: str = ""             # volume name, host path, or tmpfs options
    rw: bool = True
    guest_path: str | None = None  # where its data is in the snapshot (volume _data, bind source)
    present: bool = True         # guest_path exists in the snapshot


@dataclass
class Container:
    engine: str                  # "docker", "podman"
    id: str
    name: str
    image: str
    state: str                   # "running", "exited (137)", "created", ...
    record: str                  # guest path of its record
    project: str | None = None
    service: str | None = None
    working_dir: str | None = None
    config_files: list[str] = field(default_factory=list)
    mounts: list[Mount] = field(default_factory=list)
    layer_path: str | None = None  # guest path of the writable layer's files
    layer: Size | None = None      # set when the layer holds files
    restart: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    owner: str | None = None       # rootless Podman: the home it lives in


@dataclass
class Volume:
    engine: str
    name: str
    path: str                    # guest path of _data
    used_by: list[str] = field(default_factory=list)
    size: Size = field(default_factory=Size)
    usage_known: bool = True     # False: the engine's records of who mounts it could not be read


@dataclass
class Project:
    name: str
    working_dir: str | None = None
    config_files: list[str] = field(default_factory=list)
    env_files: list[str] = field(default_factory=list)
    services: list[str] = field(default_factory=list)
    containers: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    binds: list[str] = field(default_factory=list)       # host paths
    missing: list[str] = field(default_factory=list)     # files named by the labels but not in the snapshot


@dataclass
class Engine:
    engine: str
    root: str                    # data-root / graphroot as configured (guest path)
    found: bool
    why: str                     # where the root came from
    real_root: str | None = None # after following symlinks inside the guest


@dataclass
class Applications:
    engines: list[Engine] = field(default_factory=list)
    containers: list[Container] = field(default_factory=list)
    volumes: list[Volume] = field(default_factory=list)
    projects: list[Project] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"engines": [asdict(e) for e in self.engines],
                "containers": [asdict(c) for c in self.containers],
                "volumes": [asdict(v) for v in self.volumes],
                "unused_volumes": [v.name for v in self.volumes if not v.used_by and v.usage_known],
                "projects": [asdict(p) for p in self.projects],
                "warnings": self.warnings}

    def project(self, name: str) -> Project | None:
        return next((p for p in self.projects if p.name == name), None)

    def container(self, name: str) -> Container | None:
        name = name.lstrip("/")
        return next((c for c in self.containers if c.name == name or c.id.startswith(name)), None)

    def volume(self, name: str) -> Volume | None:
        return next((v for v in self.volumes if v.name == name), None)


# -- small readers ------------------------------------------------------------------

def _read_json(fs: FileSystem, path: str, warnings: list[str]) -> Any:
    try:
        raw = fs.read_file(path, limit=RECORD_LIMIT)
    except (RescueError, OSError) as exc:
        warnings.append(f"{path}: cannot be read ({exc})")
        return None
    try:
        return json.loads(raw.decode("utf-8", "replace") or "null")
    except ValueError as exc:
        warnings.append(f"{path}: not valid JSON ({exc}); the record is damaged or was being written")
        return None


# -- Docker -----------------------------------------------------------------------------

def docker_root(fs: FileSystem, warnings: list[str]) -> Engine:
    """Where this server's Docker keeps its data, and how we know."""
    root, why = DOCKER_DEFAULT_ROOT, "default"
    daemon = "/etc/docker/daemon.json"
    if survey.resolve(fs, daemon) is not None:
        conf = _read_json(fs, daemon, warnings)
        if isinstance(conf, dict):
            for key in ("data-root", "graph"):
                if isinstance(conf.get(key), str) and conf[key].startswith("/"):
                    root, why = normalize(conf[key]), f"{daemon} \"{key}\""
                    break
    if why == "default":
        for unit_dir in ("/etc/systemd/system/docker.service.d", "/etc/default"):
            for e in survey.listdir(fs, unit_dir):
                if e.kind != FILE or not (e.name.endswith(".conf") or e.name == "docker"):
                    continue
                try:
                    text = fs.read_file(e.path, limit=1 << 16).decode("utf-8", "replace")
                except (RescueError, OSError):
                    continue
                m = re.search(r"(?:--data-root|--graph|(?<![\w-])-g)[= ]+(/[^\s\"']+)", text)
                if m:
                    root, why = normalize(m.group(1)), e.path
    engine = Engine("docker", root, False, why)
    real = survey.resolve(fs, root)
    if real is not None and real.kind == DIR:
        engine.found, engine.real_root = True, real.path
        return engine
    # Name what is missing plainly: a symlink to another disk is the usual story.
    link = _first_link(fs, root)
    if link is not None:
        path, target = link
        warnings.append(f"{path} is a symlink to {target}, which is not in this snapshot: Docker's data "
                        "(containers, volumes) was on storage the snapshot does not include (a second disk or "
                        "a mount missing from /etc/fstab? add its image with --disk)")
    elif why != "default":
        warnings.append(f"Docker's data-root is {root} ({why}), but {root} is not in this snapshot "
                        "(a second disk? add its image with --disk)")
    return engine


def _first_link(fs: FileSystem, path: str) -> tuple[str, str] | None:
    cur = "/"
    for part in [p for p in path.split("/") if p]:
        cur = posixpath.join(cur, part)
        entry = survey.stat(fs, cur)
        if entry is None:
            return None
        if entry.kind == SYMLINK:
            return cur, entry.link_target or ""
    return None


def _docker_state(state: dict) -> str:
    if not isinstance(state, dict):
        return "unknown"
    if state.get("Dead"):
        return "dead"
    if state.get("Restarting"):
        return "restarting"
    if state.get("Paused"):
        return "paused"
    if state.get("Running"):
        return "running"
    if str(state.get("StartedAt", "")).startswith("0001-"):
        return "created"
    return f"exited ({state.get('ExitCode', '?')})"


def read_docker(fs: FileSystem, engine: Engine, apps: Applications, budget: int) -> None:
    root = engine.real_root or engine.root
    shown = engine.root
    volumes_dir = posixpath.join(root, "volumes")
    for e in survey.listdir(fs, volumes_dir):
        data = posixpath.join(e.path, "_data")
        if e.kind == DIR and (st := survey.stat(fs, data)) is not None and st.kind == DIR:
            apps.volumes.append(Volume("docker", e.name, posixpath.join(shown, "volumes", e.name, "_data")))
    for e in survey.listdir(fs, posixpath.join(root, "containers")):
        if e.kind != DIR:
            continue
        rec_path = posixpath.join(shown, "containers", e.name, "config.v2.json")
        cfg = _read_json(fs, posixpath.join(e.path, "config.v2.json"), apps.warnings)
        if not isinstance(cfg, dict):
            continue
        host = _read_json(fs, posixpath.join(e.path, "hostconfig.json"), apps.warnings) \
            if survey.stat(fs, posixpath.join(e.path, "hostconfig.json")) else None
        host = host if isinstance(host, dict) else {}
        config = cfg.get("Config") if isinstance(cfg.get("Config"), dict) else {}
        labels = config.get("Labels") if isinstance(config.get("Labels"), dict) else {}
        state = cfg.get("State") if isinstance(cfg.get("State"), dict) else {}
        c = Container("docker", str(cfg.get("ID") or e.name), str(cfg.get("Name") or e.name[:12]).lstrip("/"),
                      str(config.get("Image") or cfg.get("Image") or "?"), _docker_state(state), rec_path,
                      started_at=state.get("StartedAt"), finished_at=state.get("FinishedAt"))
        _compose_labels(c, labels)
        policy = host.get("RestartPolicy")
        if isinstance(policy, dict) and policy.get("Name") not in (None, "", "no"):
            c.restart = str(policy.get("Name"))
        points = cfg.get("MountPoints") if isinstance(cfg.get("MountPoints"), dict) else {}
        for dest, mp in sorted(points.items()):
            if not isinstance(mp, dict):
                continue
            kind = str(mp.get("Type") or ("volume" if mp.get("Name") else "bind"))
            if kind == "volume":
                name = str(mp.get("Name") or "")
                guest = posixpath.join(shown, "volumes", name, "_data")
                c.mounts.append(Mount("volume", dest, name, bool(mp.get("RW", True)), guest,
                                      survey.stat(fs, posixpath.join(root, "volumes", name, "_data")) is not None))
            elif kind == "bind":
                src = normalize(str(mp.get("Source") or ""))
                c.mounts.append(Mount("bind", dest, src, bool(mp.get("RW", True)), src, survey.resolve(fs, src) is not None))
            else:
                c.mounts.append(Mount(kind, dest, str(mp.get("Source") or ""), bool(mp.get("RW", True))))
        tmpfs = host.get("Tmpfs") if isinstance(host.get("Tmpfs"), dict) else {}
        for dest, opts in sorted(tmpfs.items()):
            c.mounts.append(Mount("tmpfs", dest, str(opts or ""), True, None, False))
        for m in host.get("Mounts") or []:
            if isinstance(m, dict) and m.get("Type") == "tmpfs" and not any(x.destination == m.get("Target")
                                                                             for x in c.mounts):
                c.mounts.append(Mount("tmpfs", str(m.get("Target")), "", True, None, False))
        driver = str(cfg.get("Driver") or "")
        if driver in ("overlay2", "overlay"):
            mount_id_path = posixpath.join(root, "image", driver, "layerdb", "mounts", c.id, "mount-id")
            try:
                mount_id = fs.read_file(mount_id_path, limit=256).decode("ascii", "replace").strip()
            except (RescueError, OSError):
                mount_id = ""
            if re.fullmatch(r"[0-9a-f]{16,128}", mount_id):
                diff = posixpath.join(root, driver, mount_id, "diff")
                if survey.stat(fs, diff) is not None:
                    c.layer_path = posixpath.join(shown, driver, mount_id, "diff")
                    size = measure(fs, diff, budget)
                    c.layer = size if size.files else None
            else:
                apps.warnings.append(f"{mount_id_path.replace(root, shown, 1)}: missing or unreadable; the "
                                     f"writable layer of {c.name} cannot be found")
        elif driver:
            apps.warnings.append(f"{rec_path}: storage driver {driver!r}: the writable layer of {c.name} "
                                 "is not located (overlay2 only)")
        apps.containers.append(c)


def _compose_labels(c: Container, labels: dict) -> None:
    if not isinstance(labels, dict):
        return
    c.project = labels.get(COMPOSE + "project") or None
    c.service = labels.get(COMPOSE + "service") or None
    c.working_dir = labels.get(COMPOSE + "project.working_dir") or None
    files = labels.get(COMPOSE + "project.config_files") or ""
    c.config_files = [f for f in str(files).split(",") if f]
    if not c.project and labels.get("io.podman.compose.project"):
        c.project = labels.get("io.podman.compose.project")
        c.service = labels.get("io.podman.compose.service")


# -- Podman ------------------------------------------------------------------------------

def podman_roots(fs: FileSystem, warnings: list[str]) -> list[tuple[str, str | None, str]]:
    """(storage root, owner for rootless, why) of every Podman storage in the guest."""
    roots: list[tuple[str, str | None, str]] = []
    graphroot, why = PODMAN_ROOTFUL, "default"
    conf = "/etc/containers/storage.conf"
    try:
        text = fs.read_file(conf, limit=1 << 20).decode("utf-8", "replace")
        m = re.search(r'^\s*graphroot\s*=\s*"([^"]+)"', text, re.M)
        if m and m.group(1).startswith("/"):
            graphroot, why = normalize(m.group(1)), f"{conf} graphroot"
    except (RescueError, OSError):
        pass
    roots.append((graphroot, None, why))
    homes = [("/root", "root")] + [(e.path, e.name) for e in survey.listdir(fs, "/home") if e.kind == DIR]
    for home, owner in homes:
        roots.append((posixpath.join(home, PODMAN_ROOTLESS), owner, "rootless"))
    return roots


def read_podman(fs: FileSystem, apps: Applications, budget: int) -> None:
    for root, owner, why in podman_roots(fs, apps.warnings):
        real = survey.resolve(fs, root)
        if real is None or real.kind != DIR:
            continue
        apps.engines.append(Engine("podman", root, True, why, real.path))
        engine = "podman" if owner is None else f"podman (rootless, {owner})"
        for e in survey.listdir(fs, posixpath.join(real.path, "volumes")):
            if e.kind == DIR and survey.stat(fs, posixpath.join(e.path, "_data")) is not None:
                apps.volumes.append(Volume(engine, e.name, posixpath.join(root, "volumes", e.name, "_data")))
        records = posixpath.join(real.path, "overlay-containers", "containers.json")
        listed = _read_json(fs, records, apps.warnings) if survey.stat(fs, records) else None
        if not isinstance(listed, list):
            continue
        libpod = _podman_db(fs, real.path, root, apps.warnings) or _podman_bolt(fs, real.path, root, apps.warnings)
        for rec in listed:
            if not isinstance(rec, dict) or not rec.get("id"):
                continue
            try:
                meta = json.loads(rec.get("metadata") or "{}")
            except ValueError:
                meta = {}
            names = rec.get("names") or []
            name = str(names[0] if names else meta.get("name") or rec["id"][:12])
            c = Container(engine, str(rec["id"]), name, str(meta.get("image-name") or rec.get("image") or "?"),
                          "unknown", posixpath.join(root, "overlay-containers", "containers.json"),
                          owner=owner)
            info = libpod.get(c.id)
            if info:
                _podman_details(c, info, fs, root, real.path)
            layer = rec.get("layer")
            if isinstance(layer, str) and re.fullmatch(r"[0-9a-f]{16,128}", layer):
                diff = posixpath.join(real.path, "overlay", layer, "diff")
                if survey.stat(fs, diff) is not None:
                    c.layer_path = posixpath.join(root, "overlay", layer, "diff")
                    size = measure(fs, diff, budget)
                    c.layer = size if size.files else None
            apps.containers.append(c)
        if not libpod and listed:
            apps.warnings.append(f"{root}: no readable libpod database (db.sql or libpod/bolt_state.db): "
                                 "Podman containers are listed without state, volumes and binds")
            for v in apps.volumes:
                if v.engine == engine:
                    v.usage_known = False


def _podman_db(fs: FileSystem, real_root: str, root: str, warnings: list[str]) -> dict[str, dict]:
    """libpod's SQLite database (db.sql): container id -> {"config": ..., "state": ...}."""
    path = posixpath.join(real_root, "db.sql")
    entry = survey.stat(fs, path)
    if entry is None or entry.kind != FILE:
        return {}
    out: dict[str, dict] = {}
    try:
        data = fs.read_file(path, limit=256 << 20)
        with tempfile.NamedTemporaryFile(suffix=".sql") as tmp:   # sqlite3 needs a real file; a copy keeps
            tmp.write(data)                                       # the snapshot untouched
            tmp.flush()
            con = sqlite3.connect(f"file:{tmp.name}?mode=ro", uri=True)
            try:
                for cid, js in con.execute("SELECT ID, JSON FROM ContainerConfig"):
                    out.setdefault(cid, {})["config"] = json.loads(js)
                for cid, js in con.execute("SELECT ID, JSON FROM ContainerState"):
                    out.setdefault(cid, {})["state"] = json.loads(js)
            finally:
                con.close()
    except (RescueError, OSError, sqlite3.Error, ValueError) as exc:
        warnings.append(f"{posixpath.join(root, 'db.sql')}: Podman's database cannot be read ({exc})")
    return out


def _podman_bolt(fs: FileSystem, real_root: str, root: str, warnings: list[str]) -> dict[str, dict]:
    """libpod's BoltDB (libpod/bolt_state.db, Podman before 4.8/5): bucket "ctr" -> id -> config, state."""
    from .boltdb import BoltDB, BoltError
    path = posixpath.join(real_root, "libpod", "bolt_state.db")
    entry = survey.stat(fs, path)
    if entry is None or entry.kind != FILE:
        return {}
    out: dict[str, dict] = {}
    try:
        db = BoltDB(fs.read_file(path, limit=256 << 20))
        ctrs = db.root().bucket(b"ctr")
        for cid, bucket in ctrs.buckets() if ctrs is not None else []:
            rec: dict[str, Any] = {}
            for key in ("config", "state"):
                raw = bucket.get(key.encode())
                if raw:
                    rec[key] = json.loads(raw.decode("utf-8", "replace"))
            out[cid.decode("ascii", "replace")] = rec
    except (RescueError, OSError, BoltError, ValueError) as exc:
        warnings.append(f"{posixpath.join(root, 'libpod', 'bolt_state.db')}: Podman's database cannot be "
                        f"read ({exc})")
        return {}
    return out


_PODMAN_STATES = {0: "unknown", 1: "created", 2: "created", 3: "running", 4: "stopped", 5: "paused",
                  6: "exited", 7: "removing", 8: "stopping"}


def _podman_details(c: Container, info: dict, fs: FileSystem, root: str, real_root: str) -> None:
    cfg = info.get("config") or {}
    st = info.get("state") or {}
    state = _PODMAN_STATES.get(st.get("state"), str(st.get("state", "unknown")))
    if state in ("exited", "stopped"):
        state = f"exited ({st.get('exitCode', '?')})"
    c.state = state
    c.started_at, c.finished_at = st.get("startedTime"), st.get("finishedTime")
    _compose_labels(c, cfg.get("labels") or {})
    for v in cfg.get("namedVolumes") or []:
        name = str(v.get("volumeName") or "")
        c.mounts.append(Mount("volume", str(v.get("dest") or ""), name, "ro" not in (v.get("options") or []),
                              posixpath.join(root, "volumes", name, "_data"),
                              survey.stat(fs, posixpath.join(real_root, "volumes", name, "_data")) is not None))
    for m in (cfg.get("spec") or {}).get("mounts") or []:
        if m.get("type") == "bind" and not str(m.get("source", "")).startswith(("/proc", "/sys", "/dev", "/run/")):
            src = normalize(str(m.get("source")))
            if "/userdata/" in src or src.endswith(("/hostname", "/hosts", "/resolv.conf")):
                continue   # podman's own per-container files
            c.mounts.append(Mount("bind", str(m.get("destination")), src, "ro" not in (m.get("options") or []),
                                  src, survey.resolve(fs, src) is not None))
        elif m.get("type") == "tmpfs" and m.get("destination") not in ("/dev", "/dev/shm", "/run", "/tmp",
                                                                       "/sys/fs/cgroup"):
            c.mounts.append(Mount("tmpfs", str(m.get("destination")), ",".join(m.get("options") or []), True,
                                  None, False))


# -- all together -------------------------------------------------------------------------

def find_applications(fs: FileSystem, *, budget: int = WALK_BUDGET) -> Applications:
    """Every container, volume and compose project the snapshot's engines recorded."""
    apps = Applications()
    engine = docker_root(fs, apps.warnings)
    if engine.found or engine.why != "default" or apps.warnings:
        apps.engines.append(engine)
    if engine.found:
        read_docker(fs, engine, apps, budget)
    read_podman(fs, apps, budget)
    apps.containers.sort(key=lambda c: (c.engine, c.name))
    for v in apps.volumes:
        v.used_by = sorted({c.name for c in apps.containers
                            for m in c.mounts if m.kind == "volume" and m.source == v.name
                            and c.engine.split()[0] == v.engine.split()[0]})
        real = survey.resolve(fs, v.path)
        if real is not None:
            v.size = measure(fs, real.path, budget)
    apps.projects = _projects(fs, apps)
    return apps


def _projects(fs: FileSystem, apps: Applications) -> list[Project]:
    projects: dict[str, Project] = {}
    for c in apps.containers:
        if not c.project:
            continue
        p = projects.setdefault(c.project, Project(c.project))
        p.containers.append(c.name)
        if c.service and c.service not in p.services:
            p.services.append(c.service)
        if c.working_dir and not p.working_dir:
            p.working_dir = c.working_dir
        for f in c.config_files:
            if f not in p.config_files:
                p.config_files.append(f)
        for m in c.mounts:
            if m.kind == "volume" and m.source and m.source not in p.volumes:
                p.volumes.append(m.source)
            elif m.kind == "bind" and m.source and m.source not in p.binds:
                p.binds.append(m.source)
    for p in projects.values():
        # compose names its volumes PROJECT_NAME: an unused one still belongs to the project
        for v in apps.volumes:
            if not v.used_by and v.usage_known and v.name.startswith(p.name + "_") and v.name not in p.volumes:
                p.volumes.append(v.name)
        for f in p.config_files:
            entry = survey.resolve(fs, f)
            if entry is None:
                p.missing.append(f)
        if p.working_dir:
            for e in survey.listdir(fs, p.working_dir):
                if e.kind == FILE and (e.name == ".env" or e.name.endswith(".env")):
                    p.env_files.append(e.path)
            if survey.resolve(fs, p.working_dir) is None:
                p.missing.append(p.working_dir)
        p.containers.sort()
        p.services.sort()
        p.volumes.sort()
    return sorted(projects.values(), key=lambda p: p.name)
