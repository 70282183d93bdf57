"""Run rsync/rclone as child processes: streamed stdout, scrubbed stderr.

Secrets (RSYNC_PASSWORD, an rclone remote's pass/key/token values) may show up
in a tool's messages (URLs with credentials, debug dumps); everything we show
goes through `scrub` first.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from typing import Callable, Iterable

from ..errors import TargetError
from .base import SinkResult

_URL_CREDS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@:]+:[^/\s@]+@")


class RemoteSinkResult(SinkResult):
    """SinkResult plus the (name, bytes) the sink accepted but that did not
    arrive: the engine should list them as skipped, not rescued. `files` and
    `bytes` already leave them out."""

    def __init__(self, target: str) -> None:
        super().__init__(target=target)
        self.not_arrived: list[tuple[str, int]] = []


def scrub(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret replaced by ***, and user:pass@ in URLs removed."""
    for s in sorted({s for s in secrets if s and len(s) >= 3}, key=len, reverse=True):
        text = text.replace(s, "***")
    return _URL_CREDS.sub(r"\g<scheme>***@", text)


def unescape_rsync(name: str) -> str:
    """rsync prints unprintable bytes of names as \\#ooo; undo that."""
    if "\\#" not in name:
        return name
    raw = name.encode("utf-8", "surrogateescape")
    raw = re.sub(rb"\\#([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), raw)
    return raw.decode("utf-8", "surrogateescape")


def require_tool(name: str, hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise TargetError(f"{name} is not installed (not found on PATH)", hint=hint)
    return path


def run_tool(argv: list[str], *, env: dict[str, str] | None = None,
             on_line: Callable[[str], None] | None = None,
             stdin=subprocess.DEVNULL) -> tuple[int, str]:
    """Run argv; feed each stdout line to on_line; return (exit code, stderr).
    stderr goes to a temporary file so a chatty tool cannot block on a full pipe."""
    with tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=err,
                                    env=env if env is not None else os.environ.copy())
        except FileNotFoundError:
            raise TargetError(f"{argv[0]} is not installed (not found on PATH)") from None
        assert proc.stdout is not None
        try:
            for raw in proc.stdout:
                if on_line is not None:
                    on_line(raw.decode("utf-8", "surrogateescape").rstrip("\n"))
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            proc.stdout.close()
        code = proc.wait()
        err.seek(0)
        return code, err.read().decode("utf-8", "replace")


def error_lines(stderr: str) -> list[str]:
    """The tool's own error lines, without rsync's trailing summaries."""
    out = []
    for line in stderr.splitlines():
        line = line.strip()
        if not line or line.startswith("rsync error: some files") or line.startswith("(see the rsync"):
            continue
        out.append(line)
    return out
