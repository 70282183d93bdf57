"""Directory output: the selection as files, with as much metadata as the
running user may set.

Names from the image are untrusted. Every path is built from checked
components under the target, no parent on the way may be a symlink, links are
created as links and never followed, and device nodes need root and --devices.
"""

from __future__ import annotations

import errno
import os
import stat

from ..errors import TargetError
from ..fs.base import BLOCK, CHAR, DIR, FIFO, FILE, SYMLINK, FileReadError
from .base import Item, Sink, SinkResult
from .select import unsafe_name

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


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
                self._write_file(path, item)
            elif e.kind == SYMLINK:
                os.symlink(e.link_target or "", path)
                self._dirs_ok.discard(path)
            elif e.kind == FIFO:
                if not hasattr(os, "mkfifo"):
                    self._warn_once("fifo", "FIFOs skipped: this system cannot create them")
                    return
                os.mkfifo(path, 0o600)
            elif e.kind in (CHAR, BLOCK):
                if not (self.devices and IS_ROOT):
                    self._warn_once("dev", "device nodes skipped (they need root and --devices); "
                                           "a tar target keeps them")
                    return
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
            raise FileReadError(f"cannot create {item.name}: {exc.strerror or exc}") from None
        self._apply_metadata(path, item)

    def _write_file(self, path: str, item: Item) -> None:
        content = item.content
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
        fd = os.open(path, flags, 0o600)
        try:
            if content is not None and content.size:
                ranges = content.data_ranges()
                if ranges is not None and content.read_range is not None and \
                        sum(length for _, length in ranges) < content.size:
                    for offset, length in ranges:   # holes stay holes
                        pos = offset
                        while pos < offset + length:
                            n = min(1 << 20, offset + length - pos)
                            data = content.read_range(pos, n)
                            if len(data) != n:
                                raise FileReadError(f"{item.entry.path}: short read at offset {pos}")
                            self._pwrite(fd, data, pos, path)
                            pos += n
                    os.ftruncate(fd, content.size)
                else:
                    pos = 0
                    for chunk in content.chunks():
                        self._pwrite(fd, chunk, pos, path)
                        pos += len(chunk)
                    if pos != content.size:
                        raise FileReadError(f"{item.entry.path}: read {pos} of {content.size} bytes")
        except BaseException:
            os.close(fd)
            try:
                os.unlink(path)   # no half-written file under the real name
            except OSError:
                pass
            raise
        os.close(fd)
        self.files += 1
        self.bytes += content.size if content else 0

    def _pwrite(self, fd: int, data: bytes, pos: int, path: str) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.pwrite(fd, view, pos) if hasattr(os, "pwrite") else _seek_write(fd, view, pos)
            except OSError as exc:
                raise self._target_error(exc, path) from None
            view = view[n:]
            pos += n

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
        pass   # what was written is complete file by file; nothing is half-written


def _seek_write(fd: int, data, pos: int) -> int:
    os.lseek(fd, pos, os.SEEK_SET)
    return os.write(fd, data)

