"""Errors that reach the user as one clear line.

Every layer raises a `RescueError` subclass naming the file, the layer and what
was wrong, plus an optional hint (the next command to type). The CLI prints it
as one line and exits 2; tracebacks appear only with --debug.
"""

from __future__ import annotations

import sys

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


# --- Classification of bad bytes --------------------------------------------
#
# A parser or a decoding library fed damaged bytes raises its own exception
# (construct's StreamError, struct.error, IndexError from a short slice,
# zlib.error, lzma/XZError, ZstdError, zipfile's NotImplementedError for a
# "newer" version, OSError for a seek to a negative offset...). None of them
# may reach the user as a traceback or an "internal error": each layer's
# boundary (source openers and unwrappers, the disk FORMATS registry, volume
# discovery, filesystem opening, archive readers) runs its parsing inside
# `classify()`, which turns exactly these into that layer's RescueError,
# naming the file and what was being read. Everything else (TypeError,
# AttributeError, AssertionError, ...) is a bug in rescue and stays one.
# DamagedRange passes through untouched: it already means "skip this range".

# The libraries' classes are looked up when an exception is judged, among the
# modules already imported: a library not imported cannot have raised, and
# importing construct, xz, tarfile, zipfile, lzma and zstandard up front cost
# every command (`rescue --help` too) a fifth of a second.
_BUILTIN_BAD: tuple[type[BaseException], ...] = (
    IndexError, KeyError, ValueError, EOFError, OverflowError, ZeroDivisionError,
    NotImplementedError, RecursionError, OSError)
_LIBRARY_BAD = (("struct", "error"), ("zlib", "error"), ("lzma", "LZMAError"), ("tarfile", "TarError"),
                ("zipfile", "BadZipFile"), ("zipfile", "LargeZipFile"), ("construct", "ConstructError"),
                ("xz", "XZError"), ("zstandard", "ZstdError"))

# What a boundary's `except` catches; is_bad_bytes() then tells damage from a bug
# (every `except BAD_BYTES` re-raises what it is not).
BAD_BYTES: tuple[type[BaseException], ...] = (Exception,)


def describe(exc: BaseException) -> str:
    """A library exception as a short phrase for one line: construct's
    two-line 'Error in path (parsing) -> field / stream read less...' becomes
    'field blocksize: stream read less than specified amount, ...'."""
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    if text.startswith("Error in path (parsing) -> "):
        path, _, rest = text[len("Error in path (parsing) -> "):].partition(" ")
        text = f"field {path}: {rest}" if rest else f"field {path}"
    if not text:
        text = "no details"
    return f"{type(exc).__name__}: {text}" if type(exc).__module__ == "builtins" else text


def is_bad_bytes(exc: BaseException) -> bool:
    """True for what damaged input makes a parser raise (see BAD_BYTES);
    False for RescueError and DamagedRange (already classified) and for bugs."""
    if isinstance(exc, (RescueError, DamagedRange)):
        return False
    if isinstance(exc, _BUILTIN_BAD):
        return True
    modules = sys.modules
    for module, name in _LIBRARY_BAD:
        found = getattr(modules.get(module), name, None)
        if found is not None and isinstance(exc, found):
            return True
    return False


class classify:
    """Context manager at a layer's boundary: a parser's or library's
    exception on bad bytes becomes `error(f"{what}: {why}", file=file, hint=hint)`.

        with classify(DiskFormatError, "qcow2 header", file=source.name):
            header = Header.parse(raw)
    """

    def __init__(self, error: type[RescueError], what: str, *, file: str | None = None,
                 hint: str | None = None) -> None:
        self.error, self.what, self.file, self.hint = error, what, file, hint

    def __enter__(self) -> "classify":
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is not None and is_bad_bytes(exc):
            raise self.error(f"{self.what}: {describe(exc)}", file=self.file, hint=self.hint) from exc
        return False


# --- Interruption -------------------------------------------------------------

class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP (`timeout`, systemd, `docker stop`, a closing
    terminal): raised in the main thread so every `except KeyboardInterrupt` /
    `finally` clean-up runs exactly as for Ctrl-C (partial files removed, temporary
    names cleaned); the process then exits 128 + the signal number."""

    def __init__(self, signum: int, name: str) -> None:
        super().__init__(name)
        self.signum = signum
        self.name = name
        self.reported = False   # set once "interrupted" has been printed

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_RAISED: list[Interrupted] = []


def interruption() -> Interrupted | None:
    """The signal that interrupted this process, if one did (for the CLI's
    last word when it arrived before a command's own error handling)."""
    return _RAISED[0] if _RAISED else None


def install_signal_handlers() -> None:
    """SIGTERM and SIGHUP handled like SIGINT. The first signal raises
    Interrupted; the handlers then go back to the default action, so a second
    signal during clean-up ends the process at once (a file being written is
    then left under its temporary name only, never under its final name)."""
    import signal

    wanted = [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)]

    def handler(signum, frame) -> None:
        for sig in wanted:
            try:
                signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError):
                pass
        _RAISED.append(Interrupted(signum, signal.Signals(signum).name))
        raise _RAISED[-1]

    for sig in wanted:
        try:
            if signal.getsignal(sig) is signal.SIG_IGN and sig != signal.SIGINT:
                continue   # `nohup rescue ...`: SIGHUP stays ignored as asked
            signal.signal(sig, handler)
        except (OSError, ValueError):   # not the main thread (an embedding program)
            pass
