"""The manifest of an extract: what was written, with the SHA-256 of every file.

Format: JSON Lines (one object a line, UTF-8; names that are not UTF-8 keep
their bytes as surrogate escapes, written with `surrogateescape`).

    {"rescue_manifest": 1, "snapshot": ..., "paths": [...], "excludes": [...],
     "strip_components": 0, "layout": "paths"|"apps", "created": "2026-...Z"}
    {"path": "var/lib/x", "type": "file", "size": 5, "mode": "0644", "uid": 0, "gid": 0,
     "user": "root", "group": "root", "mtime_ns": ..., "sha256": "..."}
    {"path": "var/lib/l", "type": "symlink", ..., "link_target": "x"}
    {"path": "var/lib/h", "type": "file", ..., "hardlink_to": "var/lib/x", "sha256": "..."}
    {"path": "var/lib/bad", "skipped": "damaged: ..."}
    {"end": true, "entries": 3, "skipped": 1}

`path` is the name in the target (what `tar t` lists), not the guest path.
The hash is taken from the bytes as they pass to the sink (no second read of
the image): `HashingContent` wraps an item's content and feeds every chunk, and
the zeros of every hole skipped by a sparse copy, into one SHA-256.

Where it goes: `--manifest FILE` writes it to FILE; an application extract
(`--app`, `--container`, `--docker-volume`) and `--embed-manifest` also store
it inside the target as MANIFEST_NAME (the last tar member, or a file at the
root of a directory, rsync or rclone target). `rescue verify` reads either.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Iterator

from ..fs.base import FILE, Entry
from .base import Content, Item

MANIFEST_NAME = ".rescue-manifest.jsonl"
VERSION = 1
_ZEROS = bytes(1 << 20)


class HashingContent(Content):
    """A Content whose bytes are hashed as the sink pulls them.

    Sinks read either all chunks in order, or the data ranges in ascending
    order through read_range; the gaps between ranges are holes (zeros) and
    are hashed as such. Anything else (a sink reading backwards, or not
    reading at all) leaves `digest()` None rather than guessing."""

    def __init__(self, inner: Content) -> None:
        self.inner = inner
        self.size = inner.size
        self.read_range = self._read_range if inner.read_range is not None else None
        self._hash = hashlib.sha256()
        self._pos = 0
        self._broken = False
        self._touched = False

    def data_ranges(self) -> list[tuple[int, int]] | None:
        self._touched = True
        return self.inner.data_ranges()

    def chunks(self) -> Iterator[bytes]:
        self._restart()
        self._touched = True
        for chunk in self.inner.chunks():
            if self._pos + len(chunk) > self.size:
                chunk = chunk[:max(0, self.size - self._pos)]
            self._hash.update(chunk)
            self._pos += len(chunk)
            yield chunk

    def _read_range(self, offset: int, length: int) -> bytes:
        data = self.inner.read_range(offset, length)  # type: ignore[misc]
        self._touched = True
        if offset < self._pos:
            self._broken = True
        else:
            self._zeros(offset - self._pos)
            self._hash.update(data)
            self._pos = offset + len(data)
        return data

    def _restart(self) -> None:
        if self._pos:   # read twice (a retry): start over
            self._hash, self._pos, self._broken = hashlib.sha256(), 0, False

    def _zeros(self, n: int) -> None:
        while n > 0:
            step = min(n, len(_ZEROS))
            self._hash.update(_ZEROS[:step] if step < len(_ZEROS) else _ZEROS)
            n -= step
        # position advanced by the caller

    def digest(self) -> str | None:
        """The SHA-256 of the whole file as written, or None if the sink did not read it all."""
        if self._broken or self._pos > self.size:
            return None
        if not self._touched and self.size:
            return None
        if self._pos < self.size:
            self._zeros(self.size - self._pos)   # a trailing hole
            self._pos = self.size
        return self._hash.hexdigest()


def entry_record(name: str, entry: Entry, *, user: str | None = None, group: str | None = None,
                 sha256: str | None = None, hardlink_to: str | None = None) -> dict[str, Any]:
    rec: dict[str, Any] = {"path": name, "type": entry.kind, "size": entry.size if entry.kind == FILE else 0,
                           "mode": f"{entry.mode & 0o7777:04o}", "uid": entry.uid, "gid": entry.gid}
    if user:
        rec["user"] = user
    if group:
        rec["group"] = group
    rec["mtime_ns"] = entry.mtime_ns
    if entry.link_target is not None:
        rec["link_target"] = entry.link_target
    if entry.rdev:
        rec["rdev"] = list(entry.rdev)
    if hardlink_to is not None:
        rec["hardlink_to"] = hardlink_to
    if entry.kind == FILE:
        rec["sha256"] = sha256
    return rec


@dataclass
class ManifestWriter:
    """Collects records while the engine writes; `text()` is the finished manifest."""

    header: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    _digests: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def for_extract(cls, snapshot: str, paths: list[str], excludes: list[str], strip_components: int,
                    layout: str = "paths", **extra: Any) -> "ManifestWriter":
        header = {"rescue_manifest": VERSION, "snapshot": snapshot, "paths": list(paths),
                  "excludes": list(excludes), "strip_components": strip_components, "layout": layout,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        header.update(extra)
        return cls(header=header)

    def wrap(self, item: Item) -> None:
        """Hash the item's content as the sink reads it."""
        if item.content is not None and not isinstance(item.content, HashingContent):
            item.content = HashingContent(item.content)

    def written(self, item: Item) -> None:
        """Record an item the sink took."""
        sha = None
        if item.hardlink_to is not None:
            sha = self._digests.get(item.hardlink_to)
        elif isinstance(item.content, HashingContent):
            sha = item.content.digest()
        elif item.entry.kind == FILE and item.entry.size == 0:
            sha = hashlib.sha256().hexdigest()
        if item.entry.kind == FILE:
            self._digests[item.name] = sha
        self.records.append(entry_record(item.name, item.entry, user=item.user, group=item.group,
                                         sha256=sha, hardlink_to=item.hardlink_to))

    def skip(self, name: str, reason: str) -> None:
        self.skipped.append({"path": name, "skipped": reason})

    def not_arrived(self, name: str) -> None:
        """A remote target lost an item after accepting it."""
        self.records = [r for r in self.records if r["path"] != name]
        self.skip(name, "did not arrive at the target")

    def lines(self) -> Iterator[dict[str, Any]]:
        yield self.header
        yield from self.records
        yield from self.skipped
        yield {"end": True, "entries": len(self.records), "skipped": len(self.skipped)}

    def text(self) -> bytes:
        return b"".join(json.dumps(rec, ensure_ascii=False, separators=(",", ":"))
                        .encode("utf-8", "surrogateescape") + b"\n" for rec in self.lines())

    def write_file(self, path: str) -> None:
        """Write to `path` atomically (PATH.part, then renamed)."""
        part = path + ".part"
        with open(part, "wb") as f:
            f.write(self.text())
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, path)

    def as_item(self, name: str = MANIFEST_NAME) -> Item:
        """The manifest as one more item, for storing it inside the target."""
        data = self.text()
        now = time.time_ns()
        uid = os.geteuid() if hasattr(os, "geteuid") else 0
        gid = os.getegid() if hasattr(os, "getegid") else 0
        entry = Entry(path="/" + name, kind=FILE, mode=0o644, uid=uid, gid=gid, size=len(data), mtime_ns=now)
        return Item(name=name, entry=entry, content=Content(size=len(data), chunks=lambda: iter((data,)),
                                                            read_range=lambda o, n: data[o:o + n]))


@dataclass
class Manifest:
    """A manifest read back: header, records by target name, skipped names."""

    header: dict[str, Any]
    records: dict[str, dict[str, Any]]
    skipped: dict[str, str]
    complete: bool


def read_manifest(stream: BinaryIO | bytes, label: str = "manifest") -> Manifest:
    from ..errors import RescueError
    raw = stream if isinstance(stream, bytes) else stream.read()
    header: dict[str, Any] | None = None
    records: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    complete = False
    for number, line in enumerate(io.BytesIO(raw), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode("utf-8", "surrogateescape"))
        except ValueError as exc:
            raise RescueError(f"line {number} is not JSON ({exc})", file=label, layer="manifest") from None
        if not isinstance(rec, dict):
            raise RescueError(f"line {number} is not an object", file=label, layer="manifest")
        if header is None:
            if rec.get("rescue_manifest") != VERSION:
                raise RescueError("not a rescue manifest (first line lacks \"rescue_manifest\": 1)",
                                  file=label, layer="manifest")
            header = rec
        elif rec.get("end"):
            complete = True
        elif "skipped" in rec:
            skipped[str(rec.get("path"))] = str(rec["skipped"])
        elif isinstance(rec.get("path"), str) and isinstance(rec.get("type"), str):
            records[rec["path"]] = rec
        else:
            raise RescueError(f"line {number} has no path and type", file=label, layer="manifest")
    if header is None:
        raise RescueError("empty manifest", file=label, layer="manifest")
    return Manifest(header, records, skipped, complete)
