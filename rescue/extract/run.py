"""The extract engine: walk a selection, hand items to a sink, report.

Two phases: first the selection is walked and its metadata collected (so
progress has a total and --dry-run can list it), then entries are written in
walk order. A selection too large to hold (a million files would take about
a GiB) is counted by the first walk and walked again as it is written, so
memory does not grow with the tree. Damaged files are skipped and reported;
the rest is rescued.
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


@dataclass(slots=True)
class Planned:
    entry: Entry
    name: str


# What holding the selection may cost before the plan stops holding it and
# walks it again to write it. Per held entry (tracemalloc, ext4, 200 000
# files): the Entry and its times ~560 B, Planned ~50 B, the guest path and
# the output name ~75 B each; xattrs loaded while writing add a dict.
HOLD_BUDGET = 160 << 20
HELD_COST = 700   # bytes per held entry besides its two names


@dataclass
class Plan:
    """What the selection writes. `items` holds every entry, or is None when
    the plan was told to hold at most `hold_budget` bytes and the selection is
    larger: then `entries()` walks the selection again (the same order, names
    and skips) and nothing is held per entry."""
    items: list[Planned] | None
    total_bytes: int
    skipped: list[Skipped]
    warnings: list[str] = field(default_factory=list)   # e.g. an unwritable name written under a replacement
    not_held: "_NotHeld | None" = field(default=None, repr=False)

    @property
    def count(self) -> int:
        """How many entries the selection writes (sockets included, as in items)."""
        return len(self.items) if self.items is not None else self.not_held.count  # type: ignore[union-attr]

    def entries(self) -> Iterator[tuple[Entry, str]]:
        """(entry, output name) in the order they are written."""
        if self.items is not None:
            return ((p.entry, p.name) for p in self.items)
        return self.not_held.walk()   # type: ignore[union-attr]

    def holds_name(self, name: str) -> bool:
        """Whether an entry is written as `name` (a top-level name, e.g. the manifest's)."""
        if self.items is not None:
            return any(p.name == name for p in self.items)
        return name in self.not_held.top_names   # type: ignore[union-attr]

    def socket_paths(self) -> list[str]:
        if self.items is not None:
            return [p.entry.path for p in self.items if p.entry.kind == SOCKET]
        return list(self.not_held.sockets)   # type: ignore[union-attr]


@dataclass
class _NotHeld:
    """What a plan that does not hold its entries knows from its counting walk."""
    fs: FileSystem
    options: ExtractOptions
    count: int
    top_names: set[str]    # output names without '/': what a trailer or the manifest could collide with
    sockets: list[str]

    def walk(self) -> Iterator[tuple[Entry, str]]:
        return _selection(self.fs, self.options, [], [])   # its skips and warnings are the plan's already


Progress = Callable[[int, int, str], None]   # (bytes_done, files_done, current path)


def plan(fs: FileSystem, options: ExtractOptions, on_entry: Callable[[int], None] | None = None, *,
         hold_budget: int | None = None) -> Plan:
    """Walk the selection and collect what would be written (metadata only).
    With `hold_budget`, a selection whose entries would take more bytes than
    that is not held (see Plan).

    A selected path that does not exist raises GuestPathError: asking for
    /var/lib/docker/volumes on a server without Docker is an error, not an
    empty success."""
    items: list[Planned] | None = []
    skipped: list[Skipped] = []
    warnings: list[str] = []
    total = count = held = 0
    top_names: set[str] = set()
    sockets: list[str] = []
    for entry, name in _selection(fs, options, skipped, warnings):
        count += 1
        if entry.kind == FILE:
            total += entry.size
        elif entry.kind == SOCKET:
            sockets.append(entry.path)
        if "/" not in name:
            top_names.add(name)
        if items is not None:
            items.append(Planned(entry, name))
            if hold_budget is not None:
                held += HELD_COST + 2 * len(name)
                if held > hold_budget:
                    items = None   # counted from here on, walked again when written
        if on_entry:
            on_entry(count)
    if items is not None:
        return Plan(items, total, skipped, warnings)
    frozen = ExtractOptions(paths=list(options.paths), excludes=list(options.excludes),
                            strip_components=options.strip_components, xattrs=options.xattrs)
    return Plan(None, total, skipped, warnings, not_held=_NotHeld(fs, frozen, count, top_names, sockets))


def _selection(fs: FileSystem, options: ExtractOptions, skipped: list[Skipped],
               warnings: list[str]) -> Iterator[tuple[Entry, str]]:
    """(entry, output name) for everything the selection writes, in order;
    what is left out goes into `skipped`. Deterministic: a second walk
    yields the same."""
    # Names are unique within one --path's walk. With several, a name can only
    # come again from a walk whose top is at or above it, so only such names are
    # remembered (a million files under one --path hold nothing); with leading
    # components stripped, any two may collide, so every name is.
    chosen_all = []
    for wanted in options.paths:
        try:
            chosen_all.append(select_path(fs, wanted))
        except GuestPathError as exc:
            raise GuestPathError(exc.problem, file=getattr(fs, "name", None),
                                 hint="`rescue ls SNAPSHOT /` shows what is there") from None
    strip = options.strip_components
    tops = [output_name(c.shown, 0) for c in chosen_all]   # None: the root, above everything
    seen_names: dict[str, tuple[int, int]] = {}   # output name -> (dev, inode) written under it
    replacements: set[str] = set()
    for j, chosen in enumerate(chosen_all):
        shown, top = chosen.shown, chosen.entry
        if chosen.renamed is not None:
            replacement = shown.rpartition("/")[2]
            replacements.add(replacement)
            warnings.append(f"{visible(top.path)} written as {replacement}: its {unsafe_name(chosen.renamed)}, "
                            "which no file name can")
        earlier, later = tops[:j], tops[j + 1:]
        for entry, guest_path in _walk(fs, top, shown, options, skipped):
            name = output_name(guest_path, strip)
            if name is None:
                continue
            if (strip or _covered(name, earlier)) and name in seen_names:
                # the same entry selected twice is written once; a replacement name
                # already taken by another entry is not written at all
                if name in replacements and seen_names[name] != (getattr(entry, "dev", 0), entry.inode):
                    skipped.append(Skipped(guest_path, f"another entry is written as {name}"))
                continue
            if strip or _covered(name, later):
                seen_names[name] = (getattr(entry, "dev", 0), entry.inode)
            yield entry, name


def _covered(name: str, tops: list[str | None]) -> bool:
    """Whether a walk from one of `tops` (output names) yields `name` too."""
    for top in tops:
        if top is None or name == top or (name.startswith(top) and name[len(top)] == "/"):
            return True
    return False


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
    work = planned or plan(fs, options, hold_budget=HOLD_BUDGET)
    report = Report(skipped=list(work.skipped), warnings=list(work.warnings))
    if manifest is not None:   # what the walk already knows is missing (a partly readable directory...)
        for s in work.skipped:
            manifest.skip(output_name(s.path, options.strip_components) or s.path, s.reason)
    first_name: dict[tuple[int, int], str] = {}
    done_bytes = written = 0
    try:
        for entry, name in work.entries():
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
            if work.holds_name(extra.name):
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
    if work.holds_name(MANIFEST_NAME):
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
