"""Bounded local staging for the rsync and rclone tree sinks.

rsync and rclone copy *trees*, so items are written into a private scratch
directory one batch at a time; the sink runs the tool over the batch, then
clears the batch's files. Directories stay (they are small) so every batch
carries the whole directory skeleton and the last one sets their mtimes.

Safety: item names are untrusted. Every path is opened component by component
from the scratch root with O_NOFOLLOW, `..`/`.`/NUL are refused, so nothing is
ever written outside the scratch dir even if the image names a symlink
"a" and then a file "a/b".

Owners, modes, devices, non-user xattrs: a non-root process cannot give its
staged files foreign owners or create device nodes. rsync's `--fake-super`
solves that on the sending side: rsync then reads a file's owner, full mode
and device numbers from its `user.rsync.%stat` xattr ("%o %u,%u %u:%u", see
rsync's xattrs.c) and `trusted.x`/`security.x` xattrs from
`user.rsync.trusted.x`/`user.rsync.security.x`, and sends them as if they
were real. Staging uses that whenever the scratch filesystem takes user xattrs
(`fake_super`); otherwise it falls back to real chown/mknod when root and
loses owners and devices (with a warning) when not.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat as stat_mod
import tempfile

from ..errors import TargetError
from ..fs.base import BLOCK, CHAR, DIR, FIFO, FILE, SOCKET, SYMLINK, Entry
from .base import Content, Item
from .copy import copy_to_fd

STAT_XATTR = "user.rsync.%stat"
_SPECIALS = (CHAR, BLOCK, FIFO, SOCKET)


def split_name(name: str) -> list[str]:
    """An item name as path components; refuses names that could climb out."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    for p in parts:
        if p == ".." or "\0" in p:
            raise ValueError(f"unsafe name {name!r}")
    return parts


def xattrs_supported(path: str) -> bool:
    try:
        os.setxattr(path, "user.rescue.probe", b"1")
        os.removexattr(path, "user.rescue.probe")
        return True
    except OSError:
        return False


class Staging:
    """A scratch directory holding one batch of items at a time."""

    def __init__(self, scratch_dir: str | None = None, *, fake_super: bool | None = None,
                 devices: bool = True, fifos: bool = True, keep_setuid: bool = True, xattrs: bool = True,
                 prefix: str = "rescue-stage-") -> None:
        try:
            self.root = tempfile.mkdtemp(prefix=prefix, dir=scratch_dir)
        except OSError as e:
            raise TargetError(f"cannot create scratch dir in {scratch_dir or tempfile.gettempdir()}: "
                              f"{e.strerror}", hint="point TMPDIR at a writable disk") from None
        os.chmod(self.root, 0o700)
        self.root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        self.is_root = hasattr(os, "geteuid") and os.geteuid() == 0
        self.fake_super = xattrs_supported(self.root) if fake_super is None else fake_super
        self.devices = devices          # stage device nodes at all
        self.fifos = fifos              # stage fifos and sockets at all
        self.keep_setuid = keep_setuid
        self.xattrs = xattrs
        self.batch_files: list[str] = []   # non-directories staged since the last clear
        self.batch_bytes = 0               # data bytes (not holes) staged since the last clear
        self.dirs: dict[str, Entry | None] = {}  # every staged directory -> its entry (None: implied)
        self.lost: dict[str, int] = {}     # what could not be staged, by reason -> count

    # -- paths -------------------------------------------------------------

    def _open_dir(self, parts: list[str], create: bool = True) -> int:
        """fd of the scratch directory `parts`, walked without following links."""
        fd = os.dup(self.root_fd)
        try:
            for i, p in enumerate(parts):
                try:
                    nfd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                except OSError as e:
                    if e.errno not in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                        raise
                    if e.errno != errno.ENOENT:   # a symlink or file where a directory should be
                        raise ValueError(f"{'/'.join(parts[:i + 1])} is not a directory") from None
                    if not create:
                        raise
                    os.mkdir(p, 0o700, dir_fd=fd)
                    os.chmod(p, 0o755, dir_fd=fd)  # an implied parent: the usual mode
                    self.dirs.setdefault("/".join(parts[:i + 1]), None)
                    if self.fake_super:          # ... and owner (root, not whoever stages)
                        self._implied_owner(p, fd)
                    nfd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _implied_owner(self, name: str, parent_fd: int) -> None:
        dfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
        try:
            self._setxattr(dfd, STAT_XATTR, b"40755 0,0 0:0")
        finally:
            os.close(dfd)

    def _clear_slot(self, pfd: int, leaf: str) -> None:
        """Make room for `leaf`: a name given twice replaces the earlier non-directory."""
        try:
            st = os.stat(leaf, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat_mod.S_ISDIR(st.st_mode):
            os.unlink(leaf, dir_fd=pfd)

    # -- staging -----------------------------------------------------------

    def stage(self, item: Item) -> int:
        """Write one item; returns the data bytes it took. Raises FileReadError
        from the content after removing the partial file, ValueError for an
        unsafe name, OSError for a local scratch problem."""
        parts = split_name(item.name)
        entry = item.entry
        if entry.kind == DIR:
            self._stage_dir(parts, entry)
            return 0
        if not parts:
            raise ValueError(f"unsafe name {item.name!r}")
        pfd = self._open_dir(parts[:-1])
        leaf = parts[-1]
        name = "/".join(parts)
        try:
            self._clear_slot(pfd, leaf)
            if entry.kind == SYMLINK:
                self._stage_symlink(pfd, leaf, entry)
                self.batch_files.append(name)
                return 0
            if entry.kind in _SPECIALS:
                if not self._stage_special(pfd, leaf, entry):
                    return 0
                self.batch_files.append(name)
                return 0
            if entry.kind != FILE:
                self.lost[f"{entry.kind} entries"] = self.lost.get(f"{entry.kind} entries", 0) + 1
                return 0
            used = self._stage_file(pfd, leaf, entry, item.content)
            self.batch_files.append(name)
            self.batch_bytes += used
            return used
        finally:
            os.close(pfd)

    def _stage_dir(self, parts: list[str], entry: Entry) -> None:
        fd = self._open_dir(parts)
        try:
            self.dirs["/".join(parts)] = entry
            self._apply_meta(fd, entry, is_dir=True)
        finally:
            os.close(fd)

    def _stage_symlink(self, pfd: int, leaf: str, entry: Entry) -> None:
        os.symlink(entry.link_target or "", leaf, dir_fd=pfd)
        if self.is_root:       # a symlink cannot carry the %stat xattr; only root can fake its owner
            os.chown(leaf, entry.uid, entry.gid, dir_fd=pfd, follow_symlinks=False)
        elif (entry.uid, entry.gid) != (os.geteuid(), os.getegid()):
            self._lose("symlink owners")
        mtime = entry.mtime_ns
        os.utime(leaf, ns=(entry.atime_ns or mtime, mtime), dir_fd=pfd, follow_symlinks=False)

    def _stage_special(self, pfd: int, leaf: str, entry: Entry) -> bool:
        if entry.kind in (CHAR, BLOCK) and not self.devices:
            self._lose("device nodes (add --devices to send them)")
            return False
        if entry.kind in (FIFO, SOCKET) and not self.fifos:
            self._lose(f"{entry.kind} entries")
            return False
        if self.fake_super:     # an empty file whose %stat says what it really is
            fd = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=pfd)
        else:
            kind_bits = entry.st_mode & ~0o7777
            if entry.kind in (CHAR, BLOCK) and not self.is_root:
                self._lose("device nodes (not root, no xattrs for --fake-super)")
                return False
            major, minor = entry.rdev or (0, 0)
            os.mknod(leaf, kind_bits | 0o600, os.makedev(major, minor), dir_fd=pfd)
            if entry.kind in (CHAR, BLOCK, SOCKET):   # never open a device node or socket
                if self.is_root:
                    os.chown(leaf, entry.uid, entry.gid, dir_fd=pfd, follow_symlinks=False)
                os.chmod(leaf, entry.mode & 0o7777, dir_fd=pfd)
                os.utime(leaf, ns=(entry.atime_ns or entry.mtime_ns, entry.mtime_ns), dir_fd=pfd)
                return True
            fd = os.open(leaf, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW, dir_fd=pfd)
        try:
            self._apply_meta(fd, entry)
        finally:
            os.close(fd)
        return True

    def _stage_file(self, pfd: int, leaf: str, entry: Entry, content: Content | None) -> int:
        fd = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=pfd)
        try:
            used = copy_to_fd(content, fd, entry.path, zero_chunks_as_holes=True) if content is not None else 0
            self._apply_meta(fd, entry)
        except BaseException:
            os.close(fd)
            os.unlink(leaf, dir_fd=pfd)      # no partial file ever reaches the target
            raise
        os.close(fd)
        return used

    def _apply_meta(self, fd: int, entry: Entry, is_dir: bool = False) -> None:
        xattrs = entry.xattrs or {}
        st_mode = entry.st_mode
        if st_mode & 0o6000 and not is_dir and not self.keep_setuid:
            st_mode &= ~0o6000
            self._lose("setuid/setgid bits (dropped as asked)")
        if self.fake_super:
            major, minor = entry.rdev or (0, 0)
            value = f"{st_mode:o} {major},{minor} {entry.uid}:{entry.gid}".encode()
            self._setxattr(fd, STAT_XATTR, value)
            if self.xattrs:
                for key, val in xattrs.items():
                    if key.startswith("user.rsync."):
                        self._lose("xattrs named user.rsync.* (reserved by --fake-super)")
                    elif key.startswith("system."):
                        self._lose("system.* xattrs (POSIX ACLs)")
                    elif key.startswith("user."):
                        self._setxattr(fd, key, val)
                    else:
                        self._setxattr(fd, "user.rsync." + key, val)
        else:
            if self.is_root:
                os.fchown(fd, entry.uid, entry.gid)
                os.fchmod(fd, st_mode & 0o7777)
            else:
                if (entry.uid, entry.gid) != (os.geteuid(), os.getegid()):
                    self._lose("owners (not root, no xattrs for --fake-super)")
                os.fchmod(fd, (st_mode & 0o777) | (0o700 if is_dir else 0o600))
            if self.xattrs:
                for key, val in xattrs.items():
                    if key.startswith("user.") or (self.is_root and not key.startswith("system.")):
                        self._setxattr(fd, key, val)
                    else:
                        self._lose(f"{key.split('.')[0]}.* xattrs")
        if not is_dir:
            os.utime(fd, ns=(entry.atime_ns or entry.mtime_ns, entry.mtime_ns))

    def _setxattr(self, fd: int, key: str, val: bytes) -> None:
        try:
            os.setxattr(fd, key, val)
        except OSError as e:
            if e.errno in (errno.ENOTSUP, errno.E2BIG, errno.ERANGE, errno.ENOSPC, errno.EPERM, errno.EINVAL):
                self._lose(f"xattrs the scratch filesystem refused ({e.strerror})")
            else:
                raise

    def _lose(self, what: str) -> None:
        self.lost[what] = self.lost.get(what, 0) + 1

    # -- hard links ----------------------------------------------------------

    def exists(self, name: str) -> bool:
        parts = split_name(name)
        try:
            pfd = self._open_dir(parts[:-1], create=False)
        except (OSError, ValueError):
            return False
        try:
            os.stat(parts[-1], dir_fd=pfd, follow_symlinks=False)
            return True
        except OSError:
            return False
        finally:
            os.close(pfd)

    def link(self, existing: str, name: str) -> None:
        """Stage `name` as a hard link to the staged `existing`."""
        src, dst = split_name(existing), split_name(name)
        sfd = self._open_dir(src[:-1], create=False)
        try:
            dfd = self._open_dir(dst[:-1])
            try:
                self._clear_slot(dfd, dst[-1])
                os.link(src[-1], dst[-1], src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)
        self.batch_files.append("/".join(dst))

    def placeholder(self, name: str, entry: Entry) -> None:
        """A sparse stand-in for a file sent in an earlier batch: same size,
        mtime, owner and xattrs, so rsync's quick check finds the receiver's
        copy up to date and only uses it to hard-link the new names."""
        parts = split_name(name)
        pfd = self._open_dir(parts[:-1])
        try:
            self._clear_slot(pfd, parts[-1])
            fd = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=pfd)
            try:
                os.ftruncate(fd, entry.size)
                self._apply_meta(fd, entry)
            finally:
                os.close(fd)
        finally:
            os.close(pfd)
        self.batch_files.append("/".join(parts))

    # -- batches -------------------------------------------------------------

    def fix_dirs(self) -> None:
        """Staging children changed the directories' mtimes: set them back,
        deepest first, just before the tool reads the tree."""
        for name in sorted(self.dirs, key=lambda n: n.count("/"), reverse=True):
            entry = self.dirs[name]
            if entry is None:
                continue
            fd = self._open_dir(split_name(name), create=False)
            try:
                os.utime(fd, ns=(entry.atime_ns or entry.mtime_ns, entry.mtime_ns))
            finally:
                os.close(fd)

    def clear_batch(self) -> None:
        """Remove the batch's files (directories stay as the skeleton)."""
        for name in self.batch_files:
            parts = split_name(name)
            try:
                pfd = self._open_dir(parts[:-1], create=False)
            except OSError:
                continue
            try:
                os.unlink(parts[-1], dir_fd=pfd)
            except FileNotFoundError:
                pass
            finally:
                os.close(pfd)
        self.batch_files = []
        self.batch_bytes = 0

    def cleanup(self) -> None:
        try:
            os.close(self.root_fd)
        except OSError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)

    def lost_warnings(self, target: str) -> list[str]:
        return [f"{target}: {n} {what} not kept" for what, n in sorted(self.lost.items())]
