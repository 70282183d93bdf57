"""Directory output: the selection as files, with as much metadata as the
running user may set.

Names from the image are untrusted. Every path is built from checked
components under the target, no parent on the way may be a symlink, links are
created as links and never followed, and device nodes need root and --devices.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat

from ..errors import TargetError
from ..fs.base import BLOCK, CHAR, DIR, FIFO, FILE, SYMLINK, FileReadError
from .base import Item, NotWritten, Sink, SinkResult
from .copy import copy_to_fd
from .select import unsafe_name

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
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
        self._dirs_ok: set[str] = {self.root}
        self._dir_times: list[tuple[str, int, int, int | None]] = []
        self.files = 0
        self.bytes = 0
        self.warnings: list[str] = []
        self._warned: set[str] = set()
        self._real_temp_like: set[str] = set()   # image files written here whose names end in TEMP_SUFFIX
        self._temp_counter = 0

    def _warn_once(self, key: str, text: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.warnings.append(text)

    # -- paths ---------------------------------------------------------------

    def _path(self, name: str) -> str:
        """target/name, with every component checked and every parent a real
        directory inside the target (created as needed)."""
        parts = name.split("/")
        for part in parts:
            why = unsafe_name(part)
            if why:
                raise FileReadError(f"refusing unsafe {why}")
        parent = self.root
        for part in parts[:-1]:
            parent = os.path.join(parent, part)
            if parent in self._dirs_ok:
                continue
            try:
                st = os.lstat(parent)
            except FileNotFoundError:
                self._mkdir(parent)
                continue
            if not stat.S_ISDIR(st.st_mode):   # a symlink or file where a directory should be
                raise FileReadError(f"refusing to write below {parent!r}: it is not a directory "
                                    "(a symlink in the image must not redirect the output)")
            self._dirs_ok.add(parent)
        return os.path.join(self.root, *parts)

    def _mkdir(self, path: str) -> None:
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            self._make_writable(path)
        except OSError as exc:
            raise self._target_error(exc, path) from None
        self._dirs_ok.add(path)

    @staticmethod
    def _make_writable(path: str) -> None:
        """An earlier run left a directory read-only (its mode from the image,
        e.g. 0555): open it for us again; close() sets the image's mode last."""
        try:
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode) and st.st_mode & 0o700 != 0o700:
                os.chmod(path, stat.S_IMODE(st.st_mode) | 0o700)
        except OSError:
            pass   # not ours: writing below it reports the real error

    def _clear(self, path: str, kind: str) -> None:
        """Make room for an entry: an earlier run's file is replaced, a
        directory is kept for a directory."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            if kind == DIR:
                return
            raise FileReadError(f"{path!r} exists as a directory; not replacing it")
        os.unlink(path)

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
        path = self._path(item.name)
        try:
            self._clear(path, e.kind if item.hardlink_to is None else FILE)
            if item.hardlink_to is not None:
                source = self._path(item.hardlink_to)
                os.link(source, path, follow_symlinks=False)
                return
            if e.kind == DIR:
                self._mkdir(path)
            elif e.kind == FILE:
                self._write_file_into_place(path, item)
                return
            elif e.kind == SYMLINK:
                os.symlink(e.link_target or "", path)
                self._dirs_ok.discard(path)
            elif e.kind == FIFO:
                os.mkfifo(path, 0o600)
            elif e.kind in (CHAR, BLOCK):
                major, minor = e.rdev or (0, 0)
                kind_bits = stat.S_IFCHR if e.kind == CHAR else stat.S_IFBLK
                os.mknod(path, kind_bits | 0o600, os.makedev(major, minor))
            else:
                return
        except FileReadError:
            raise
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EIO):
                raise self._target_error(exc, path) from None
            if exc.errno in (errno.ENAMETOOLONG, errno.EILSEQ, errno.EINVAL):   # the target's limits, not damage
                raise NotWritten(f"name not written: the target filesystem refuses it ({exc.strerror}); "
                                 "a tar target keeps it") from None
            raise FileReadError(f"cannot create {item.name}: {exc.strerror or exc}") from None
        self._apply_metadata(path, item)

    def _write_file_into_place(self, path: str, item: Item) -> None:
        """Write under a temporary name beside `path` and rename it into place
        once complete, with its metadata: an interruption (Ctrl-C, SIGTERM,
        SIGHUP; even SIGKILL or a power cut) never leaves a cut-off file under
        its real name, only a `.NAME.rescue-part` that the next run replaces."""
        temp, fd = self._open_temp(path)
        try:
            self._write_file(temp, fd, item)
            self._apply_metadata(temp, item)
            os.replace(temp, path)
        except BaseException:
            try:
                os.unlink(temp)
            except OSError:
                pass
            raise
        if path.endswith(TEMP_SUFFIX):   # an image's own file with our suffix: never taken for a stale one
            self._real_temp_like.add(path)
        self.files += 1
        self.bytes += item.content.size if item.content else 0

    def _open_temp(self, path: str) -> tuple[str, int]:
        head, leaf = os.path.split(path)
        if len(os.fsencode(leaf)) > 200:   # room for the affixes within NAME_MAX (255)
            leaf = hashlib.sha1(os.fsencode(leaf)).hexdigest()
        temp = os.path.join(head, f".{leaf}{TEMP_SUFFIX}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
        for attempt in range(3):
            try:
                return temp, os.open(temp, flags, 0o600)
            except FileExistsError:
                if temp in self._real_temp_like or attempt:   # the image's own file: another name
                    self._temp_counter += 1
                    temp = os.path.join(head, f".rescue-{os.getpid()}-{self._temp_counter}{TEMP_SUFFIX}")
                else:   # left by an interrupted run: replaced
                    self._clear(temp, FILE)
        raise FileReadError(f"cannot create a temporary file beside {path!r}")

    def _write_file(self, path: str, fd: int, item: Item) -> None:
        content = item.content
        try:
            if content is not None and content.size:
                try:
                    copy_to_fd(content, fd, item.entry.path)
                except FileReadError:
                    raise
                except OSError as exc:
                    raise self._target_error(exc, path) from None
        finally:
            os.close(fd)

    def _apply_metadata(self, path: str, item: Item) -> None:
        e = item.entry
        is_link = e.kind == SYMLINK
        if self.owners and hasattr(os, "lchown"):
            try:
                os.lchown(path, e.uid, e.gid)
            except OSError as exc:
                self._warn_once("chown", f"owners not kept: {exc.strerror}")
        times = (e.atime_ns if e.atime_ns is not None else e.mtime_ns, e.mtime_ns)
        mode = e.mode & 0o7777
        if not self.keep_setuid and mode & 0o6000:
            whose = "root" if IS_ROOT else "you"
            self._warn_once("setuid", f"setuid/setgid bits dropped (an image's setuid program would run as "
                                      f"{whose} here; use --keep-setuid to keep them)")
            mode &= ~0o6000
        if not is_link and e.kind != DIR:   # a directory's mode waits for close()
            try:
                os.chmod(path, mode)
            except OSError as exc:
                self._warn_once("chmod", f"modes not kept: {exc.strerror}")
        if e.xattrs and hasattr(os, "setxattr"):
            for key, value in e.xattrs.items():
                try:
                    os.setxattr(path, key, value, follow_symlinks=False)
                except OSError as exc:
                    namespace = key.split(".", 1)[0]
                    self._warn_once("xattr-" + namespace,
                                    f"{namespace}.* extended attributes not kept here ({exc.strerror}); "
                                    "a tar target keeps them")
        if e.kind == DIR:
            # Mode and times at close(): an image's read-only directory (0555)
            # must still take its files when we are not root.
            self._dir_times.append((path, mode, times[0], times[1]))
            return
        try:
            if is_link:
                if os.utime in os.supports_follow_symlinks:
                    os.utime(path, ns=times, follow_symlinks=False)
            else:
                os.utime(path, ns=times)
        except OSError as exc:
            self._warn_once("utime", f"times not kept: {exc.strerror}")

    def close(self) -> SinkResult:
        # Directory modes and times last: writing inside a directory changes
        # its mtime, and a read-only one takes no more files. Deepest first, so
        # a parent without search permission (0000) is closed after its children.
        for path, mode, atime, mtime in reversed(self._dir_times):
            try:
                os.chmod(path, mode)
            except OSError as exc:
                self._warn_once("chmod", f"modes not kept: {exc.strerror}")
            try:
                os.utime(path, ns=(atime, mtime))
            except OSError:
                pass
        return SinkResult(target=self.root + os.sep, files=self.files, bytes=self.bytes, warnings=self.warnings)

    def abort(self) -> None:
        pass   # a file being written is removed by add(); every file under its real name is complete
