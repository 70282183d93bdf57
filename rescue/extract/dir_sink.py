"""Directory output: the selection as files, with as much metadata as the
running user may set.

Names from the image are untrusted. Every path is built from checked
components under the target, no parent on the way may be a symlink, links are
created as links and never followed, and device nodes need root and --devices.
The writing is `local_tree.LocalTree` (directory descriptors, O_NOFOLLOW), the
same writer the rsync/rclone staging uses; this sink adds the temporary names
(a file appears under its real name only when complete), the directory modes
set last, and the wording of what a directory target cannot keep.
"""

from __future__ import annotations

import errno
import hashlib
import os

from ..errors import TargetError
from ..fs.base import BLOCK, CHAR, DIR, FIFO, FILE, SYMLINK, FileReadError
from .base import Item, NotWritten, Sink, SinkResult
from .local_tree import IS_ROOT, LocalTree, MetadataPolicy, NotADirectory, WriteFailed
from .select import unsafe_name

TEMP_SUFFIX = ".rescue-part"   # a file being written: renamed to its real name when complete


class DirectorySink(Sink):
    def __init__(self, target: str, *, devices: bool = False, keep_setuid: bool | None = None,
                 owners: bool | None = None) -> None:
        self.root = os.path.abspath(target)
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as exc:
            raise TargetError(f"cannot create the output directory: {exc.strerror or exc}", file=target) from None
        if os.path.islink(self.root) or not os.path.isdir(self.root):
            raise TargetError("the output exists and is not a directory", file=target)
        self.devices = devices
        # As root, a setuid binary from an untrusted image would be a real
        # setuid-root program here; as a normal user it would run as that user
        # for anyone who can reach the target (GNU tar and bsdtar drop the bits
        # too). Dropped unless asked.
        self.keep_setuid = bool(keep_setuid)
        self.owners = IS_ROOT if owners is None else owners
        self.tree = LocalTree(self.root, MetadataPolicy(owners=self.owners, keep_setuid=self.keep_setuid,
                                                        devices=devices and IS_ROOT),
                              lose=self._lose)
        self.files = 0
        self.bytes = 0
        self.warnings: list[str] = []
        self._warned: set[str] = set()
        self._real_temp_like: set[tuple[str, ...]] = set()   # image files written here whose names end in TEMP_SUFFIX
        self._temp_counter = 0

    def _warn_once(self, key: str, text: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.warnings.append(text)

    def _lose(self, key: str, detail: str) -> None:
        """What the writer could not keep, worded for a directory target."""
        if key == "owners":
            self._warn_once("chown", f"owners not kept: {detail}")
        elif key == "setuid":
            whose = "root" if IS_ROOT else "you"
            self._warn_once("setuid", f"setuid/setgid bits dropped (an image's setuid program would run as "
                                      f"{whose} here; use --keep-setuid to keep them)")
        elif key == "chmod":
            self._warn_once("chmod", f"modes not kept: {detail}")
        elif key == "utime":
            self._warn_once("utime", f"times not kept: {detail}")
        elif key == "xattr-unsupported":
            self._warn_once(key, f"extended attributes not kept here ({detail}); a tar target keeps them")
        elif key.startswith("xattr"):
            namespace, _, why = detail.partition("\t")
            self._warn_once("xattr-" + namespace, f"{namespace}.* extended attributes not kept here "
                                                  f"({why or detail}); a tar target keeps them")
        # owners-unset, symlink-owners: an ordinary user's files are theirs; nothing to say

    def _parts(self, name: str) -> list[str]:
        parts = name.split("/")
        for part in parts:
            why = unsafe_name(part)
            if why:
                raise FileReadError(f"refusing unsafe {why}")
        return parts

    def _target_error(self, exc: OSError, path: str) -> TargetError:
        if exc.errno == errno.ENOSPC:
            return TargetError("no space left on device", file=path,
                               hint="write to a disk with more free space, or extract less")
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EDQUOT if hasattr(errno, "EDQUOT") else -1):
            return TargetError(f"cannot write: {exc.strerror}", file=path)
        return TargetError(f"cannot write: {exc.strerror or exc}", file=path)

    # -- items ---------------------------------------------------------------

    def add(self, item: Item) -> None:
        e = item.entry
        if item.hardlink_to is None and e.kind in (CHAR, BLOCK) and not (self.devices and IS_ROOT):
            # named in the report and exit 1: a silent skip would look like a complete rescue
            raise NotWritten("device node not created (a directory target needs root and --devices; "
                             "a tar target keeps it)")
        if item.hardlink_to is None and e.kind == FIFO and not hasattr(os, "mkfifo"):
            raise NotWritten("FIFO not created: this system cannot create them (a tar target keeps it)")
        parts = self._parts(item.name)
        path = os.path.join(self.root, *parts)
        try:
            if item.hardlink_to is not None:
                self.tree.link(self._parts(item.hardlink_to), parts)
            elif e.kind == DIR:
                self.tree.mkdir(parts, e)
            elif e.kind == FILE:
                self.tree.write_file(parts, e, item.content, temp_names=self._temp_names(parts))
                if parts[-1].endswith(TEMP_SUFFIX):   # an image's own file with our suffix: never taken for a stale one
                    self._real_temp_like.add(tuple(parts))
                self.files += 1
                self.bytes += item.content.size if item.content else 0
            elif e.kind == SYMLINK:
                self.tree.symlink(parts, e)
            elif e.kind in (FIFO, CHAR, BLOCK):
                self.tree.special(parts, e)
        except FileReadError:
            raise
        except NotADirectory as exc:   # a symlink or file where a directory should be
            raise FileReadError(f"refusing to write below {os.path.join(self.root, exc.path)!r}: it is not a "
                                "directory (a symlink in the image must not redirect the output)") from None
        except IsADirectoryError:
            raise FileReadError(f"{path!r} exists as a directory; not replacing it") from None
        except WriteFailed as exc:
            raise self._target_error(exc, path) from None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EIO):
                raise self._target_error(exc, path) from None
            if exc.errno in (errno.ENAMETOOLONG, errno.EILSEQ, errno.EINVAL):   # the target's limits, not damage
                raise NotWritten(f"name not written: the target filesystem refuses it ({exc.strerror}); "
                                 "a tar target keeps it") from None
            raise FileReadError(f"cannot create {item.name}: {exc.strerror or exc}") from None

    def _temp_names(self, parts: list[str]):
        """Where a file is written until complete, then renamed to its real
        name: an interruption (Ctrl-C, SIGTERM, SIGHUP; even SIGKILL or a power
        cut) never leaves a cut-off file under its real name, only a
        `.NAME.rescue-part` that the next run replaces."""
        leaf = parts[-1]
        if len(os.fsencode(leaf)) > 200:   # room for the affixes within NAME_MAX (255)
            leaf = hashlib.sha1(os.fsencode(leaf)).hexdigest()
        first = f".{leaf}{TEMP_SUFFIX}"
        # left by an interrupted run: replaced; the image's own file of that name: another name
        yield first, tuple(parts[:-1]) + (first,) not in self._real_temp_like
        for _ in range(2):
            self._temp_counter += 1
            yield f".rescue-{os.getpid()}-{self._temp_counter}{TEMP_SUFFIX}", False

    def close(self) -> SinkResult:
        # Directory modes and times last: writing inside a directory changes
        # its mtime, and a read-only one takes no more files.
        self.tree.finish_dirs(modes=True)
        self.tree.close()
        return SinkResult(target=self.root + os.sep, files=self.files, bytes=self.bytes, warnings=self.warnings)

    def abort(self) -> None:
        # a file being written is removed by add() (or here, when the interruption
        # came as its temporary was opened); every file under its real name is complete
        self.tree.discard_partial()
        self.tree.close()
