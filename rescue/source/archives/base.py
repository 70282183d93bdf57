"""What every archive format fills: the member table (name, where the data
starts, sparse map), and what `inspect` shows about an archive."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_MEMBERS = 200_000  # a disk snapshot archive has a handful; a rootfs tarball is not a disk


@dataclass
class Member:
    name: str
    size: int                      # size of the file as extracted
    type: str                      # file, sparse, dir, symlink, hardlink, other
    offset: int = 0                # where the stored data starts in the (decompressed) archive
    stored: int = 0                # bytes stored (less than size for sparse members)
    sparse: list[list[int]] = field(default_factory=list)  # [offset, length] data runs
    method: int = 0                # zip compression method (0: stored)
    target: str = ""               # link target
    crc: int = 0                   # zip CRC-32 (to frame a deflate member as gzip)
    cut: bool = False              # --partial: the archive ends inside this member's data

    @property
    def is_file(self) -> bool:
        return self.type in ("file", "sparse")


@dataclass
class ArchiveInfo:
    """What `rescue inspect` shows about the outer file."""

    format: str                    # "tar", "zip" or "compressed" (a bare .gz/.zst/... of a disk)
    codec: str | None              # gzip, zstd, xz, bzip2 or None
    members: list[Member]
