"""Turn what the user typed (a path, later a URL or an archive) into a byte source."""

from __future__ import annotations

import os

from .base import ByteSource, FileSource


def open_source(spec: str | os.PathLike, *, member: str | None = None) -> ByteSource:
    """Open SNAPSHOT as typed on the command line.

    `member` picks a file inside an archive when there are several.
    """
    if isinstance(spec, str) and spec[:8].lower().startswith(("http://", "https://")):
        from .http import HttpSource  # urllib3 is imported only for URLs
        return HttpSource(spec)
    return FileSource(spec)
