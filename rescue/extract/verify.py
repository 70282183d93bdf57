"""`rescue verify`: does a target hold what the snapshot (or a manifest) says?

Both sides become one shape, a record per target name (the manifest's
fields: type, size, mode, uid, gid, mtime_ns, link_target, rdev, sha256), and
are compared field by field. Which fields count depends on what the target
kind can keep (see `extract/*_sink.py`): a tarball keeps everything; a
directory keeps owners only when written by root and drops setuid bits by
default; an rclone tree keeps contents, symlinks and file mtimes to the
second only.

Targets read:
    OUT.tar / .tar.gz / .tgz / .tar.zst   streamed, each member hashed
    DIR/                                  walked without following links
    rsync://... or USER@HOST:PATH/        pulled with rsync into scratch, then walked
    rclone:REMOTE:PATH/                   pulled with `rclone copy --links` into scratch
    rclone:REMOTE:PATH/NAME.tar.zst       streamed with `rclone cat`

The expected side is either a manifest (`--manifest FILE`, or the one an
extract stored inside the target) or the snapshot itself, walked with the same
selection the extract used (from the manifest's header, or --path/--exclude/
--strip-components) and read in full: verifying reads every selected byte.
"""

from __future__ import annotations

import hashlib
import os
import stat as stat_mod
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, BinaryIO, Callable

from ..errors import RescueError, TargetError
from ..fs.base import BLOCK, CHAR, DIR, FIFO, FILE, SOCKET, SYMLINK, FileReadError, FileSystem
from .app_select import README_NAME
from .manifest import MANIFEST_NAME, Manifest, read_manifest
from .tar_sink import compression_for

_OURS = {MANIFEST_NAME, README_NAME}
_CHUNK = 1 << 20
_TAR_KINDS = {tarfile.REGTYPE: FILE, tarfile.AREGTYPE: FILE, tarfile.CONTTYPE: FILE, tarfile.DIRTYPE: DIR,
              tarfile.SYMTYPE: SYMLINK, tarfile.FIFOTYPE: FIFO, tarfile.CHRTYPE: CHAR, tarfile.BLKTYPE: BLOCK}
_MODE_KINDS = {stat_mod.S_IFREG: FILE, stat_mod.S_IFDIR: DIR, stat_mod.S_IFLNK: SYMLINK, stat_mod.S_IFIFO: FIFO,
               stat_mod.S_IFCHR: CHAR, stat_mod.S_IFBLK: BLOCK, stat_mod.S_IFSOCK: SOCKET}

Record = dict[str, Any]


@dataclass
class Rules:
    """What a target kind can keep, so verify only compares what could survive."""

    kind: str
    owners: bool = True
    modes: bool = True
    setuid: bool = True          # False: the setuid/setgid bits are not compared
    mtime_step: int = 1          # mtimes compared to this many ns (0: not compared)
    dir_mtimes: bool = True
    symlink_mtimes: bool = False
    specials: bool = True        # fifos and device nodes can exist there
    notes: list[str] = field(default_factory=list)


@dataclass
class VerifyReport:
    target: str
    kind: str
    expected_from: str
    compared: int = 0
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    different: list[tuple[str, list[str]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return not (self.missing or self.extra or self.different)

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "kind": self.kind, "expected_from": self.expected_from,
                "equal": self.equal, "compared": self.compared, "missing": self.missing, "extra": self.extra,
                "different": [{"path": p, "fields": f} for p, f in self.different], "notes": self.notes}


# -- the target side -----------------------------------------------------------

@dataclass
class TargetListing:
    records: dict[str, Record]
    rules: Rules
    manifest: bytes | None = None     # the manifest stored inside the target, if any


def read_target(target: str, *, scratch_dir: str | None = None) -> TargetListing:
    """Everything in the target, as records keyed by name."""
    from .remote_target import RCLONE_TAR, RCLONE_TREE, parse_remote_target
    remote = parse_remote_target(target)
    if remote is not None:
        if remote.kind == RCLONE_TAR:
            return _rclone_tar(remote)
        with tempfile.TemporaryDirectory(prefix="rescue-verify-", dir=scratch_dir) as scratch:
            if remote.kind == RCLONE_TREE:
                _pull_rclone(remote, scratch)
                rules = Rules("rclone", owners=False, modes=False, mtime_step=1_000_000_000, dir_mtimes=False,
                              specials=False, notes=["rclone trees keep contents, symlinks and file mtimes "
                                                     "(to the second): owners, modes and directory times are "
                                                     "not compared, fifos and devices are not expected"])
            else:
                is_root = _is_root()
                _pull_rsync(remote, scratch)
                rules = Rules("rsync", owners=is_root, notes=[] if is_root else
                              ["not root: owners pulled back from the rsync target are not compared"])
            listing = _read_dir(scratch, rules)
            return listing
    if os.path.isdir(target):
        is_root = _is_root()
        rules = Rules("directory", owners=is_root, setuid=False,
                      notes=["setuid/setgid bits are not compared (a directory extract drops them unless "
                             "--keep-setuid)"] + ([] if is_root else
                                                  ["not root: owners are not compared (only root can set them)"]))
        return _read_dir(target, rules)
    if os.path.isfile(target):
        try:
            with open(target, "rb") as raw:
                return _read_tar(raw, target, compression_for(target))
        except OSError as exc:
            raise TargetError(f"cannot read the target: {exc.strerror or exc}", file=target) from None
    raise TargetError("the target does not exist (a directory, a tarball, an rsync or rclone target)",
                      file=target)


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _hash_stream(read: Callable[[int], bytes]) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    while True:
        chunk = read(_CHUNK)
        if not chunk:
            return h.hexdigest(), n
        h.update(chunk)
        n += len(chunk)


def _pax_mtime_ns(member: tarfile.TarInfo) -> int:
    """The member's mtime in ns: exact from the PAX record (tarfile's float loses the ns)."""
    text = member.pax_headers.get("mtime")
    if text:
        try:
            return int(Decimal(text) * 1_000_000_000)
        except ArithmeticError:
            pass
    return int(member.mtime) * 1_000_000_000


def _read_tar(raw: BinaryIO, label: str, compression: str | None) -> TargetListing:
    """A tar stream, member by member (never seeking: works for pipes)."""
    stream: BinaryIO = raw
    if compression == "zst":
        import zstandard
        stream = zstandard.ZstdDecompressor().stream_reader(raw)  # type: ignore[assignment]
    mode = "r|gz" if compression == "gz" else "r|"
    records: dict[str, Record] = {}
    manifest: bytes | None = None
    try:
        with tarfile.open(fileobj=stream, mode=mode) as tf:   # type: ignore[call-overload]
            for m in tf:
                name = _clean(m.name)
                if not name:
                    continue
                rec: Record = {"path": name, "mode": m.mode & 0o7777, "uid": m.uid, "gid": m.gid,
                               "mtime_ns": _pax_mtime_ns(m), "size": 0}
                if m.islnk():
                    first = records.get(_clean(m.linkname))
                    rec["type"] = FILE
                    if first is not None:
                        rec["size"], rec["sha256"] = first.get("size", 0), first.get("sha256")
                    rec["hardlink_to"] = _clean(m.linkname)
                else:
                    rec["type"] = _TAR_KINDS.get(m.type, "other")
                if m.issym():
                    rec["link_target"] = m.linkname
                elif m.ischr() or m.isblk():
                    rec["rdev"] = [m.devmajor, m.devminor]
                elif m.isfile() or m.type == tarfile.CONTTYPE:
                    f = tf.extractfile(m)
                    if name == MANIFEST_NAME and f is not None and m.size < (256 << 20):
                        manifest = f.read()
                        rec["sha256"], rec["size"] = hashlib.sha256(manifest).hexdigest(), len(manifest)
                    else:
                        rec["sha256"], rec["size"] = _hash_stream(f.read) if f is not None else (None, 0)
                records[name] = rec
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise TargetError(f"the tarball is damaged or cut short: {exc}", file=label, layer="verify") from None
    except Exception as exc:   # zstd/gzip framing errors come as their own types
        raise TargetError(f"the tarball cannot be read: {exc}", file=label, layer="verify") from None
    return TargetListing(records, Rules("tar"), manifest)


def _clean(name: str) -> str:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    return "/".join(parts)


def _read_dir(root: str, rules: Rules) -> TargetListing:
    records: dict[str, Record] = {}
    manifest: bytes | None = None
    stack = [("", root)]
    while stack:
        rel_dir, path = stack.pop()
        try:
            entries = list(os.scandir(path))
        except OSError as exc:
            raise TargetError(f"cannot list {path}: {exc.strerror or exc}", layer="verify") from None
        for de in entries:
            if not rel_dir and de.name.startswith(".rescue-partial"):
                continue   # rsync's partial-dir from an interrupted run
            rel = f"{rel_dir}/{de.name}" if rel_dir else de.name
            st = de.stat(follow_symlinks=False)
            kind = _MODE_KINDS.get(stat_mod.S_IFMT(st.st_mode), "other")
            rec: Record = {"path": rel, "type": kind, "mode": stat_mod.S_IMODE(st.st_mode), "uid": st.st_uid,
                           "gid": st.st_gid, "mtime_ns": st.st_mtime_ns, "size": 0}
            if kind == FILE:
                rec["size"] = st.st_size
                try:
                    with open(de.path, "rb") as f:
                        if rel == MANIFEST_NAME:
                            manifest = f.read()
                            rec["sha256"] = hashlib.sha256(manifest).hexdigest()
                        else:
                            rec["sha256"], _ = _hash_stream(f.read)
                except OSError as exc:
                    rec["sha256"] = f"unreadable: {exc.strerror}"
            elif kind == SYMLINK:
                rec["link_target"] = os.readlink(de.path)
            elif kind in (CHAR, BLOCK):
                rec["rdev"] = [os.major(st.st_rdev), os.minor(st.st_rdev)]
            elif kind == DIR:
                stack.append((rel, de.path))
            records[rel] = rec
    return TargetListing(records, rules, manifest)


def _rsync_env(remote) -> dict[str, str]:
    env = os.environ.copy()
    if remote.password:
        env["RSYNC_PASSWORD"] = remote.password
    return env


def _pull_rsync(remote, scratch: str) -> None:
    from .remote_run import error_lines, require_tool, run_tool, scrub
    rsync = require_tool("rsync", "install rsync")
    argv = [rsync, "-a", "-H", "--numeric-ids", "--exclude=/.rescue-partial", remote.dest, scratch + "/"]
    code, stderr = run_tool(argv, env=_rsync_env(remote))
    if code != 0:
        msg = "; ".join(error_lines(scrub(stderr, [remote.password or "", os.environ.get("RSYNC_PASSWORD", "")]))[:3])
        raise TargetError(f"cannot read the rsync target back (rsync exit {code}): {msg}", file=remote.text,
                          layer="verify")


def _pull_rclone(remote, scratch: str) -> None:
    from .rclone_sink import _rclone_env, check_remote, remote_secrets
    from .remote_run import require_tool, run_tool, scrub
    rclone = require_tool("rclone", "install rclone (https://rclone.org/install/)")
    check_remote(rclone, remote)
    code, stderr = run_tool([rclone, "copy", "--links", "--create-empty-src-dirs", remote.dest, scratch],
                            env=_rclone_env())
    if code != 0:
        text = scrub(stderr, remote_secrets(rclone, remote.remote or "")).strip().splitlines()
        raise TargetError(f"cannot read the rclone target back (rclone exit {code}): {' '.join(text[-2:])}",
                          file=remote.text, layer="verify")


def _rclone_tar(remote) -> TargetListing:
    from .rclone_sink import _rclone_env, check_remote
    from .remote_run import require_tool
    rclone = require_tool("rclone", "install rclone (https://rclone.org/install/)")
    check_remote(rclone, remote)
    with tempfile.TemporaryFile() as errf:
        proc = subprocess.Popen([rclone, "cat", remote.dest], stdout=subprocess.PIPE, stderr=errf,
                                env=_rclone_env())
        assert proc.stdout is not None
        try:
            listing = _read_tar(proc.stdout, remote.text, remote.compression)  # type: ignore[arg-type]
        except TargetError:
            proc.kill()
            proc.wait()
            errf.seek(0)
            why = errf.read().decode("utf-8", "replace").strip().splitlines()
            raise TargetError(f"cannot read the tarball back: {' '.join(why[-1:]) or 'damaged'}",
                              file=remote.text, layer="verify") from None
        finally:
            proc.stdout.close()
        proc.wait()
    return listing


# -- the expected side -----------------------------------------------------------

def expected_from_manifest(manifest: Manifest) -> dict[str, Record]:
    out = {}
    for name, rec in manifest.records.items():
        rec = dict(rec)
        try:
            rec["mode"] = int(str(rec.get("mode", "0")), 8)
        except ValueError:
            rec["mode"] = 0
        out[name] = rec
    return out


def expected_from_snapshot(fs: FileSystem, options, *, plan_fn=None) -> tuple[dict[str, Record], list[str]]:
    """Walk the selection as `extract` would and hash every file (a full read).
    Returns records by target name and the problems met (damaged files)."""
    from .run import check_file, plan
    work = (plan_fn or plan)(fs, options)
    records: dict[str, Record] = {}
    problems = [f"{s.path}: {s.reason}" for s in work.skipped]
    by_inode: dict[tuple[int, int], Record] = {}
    for p in work.items:
        e = p.entry
        if e.kind == SOCKET:
            continue
        rec: Record = {"path": p.name, "type": e.kind, "size": e.size if e.kind == FILE else 0,
                       "mode": e.mode & 0o7777, "uid": e.uid, "gid": e.gid, "mtime_ns": e.mtime_ns}
        if e.link_target is not None:
            rec["link_target"] = e.link_target
        if e.rdev:
            rec["rdev"] = list(e.rdev)
        if e.kind == FILE:
            key = (getattr(e, "dev", 0), e.inode)
            if e.nlink > 1 and key in by_inode:
                rec["sha256"] = by_inode[key].get("sha256")
            else:
                why = check_file(fs, e)
                if why:
                    problems.append(f"{e.path}: {why}")
                    continue
                try:
                    h = hashlib.sha256()
                    got = 0
                    for chunk in fs.read_chunks(e):
                        h.update(chunk)
                        got += len(chunk)
                    rec["sha256"] = h.hexdigest() if got == e.size else None
                except (FileReadError, RescueError) as exc:
                    problems.append(f"{e.path}: damaged: {exc}")
                    continue
                by_inode[key] = rec
        records[p.name] = rec
    return records, problems


# -- comparing -------------------------------------------------------------------

def compare(expected: dict[str, Record], listing: TargetListing, report: VerifyReport,
            skipped: dict[str, str] | None = None) -> VerifyReport:
    rules = listing.rules
    actual = listing.records
    skipped = skipped or {}
    report.notes.extend(rules.notes)
    implied = {"/".join(name.split("/")[:i]) for name in expected for i in range(1, name.count("/") + 1)}
    for name, exp in expected.items():
        if not rules.specials and exp.get("type") in (FIFO, CHAR, BLOCK, SOCKET):
            continue
        got = actual.get(name)
        if got is None:
            report.missing.append(name)
            continue
        report.compared += 1
        diffs = _differences(exp, got, rules)
        if diffs:
            report.different.append((name, diffs))
    for name in actual:
        if name in expected or name in implied or name in _OURS or name in skipped:
            continue
        report.extra.append(name)
    report.missing.sort()
    report.extra.sort()
    if skipped:
        report.notes.append(f"{len(skipped)} entries were skipped by the extract (damaged or unsafe) "
                            "and are not expected")
    return report


def _differences(exp: Record, got: Record, rules: Rules) -> list[str]:
    kind = exp.get("type")
    if kind != got.get("type"):
        return [f"type {kind} != {got.get('type')}"]
    out: list[str] = []
    if kind == FILE:
        if exp.get("size") != got.get("size"):
            out.append(f"size {exp.get('size')} != {got.get('size')}")
        if exp.get("sha256") and got.get("sha256") and exp["sha256"] != got["sha256"]:
            out.append("content (sha256) differs")
        elif exp.get("sha256") is None:
            out.append("content not hashed when written (cannot compare)")
    if kind == SYMLINK and exp.get("link_target") != got.get("link_target"):
        out.append(f"link target {exp.get('link_target')!r} != {got.get('link_target')!r}")
    if kind in (CHAR, BLOCK) and exp.get("rdev") and list(exp["rdev"]) != list(got.get("rdev") or []):
        out.append(f"device {exp['rdev']} != {got.get('rdev')}")
    if rules.modes and kind != SYMLINK:
        mask = 0o7777 if rules.setuid else 0o1777
        if (exp.get("mode", 0) & mask) != (got.get("mode", 0) & mask):
            out.append(f"mode {exp.get('mode', 0) & mask:04o} != {got.get('mode', 0) & mask:04o}")
    if rules.owners and (exp.get("uid"), exp.get("gid")) != (got.get("uid"), got.get("gid")):
        out.append(f"owner {exp.get('uid')}:{exp.get('gid')} != {got.get('uid')}:{got.get('gid')}")
    wants_mtime = rules.mtime_step and (kind not in (DIR, SYMLINK) or (kind == DIR and rules.dir_mtimes)
                                        or (kind == SYMLINK and rules.symlink_mtimes))
    if wants_mtime:
        a, b = int(exp.get("mtime_ns") or 0), int(got.get("mtime_ns") or 0)
        if abs(a - b) >= rules.mtime_step if rules.mtime_step > 1 else a != b:
            out.append(f"mtime {a} != {b}")
    return out


def verify_target(target: str, *, manifest: Manifest | None = None,
                  snapshot_expected: Callable[[dict[str, Any] | None], tuple[dict[str, Record], list[str]]]
                  | None = None, scratch_dir: str | None = None) -> VerifyReport:
    """Compare `target` with `manifest` or, when given, with the snapshot (the
    callable walks it, given the manifest header found, if any)."""
    listing = read_target(target, scratch_dir=scratch_dir)
    inside = None
    if listing.manifest is not None:
        try:
            inside = read_manifest(listing.manifest, f"{target}: {MANIFEST_NAME}")
        except RescueError:
            inside = None
    chosen = manifest or inside
    skipped = dict(chosen.skipped) if chosen else {}
    if snapshot_expected is not None:
        expected, problems = snapshot_expected(chosen.header if chosen else None)
        report = VerifyReport(target, listing.rules.kind, "snapshot")
        report.notes.extend(f"not readable in the snapshot: {p}" for p in problems[:50])
    else:
        if chosen is None:
            raise RescueError("nothing to compare with: give the snapshot or --manifest FILE "
                              f"(the target holds no {MANIFEST_NAME})", file=target, layer="verify")
        expected = expected_from_manifest(chosen)
        report = VerifyReport(target, listing.rules.kind, "manifest" if manifest else f"{MANIFEST_NAME} in the target")
        if not chosen.complete:
            report.notes.append("the manifest has no end line: the extract that wrote it did not finish")
    return compare(expected, listing, report, skipped)
