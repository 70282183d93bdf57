"""Messages from a mounted filesystem name guest paths, not the filesystem's own.

A separate /var knows its files as /lib/docker/...; a btrfs opened at its top
level knows the root subvolume's files as /@/var/lib/.... When the guest tree
routes a call to such a filesystem, `guest_names(inner, guest)` is active:
errors raised (RescueError, FileReadError) and warnings logged under "rescue"
during the call have `inner` (and paths below it) rewritten to `guest`.
"""

from __future__ import annotations

import logging
import re
import threading
from contextlib import contextmanager
from typing import Iterator

from ..errors import RescueError

_local = threading.local()


def swap(text: str, inner: str, guest: str) -> str:
    """`text` with the path `inner` (and paths below it) shown as `guest`."""
    if not text or inner in ("", "/") or inner == guest or inner not in text:
        return text

    def repl(m: re.Match) -> str:
        if guest == "/":   # the root subvolume "/@" is the guest's "/": "/@/etc" -> "/etc"
            return "" if m.group(1) == "/" else "/"
        return guest

    return re.sub(r"(?<![\w./-])" + re.escape(inner) + r"(?=($|[/\s:'\"),;]))", repl, text)


def _mapped(text: str) -> str:
    for inner, guest in reversed(getattr(_local, "maps", [])):
        text = swap(text, inner, guest)
    return text


def _install() -> None:
    old = logging.getLogRecordFactory()
    if getattr(old, "rescue_guest_paths", False):
        return

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = old(*args, **kwargs)
        if getattr(_local, "maps", None) and record.name.startswith("rescue"):
            try:
                record.msg, record.args = _mapped(record.getMessage()), None
            except Exception:   # a record that cannot be formatted is left as it is
                pass
        return record

    factory.rescue_guest_paths = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


@contextmanager
def guest_names(inner: str, guest: str) -> Iterator[None]:
    if inner in ("", "/") or inner == guest:   # nothing to rename
        yield
        return
    _install()
    maps = _local.__dict__.setdefault("maps", [])
    maps.append((inner, guest))
    try:
        yield
    except RescueError as exc:
        exc.problem = swap(exc.problem, inner, guest)
        exc.args = (exc.problem,)
        raise
    except OSError as exc:
        if exc.args and isinstance(exc.args[0], str) and len(exc.args) == 1:
            exc.args = (swap(exc.args[0], inner, guest),)
        raise
    finally:
        maps.pop()


def mapped_chunks(chunks: Iterator[bytes], inner: str, guest: str) -> Iterator[bytes]:
    """A generator's errors named in guest paths too (the work happens while iterating)."""
    it = iter(chunks)
    while True:
        with guest_names(inner, guest):
            try:
                chunk = next(it)
            except StopIteration:
                return
        yield chunk
