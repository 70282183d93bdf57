"""The extract engine: walk a selection, hand items to a sink, report.

Two phases: first the selection is walked and its metadata collected (so
progress has a total and --dry-run can list it), then entries are written in
walk order. Damaged files are skipped and reported; the rest is rescued.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from ..errors import GuestPathError, RescueError, TargetError
from ..fs.base import DIR, FILE, SOCKET, Entry, FileReadError, FileSystem
from ..fs.names import escape_name, listed_name, visible
from .base import Content, Item, NotWritten, Sink
from .manifest import ManifestWriter
from .select import excluded, output_name, select_path, unsafe_name
from .zerocopy import plain_pieces

# A file claiming more than this is not a real file (ext4's own limit is 16 TiB).
ABSURD_SIZE = 1 << 44

# A unix socket holds no data: its server unlinks and re-creates it when it starts (a crashed
# server leaves e.g. /var/lib/mysql/mysql.sock behind). No target writes one (tar and rclone
# cannot; a socket file a directory or rsync target could make would be unlinked by the server
# anyway), so each is named on one line and counted, but it does not make the run incomplete.
SOCKET_REASON = "holds no data; its server re-creates it"


@dataclass
class ExtractOptions:
    paths: list[str] = field(default_factory=lambda: ["/"])
    excludes: list[str] = field(default_factory=list)
    strip_components: int = 0
    xattrs: bool = True


@dataclass
class Skipped:
    path: str
    reason: str


@dataclass
class Report:
    files: int = 0
    dirs: int = 0
    links: int = 0                # symlinks and hard links
    others: int = 0               # fifos, devices
    bytes: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    skipped_sockets: list[str] = field(default_factory=list)   # named, not written, exit code unchanged
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    target: str = ""

    @property
    def entries(self) -> int:
        return self.files + self.dirs + self.links + self.others

    def to_json(self) -> dict:
        return {"target": self.target, "files": self.files, "dirs": self.dirs, "links": self.links,
                "others": self.others, "bytes": self.bytes, "seconds": round(self.seconds, 3),
                "skipped": [{"path": s.path, "reason": s.reason} for s in self.skipped],
                "skipped-sockets": self.skipped_sockets,
                "warnings": self.warnings}


PARTLY_READABLE = "directory only partly readable: "
EXAMPLES = 3


def shown_skips(skipped: list[Skipped]) -> list[Skipped]:
    """The skips as printed: directories partly readable for one and the same
    reason (a tree archive cut short: every directory it was inside) become one
    line with their count and a few examples; --json and the manifest list each."""
    groups: dict[str, list[str]] = {}
    for s in skipped:
        if s.reason.startswith(PARTLY_READABLE):
            groups.setdefault(s.reason, []).append(s.path)
    out: list[Skipped] = []
    for s in skipped:
        paths = groups.get(s.reason)
        if paths is None or len(paths) == 1:
            out.append(s)
        elif paths and s.path == paths[0]:
            shown = ", ".join(paths[:EXAMPLES]) + (", ..." if len(paths) > EXAMPLES else "")
            out.append(Skipped(f"{len(paths)} directories ({shown}; each one in --json and the manifest)",
                               s.reason))
    return out


@dataclass
class Planned:
    entry: Entry
    name: str


@dataclass
class Plan:
    items: list[Planned]
    total_bytes: int
    skipped: list[Skipped]
    warnings: list[str] = field(default_factory=list)   # e.g. an unwritable name written under a replacement


Progress = Callable[[int, int, str], None]   # (bytes_done, files_done, current path)


def plan(fs: FileSystem, options: ExtractOptions, on_entry: Callable[[int], None] | None = None) -> Plan:
    """Walk the selection and collect what would be written (metadata only).

    A selected path that does not exist raises GuestPathError: asking for
    /var/lib/docker/volumes on a server without Docker is an error, not an
    empty success."""
    items: list[Planned] = []
    skipped: list[Skipped] = []
    warnings: list[str] = []
    total = 0
    seen_names: dict[str, tuple[int, int]] = {}   # output name -> (dev, inode) written under it
    replacements: set[str] = set()
    for wanted in options.paths:
        try:
            chosen = select_path(fs, wanted)
        except GuestPathError as exc:
            raise GuestPathError(exc.problem, file=getattr(fs, "name", None),
                                 hint="`rescue ls SNAPSHOT /` shows what is there") from None
        shown, top = chosen.shown, chosen.entry
        if chosen.renamed is not None:
            replacement = shown.rpartition("/")[2]
            replacements.add(replacement)
            warnings.append(f"{visible(top.path)} written as {replacement}: its {unsafe_name(chosen.renamed)}, "
                            "which no file name can")
        for entry, guest_path in _walk(fs, top, shown, options, skipped):
            name = output_name(guest_path, options.strip_components)
            if name is None:
                continue
            if name in seen_names:
                # the same entry selected twice is written once; a replacement name
                # already taken by another entry is not written at all
                if name in replacements and seen_names[name] != (getattr(entry, "dev", 0), entry.inode):
                    skipped.append(Skipped(guest_path, f"another entry is written as {name}"))
                continue
            seen_names[name] = (getattr(entry, "dev", 0), entry.inode)
            items.append(Planned(entry, name))
            if entry.kind == FILE:
                total += entry.size
            if on_entry:
                on_entry(len(items))
    return Plan(items, total, skipped, warnings)


def _walk(fs: FileSystem, top: Entry, shown: str, options: ExtractOptions,
          skipped: list[Skipped]) -> Iterator[tuple[Entry, str]]:
    """(entry, guest path as the user named it) for top and everything below,
    in pre-order (a directory, then its whole subtree, in name order), as
    `tar c` writes them: GNU tar restores directory times correctly only then."""
    if excluded(shown, options.excludes):
        return
    yield top, shown
    if top.kind != DIR:
        return
    visited = {(getattr(top, "dev", 0), top.inode)}

    def children(directory: Entry, dir_shown: str) -> Iterator[tuple[Entry, str]]:
        try:
            listing = sorted(fs.listdir(directory.path), key=lambda e: e.path)
        except (FileReadError, RescueError) as exc:
            skipped.append(Skipped(dir_shown, f"directory unreadable: {exc}"))
            return
        damage = fs.listing_damage(directory.path)
        if damage:   # kept, but entries after the damaged spot may be missing
            skipped.append(Skipped(dir_shown, f"directory only partly readable: {damage}"))
        # Two entries of one name (a corrupt or crafted directory): paths cannot
        # tell them apart, so keep one (not a directory: its contents would be
        # unreachable by path anyway) and report the others.
        # The name is what follows the directory's path: a dirent named
        # "a/b" (a crafted image) must stay "a/b" to be seen as unsafe.
        by_name: dict[str, list[Entry]] = {}
        for child in listing:
            by_name.setdefault(listed_name(directory.path, child.path), []).append(child)
        shown_prefix = dir_shown.rstrip("/") + "/"
        for child in listing:
            name = listed_name(directory.path, child.path)
            child_shown = shown_prefix + name
            why = unsafe_name(name)
            if why:   # shown as ls shows it: the path that fetches it under a safe name
                how = "" if child.kind == DIR or name in ("", ".", "..") else \
                    f"; --path {shown_prefix}{escape_name(name)} fetches it under a safe name"
                skipped.append(Skipped(shown_prefix + escape_name(name), f"unsafe {why}{how}"))
                continue
            twins = by_name[name]
            if len(twins) > 1:
                keep = next((t for t in twins if t.kind != DIR), twins[0])
                if child is not keep:
                    skipped.append(Skipped(child_shown, f"{child.kind}: the directory holds another entry "
                                                        f"of the same name (a {keep.kind}, kept)"))
                    continue
            if not excluded(child_shown, options.excludes):
                yield child, child_shown

    stack = [children(top, shown)]
    while stack:
        try:
            child, child_shown = next(stack[-1])
        except StopIteration:
            stack.pop()
            continue
        if child.kind == DIR:
            key = (getattr(child, "dev", 0), child.inode)
            if key in visited:   # a corrupt image linked a directory into its own subtree
                skipped.append(Skipped(child_shown, "directory loop: already visited"))
                continue
            visited.add(key)
            yield child, child_shown
            stack.append(children(child, child_shown))
        else:
            yield child, child_shown


def extract(fs: FileSystem, sink: Sink, options: ExtractOptions, *,
            users: dict[int, str] | None = None, groups: dict[int, str] | None = None,
            progress: Progress | None = None, planned: Plan | None = None,
            manifest: "ManifestWriter | None" = None, embed_manifest: bool = False,
            trailer: list[Item] | None = None) -> Report:
    """Write the selection into `sink`. TargetError ends the run (after
    sink.abort()); damaged files are skipped and listed in the report.
    With `manifest`, every item written is recorded with the SHA-256 of the
    bytes the sink took; `embed_manifest` stores it in the target as well.
    `trailer` items (a README) are written after the selection, before the manifest."""
    started = time.monotonic()
    users, groups = users or {}, groups or {}
    work = planned or plan(fs, options)
    report = Report(skipped=list(work.skipped), warnings=list(work.warnings))
    if manifest is not None:   # what the walk already knows is missing (a partly readable directory...)
        for s in work.skipped:
            manifest.skip(output_name(s.path, options.strip_components) or s.path, s.reason)
    first_name: dict[tuple[int, int], str] = {}
    done_bytes = written = 0
    try:
        for planned_item in work.items:
            entry, name = planned_item.entry, planned_item.name
            if entry.kind == SOCKET:
                report.skipped_sockets.append(entry.path)
                if manifest is not None:
                    manifest.skip(name, f"socket: {SOCKET_REASON}")
                continue
            item = Item(name=name, entry=entry, user=users.get(entry.uid), group=groups.get(entry.gid))
            linked = entry.nlink > 1 and entry.kind != DIR   # (dev, inode) looked up only for these
            key = (getattr(entry, "dev", 0), entry.inode) if linked else None
            is_repeat = linked and key in first_name
            if is_repeat:
                item.hardlink_to = first_name[key]
            if options.xattrs:
                try:
                    entry.xattrs = fs.xattrs(entry)
                except FileReadError as exc:
                    report.warnings.append(f"{entry.path}: extended attributes not kept: {exc}")
                    entry.xattrs = {}
            if entry.kind == FILE and not is_repeat:
                why = check_file(fs, entry)
                if why:
                    report.skipped.append(Skipped(entry.path, why))
                    if manifest is not None:
                        manifest.skip(name, why)
                    continue
                item.content = _content(fs, entry)
            if manifest is not None:
                manifest.wrap(item)
            try:
                sink.add(item)
            except FileReadError as exc:
                why = str(exc) if isinstance(exc, NotWritten) else f"damaged: {exc}"
                report.skipped.append(Skipped(entry.path, why))
                if manifest is not None:
                    manifest.skip(name, why)
                continue
            if manifest is not None:
                manifest.written(item)
            if linked and not is_repeat:
                first_name[key] = name
            if is_repeat:
                report.links += 1
            elif entry.kind == FILE:
                report.files += 1
                report.bytes += entry.size
                done_bytes += entry.size
            elif entry.kind == DIR:
                report.dirs += 1
            elif entry.link_target is not None:
                report.links += 1
            else:
                report.others += 1
            written += 1
            if progress:
                progress(done_bytes, written, entry.path)
        for extra in trailer or []:
            if any(p.name == extra.name for p in work.items):
                report.warnings.append(f"the selection holds {extra.name} already; ours was not written")
                continue
            sink.add(extra)
        if manifest is not None and embed_manifest:
            _embed(sink, manifest, work, report)
        result = sink.close()
    except (TargetError, KeyboardInterrupt):
        sink.abort()
        raise
    except OSError as exc:
        sink.abort()
        raise TargetError(f"writing failed: {exc}") from None
    report.target = result.target
    report.warnings.extend(result.warnings)
    # A remote target may accept a file into its batch and then fail to store it.
    for name, size in getattr(result, "not_arrived", []):
        report.skipped.append(Skipped(name, "did not arrive at the target"))
        if manifest is not None:
            manifest.not_arrived(name)
        report.files -= 1
        report.bytes -= size
    report.seconds = time.monotonic() - started
    return report


def _embed(sink: Sink, manifest: "ManifestWriter", work: Plan, report: Report) -> None:
    """Store the manifest as the target's last entry (a tar's last member)."""
    from .manifest import MANIFEST_NAME
    if any(p.name == MANIFEST_NAME for p in work.items):
        report.warnings.append(f"the selection holds a file named {MANIFEST_NAME} at the top; "
                               "the manifest was not stored inside the target")
        return
    try:
        sink.add(manifest.as_item())
    except FileReadError as exc:
        report.warnings.append(f"the manifest could not be stored inside the target: {exc}")


def check_file(fs: FileSystem, entry: Entry) -> str | None:
    """Why a file cannot be rescued honestly, found before anything is written."""
    if entry.size > ABSURD_SIZE:
        return f"size {entry.size} bytes is beyond any real file: the inode is damaged"
    try:
        fs.data_ranges(entry)
    except FileReadError as exc:
        return f"damaged: {exc}"
    return None


def _content(fs: FileSystem, entry: Entry) -> Content:
    return Content(
        size=entry.size,
        chunks=lambda: fs.read_chunks(entry),
        data_ranges=lambda: fs.data_ranges(entry),
        read_range=lambda offset, length: fs.read_range(entry, offset, length),
        plain=lambda: plain_pieces(fs, entry),
    )
