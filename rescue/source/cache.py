"""Where seek indexes and archive member tables are cached between runs.

The cache lives in the user's cache directory (`RESCUE_CACHE_DIR`, else
platformdirs' user cache dir, e.g. ~/.cache/rescue) and is keyed by the
archive's identity: for a local file its real path, size and mtime; for any
other source whatever it offers as `identity`, or for a URL its path (without
the pre-signed query), size and ETag/Last-Modified. A source without an
identity is never cached.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .base import ByteSource


def cache_root() -> Path:
    env = os.environ.get("RESCUE_CACHE_DIR")
    if env:
        return Path(env)
    try:
        import platformdirs
        return Path(platformdirs.user_cache_dir("rescue", appauthor=False))
    except ImportError:  # platformdirs is a dependency; this keeps `import rescue` cheap
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return Path(base) / "rescue"


def source_key(source: ByteSource) -> str | None:
    """A stable key for `source`, or None when it has no identity to trust."""
    path = getattr(source, "path", None)
    if path is not None and os.path.isfile(path):
        st = os.stat(path)
        ident = ["file", os.path.realpath(path), st.st_size, st.st_mtime_ns]
    else:
        ident = getattr(source, "identity", None) or _url_identity(source)
        if ident is None:
            return None
        ident = ["id", repr(ident), source.size]
    return hashlib.sha256(json.dumps(ident, default=str).encode()).hexdigest()[:32]


KEEP_ARCHIVES = 64  # index entries kept; the least recently used go first


def _prune(root: Path, keep: int = KEEP_ARCHIVES) -> None:
    try:
        entries = sorted(root.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return
    for old in entries[keep:]:
        for f in old.glob("*"):
            try:
                f.unlink()
            except OSError:
                pass
        try:
            old.rmdir()
        except OSError:
            pass


def _url_identity(source: ByteSource):
    """A remote file is the same one when its URL path, size and ETag (or
    Last-Modified) are: pre-signed query strings change with every link."""
    url = getattr(source, "url", None)
    validators = getattr(source, "validators", None)
    etag = getattr(validators, "etag", None)
    modified = getattr(validators, "last_modified", None)
    if not url or not (etag or modified):
        return None
    return ("url", url.split("?", 1)[0], etag, modified)


class IndexCache:
    """One directory per archive; files inside are written atomically."""

    def __init__(self, source: ByteSource) -> None:
        key = source_key(source)
        self.dir = cache_root() / "archives" / key if key else None
        if self.dir is not None and self.dir.is_dir():
            try:
                os.utime(self.dir)  # mark as recently used
            except OSError:
                pass

    @property
    def enabled(self) -> bool:
        return self.dir is not None

    def path(self, name: str) -> Path | None:
        if self.dir is None:
            return None
        return self.dir / name

    def load_json(self, name: str):
        p = self.path(name)
        if p is None or not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return None  # a damaged cache entry is rebuilt, never trusted

    def store_json(self, name: str, value) -> None:
        self.store_bytes(name, json.dumps(value, separators=(",", ":")).encode())

    def store_bytes(self, name: str, data: bytes) -> None:
        p = self.path(name)
        if p is None:
            return
        try:
            if not p.parent.is_dir():
                p.parent.mkdir(parents=True, exist_ok=True)
                _prune(p.parent.parent)
            tmp = p.with_name(p.name + f".tmp{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, p)
        except OSError:
            pass  # caching is an optimisation; a read-only home must not fail the rescue
