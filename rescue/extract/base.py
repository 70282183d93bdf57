"""What flows from the extract engine to a sink.

The engine walks the selection and hands each sink `Item`s in walk order
(a directory before what is inside it). A sink writes them somewhere: a tar
stream, a directory, an rsync or rclone target. Sinks never see the filesystem
backend, only items.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

from ..fs.base import Entry, FileReadError


@dataclass
class Content:
    """A regular file's bytes, streamed on demand from the image."""

    size: int
    chunks: Callable[[], Iterator[bytes]]          # whole file, in order; may raise FileReadError
    data_ranges: Callable[[], list[tuple[int, int]] | None] = lambda: None  # sparse map; None = dense
    read_range: Callable[[int, int], bytes] | None = None
    # The bytes as (fd, offset, length) pieces of local image files, for a copy
    # inside the kernel (extract/zerocopy.py); None when they are not stored so.
    plain: Callable[[], list[tuple[int, int, int]] | None] | None = None


@dataclass
class Item:
    name: str                     # output path relative to the target: "var/lib/docker/volumes/x"
    entry: Entry                  # metadata (entry.xattrs is loaded when the sink wants xattrs)
    content: Content | None = None  # regular files only (and not for hard-link repeats)
    hardlink_to: str | None = None  # name of an earlier item that is the same inode
    user: str | None = None       # owner's name from the guest's /etc/passwd
    group: str | None = None      # group's name from the guest's /etc/group


class NotWritten(FileReadError):
    """An entry the target cannot hold (a device node in a directory without
    root and --devices, a name the target filesystem refuses): the engine lists
    it as skipped with this reason (exit 1), like a damaged file, but not as damage."""


@dataclass
class SinkResult:
    """What a sink reports back at the end."""

    target: str
    files: int = 0
    bytes: int = 0
    warnings: list[str] = field(default_factory=list)


class Sink:
    """Base class for targets.

    add() writes one item. If reading its content fails (FileReadError), the
    sink leaves its output consistent (a tar pads the member with zeros, a
    directory removes the partial file) and re-raises, so the engine reports
    that file as damaged and goes on. Any problem with the *target* (full disk,
    remote gone) raises TargetError and ends the run.
    """

    #: what this sink can keep, for the README and for warnings
    keeps: frozenset[str] = frozenset()

    def add(self, item: Item) -> None:
        raise NotImplementedError

    def close(self) -> SinkResult:
        """Finish (flush, rename into place, run the transfer) and report."""
        raise NotImplementedError

    def abort(self) -> None:
        """Stop after an error; leave nothing half-written under the final name."""
