"""What every disk container reader provides.

A reader is a module with `detect(source) -> bool` (content only: magic bytes)
and `open(source, options) -> DiskImage`. A `DiskImage` is a byte source of the
*virtual* disk plus `info`, what `rescue inspect` shows about the container.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

from construct import Construct, ConstructError

from ..errors import DiskFormatError
from ..source.base import ByteSource, Run


@dataclass
class DiskOptions:
    """Choices the user can make about a container."""

    backing: str | None = None       # --backing PATH: override a qcow2/VHD parent
    internal_snapshot: str | None = None   # --internal-snapshot NAME: a qcow2 internal snapshot (a VMA: its drive)
    max_chain: int = 16              # backing chains longer than this are a loop


@dataclass
class DiskInfo:
    format: str                      # "raw", "qcow2", "vmdk", "vhd", "vhdx", "vdi"
    virtual_size: int
    subformat: str | None = None     # "monolithicSparse", "dynamic", ...
    allocated_size: int | None = None
    cluster_size: int | None = None
    compression: str | None = None
    backing_chain: list[str] = field(default_factory=list)
    snapshots: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if v not in (None, [], {})}
        out["virtual_size"] = self.virtual_size
        return out


def parse_header(source: ByteSource, struct: Construct, what: str, offset: int = 0) -> Any:
    """`struct` parsed from `source` at `offset`; a DiskFormatError naming
    `what` ("VDI header") when the file is too short or the bytes do not parse."""
    raw = source.read(offset, struct.sizeof())
    if len(raw) < struct.sizeof():
        raise DiskFormatError(f"{what} truncated: file is {source.size} bytes", file=source.name)
    try:
        return struct.parse(raw)
    except ConstructError as exc:
        raise DiskFormatError(f"{what} unreadable: {exc}", file=source.name) from None


def header_error(source: ByteSource, field: str, value: Any, why: str, *, what: str,
                 hint: str | None = None) -> DiskFormatError:
    """The error for one bad header field: "VDI header: block_size=3: not a power of two".
    Readers bind `what` once: `_bad = partial(header_error, what="VDI header")`."""
    return DiskFormatError(f"{what}: {field}={value}: {why}", file=source.name, hint=hint)


class DiskImage:
    """Base class for readers: subclasses set name/size/info and implement read().

    `runs(offset, length)` should say which ranges are holes ('zero') so that
    `rescue convert` writes a sparse file and sparse-aware code skips them.
    Container readers build on mapping.MappedDisk, which provides read() and
    runs() from the reader's map, and file_extents() for convert's kernel copy.
    """

    name: str
    size: int
    info: DiskInfo

    def read(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def runs(self, offset: int, length: int) -> Iterator[Run]:
        yield Run(offset, min(length, self.size - offset), "data")

    def close(self) -> None:
        pass


class RawDisk(DiskImage):
    """A raw disk image: the file is the disk."""

    def __init__(self, source: ByteSource) -> None:
        self.source = source
        self.name = source.name
        self.size = source.size
        self.info = DiskInfo(format="raw", virtual_size=source.size)

    def read(self, offset: int, length: int) -> bytes:
        return self.source.read(offset, length)

    def runs(self, offset: int, length: int) -> Iterator[Run]:
        from ..source.base import runs
        yield from runs(self.source, offset, length)

    def close(self) -> None:
        self.source.close()
