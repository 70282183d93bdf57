"""Who the guest is: /etc/os-release, and the names behind numeric owners."""

from __future__ import annotations

import shlex

from ..fs.base import FileSystem


def _read_text(fs: FileSystem, path: str, errors: str = "replace") -> str | None:
    try:
        return fs.read_file(path, limit=1 << 20).decode("utf-8", errors)
    except Exception:   # missing or damaged: the guest just tells us less
        return None


def os_release(fs: FileSystem) -> dict[str, str] | None:
    """Parsed /etc/os-release (or /usr/lib/os-release), keys lower-cased."""
    text = _read_text(fs, "/etc/os-release") or _read_text(fs, "/usr/lib/os-release")
    if text is None:
        return None
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        try:
            parts = shlex.split(value)
            value = parts[0] if parts else ""
        except ValueError:
            value = value.strip("\"'")
        out[key.strip().lower()] = value
    return out


def id_names(fs: FileSystem, path: str) -> dict[int, str]:
    """uid -> name from /etc/passwd, or gid -> name from /etc/group. A name that
    is not UTF-8 (Latin-1 `café` as byte e9) keeps its bytes as surrogate escapes,
    so a tar gets the real name (tar_sink writes it raw); shown, it is escaped."""
    text = _read_text(fs, path, "surrogateescape")
    names: dict[int, str] = {}
    for line in (text or "").splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[2].isdigit() and fields[0] and not fields[0].startswith(("+", "-")):
            names.setdefault(int(fields[2]), fields[0])
    return names
