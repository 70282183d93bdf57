"""Errors that reach the user as one clear line.

Every layer raises a `RescueError` subclass naming the file, the layer and what
was wrong, plus an optional hint (the next command to type). The CLI prints it
as one line and exits 2; tracebacks appear only with --debug.
"""

from __future__ import annotations

# Exit codes (borg/restic style): 0 all rescued, 1 finished with warnings
# (something was skipped and reported), 2 error (nothing or not all done).
EXIT_OK = 0
EXIT_PARTIAL = 1
EXIT_ERROR = 2


class RescueError(Exception):
    """A failure the user can act on."""

    layer = "rescue"

    def __init__(self, problem: str, *, file: str | None = None, hint: str | None = None,
                 layer: str | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.file = file
        self.hint = hint
        if layer is not None:
            self.layer = layer

    def one_line(self) -> str:
        where = f"{self.file}: " if self.file else ""
        text = f"{where}{self.layer}: {self.problem}"
        if self.hint:
            text += f" (hint: {self.hint})"
        # Messages quoted from libraries (TSK, zlib) may hold line breaks: one line means one line.
        return " ".join(part.strip() for part in text.splitlines() if part.strip())

    def __str__(self) -> str:
        return self.one_line()


class SourceError(RescueError):
    layer = "source"


class DiskFormatError(RescueError):
    """The container (qcow2, VMDK, ...) is malformed or unsupported."""

    layer = "disk"


class UnsupportedFeature(DiskFormatError):
    """A valid image using a feature we do not read (e.g. encryption)."""


class VolumeError(RescueError):
    layer = "volume"


class FilesystemError(RescueError):
    layer = "fs"


class GuestPathError(RescueError):
    """A path asked for does not exist in the guest."""

    layer = "fs"


class TargetError(RescueError):
    """The output target cannot be written (full disk, permissions, remote down)."""

    layer = "extract"


class DamagedRange(OSError):
    """Raised by byte sources for a damaged region only (bad compressed
    cluster, table pointing past the end); the caller skips what needs it."""
