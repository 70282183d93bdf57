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
import logging
import os
from pathlib import Path

from .base import ByteSource

log = logging.getLogger("rescue.source")
_warned: set[str] = set()


def _unusable(where: Path, exc: OSError, doing: str) -> None:
    """The cache is an optimisation, never a failure: one warning per process
    and per problem, saying how to fix it; the run goes on without it."""
    root = cache_root()
    key = f"{doing}:{root}"
    if key in _warned:
        return
    _warned.add(key)
    why = exc.strerror or str(exc)
    log.warning("the index cache %s cannot be %s (%s: %s), so large archives are indexed again on every "
                "open; make it %s for you, or set XDG_CACHE_HOME (or RESCUE_CACHE_DIR) to a directory you "
                "can write", root, doing, why, where, "readable and writable" if doing == "read" else "writable")


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
        try:
            self.dir = cache_root() / "archives" / key if key else None
            if self.dir is not None and self.dir.is_dir():
                os.utime(self.dir)  # mark as recently used
        except OSError as exc:   # HOME not ours (sudo -u, setpriv), a cache dir we cannot enter
            if self.dir is not None:
                _unusable(Path(exc.filename or self.dir), exc, "read")
            self.dir = None

    @property
    def enabled(self) -> bool:
        return self.dir is not None

    def path(self, name: str) -> Path | None:
        if self.dir is None:
            return None
        return self.dir / name

    def load_json(self, name: str):
        data = self.read_bytes(name)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError:
            return None  # a damaged cache entry is rebuilt, never trusted

    def read_bytes(self, name: str) -> bytes | None:
        p = self.path(name)
        if p is None:
            return None
        try:
            return p.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            _unusable(p, exc, "read")
            return None

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
            try:
                tmp.write_bytes(data)
                os.replace(tmp, p)
            except BaseException:
                try:
                    tmp.unlink()
                except OSError:
                    pass
                raise
        except OSError as exc:   # caching is an optimisation; a read-only home must not fail the rescue
            _unusable(Path(exc.filename or p), exc, "written")
