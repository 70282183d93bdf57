"""The one writer of local trees: the directory target and the rsync/rclone
staging both put items on disk through `LocalTree`, under one `MetadataPolicy`.

Names from the image are untrusted. A path is given as checked components
and walked from the tree's root one directory at a time with
os.open(part, O_DIRECTORY | O_NOFOLLOW, dir_fd=parent): a symlink or file
planted where a directory should be stops the walk (no check-then-use race),
and every entry is created relative to its parent's descriptor, never by a
path that could be redirected. Links are created as links and never followed.

Platforms without dir_fd or O_NOFOLLOW (Windows): the same walk by path, each
parent checked with lstat before use (`FD_WALK` False). Nothing else but our
own process writes below a fresh target, so the window between check and use
is only there if someone else writes into the target at the same time.

The policy says what metadata may be kept and how: real owners (root),
rsync --fake-super records (owner, full mode and device numbers in the
`user.rsync.%stat` xattr, "%o %u,%u %u:%u" as rsync's xattrs.c writes it,
other namespaces as user.rsync.NS.x), setuid bits, xattrs, devices, fifos.
What cannot be kept is reported to the sink through `lose(key, detail)`; each
sink words (or ignores) it for its own target.
"""

from __future__ import annotations

import errno
import os
import stat as stat_mod
from dataclasses import dataclass, replace
from typing import Callable, Iterable

from ..fs.base import BLOCK, CHAR, FIFO, Entry, FileReadError
from .base import Content
from .copy import copy_to_fd

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
STAT_XATTR = "user.rsync.%stat"
# Descriptor-relative walk where the platform has it (POSIX); else lstat-checked paths.
FD_WALK = (hasattr(os, "O_NOFOLLOW") and hasattr(os, "O_DIRECTORY") and os.open in os.supports_dir_fd
           and os.mkdir in os.supports_dir_fd and os.unlink in os.supports_dir_fd)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
DEFAULT_ACL = "system.posix_acl_default"   # inherited by what is created below
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | getattr(os, "O_BINARY", 0)
# xattr errors that mean "this filesystem will not keep it", not a broken target
XATTR_REFUSED = (errno.ENOTSUP, errno.E2BIG, errno.ERANGE, errno.ENOSPC, errno.EPERM, errno.EINVAL)


class WriteFailed(OSError):
    """Writing a file's data failed on the target (full, quota, I/O error)."""


class NotADirectory(ValueError):
    """A symlink or non-directory stands where the path needs a directory."""

    def __init__(self, path: str) -> None:
        super().__init__(f"{path} is not a directory")
        self.path = path


@dataclass
class MetadataPolicy:
    """What of an entry's metadata a local tree keeps."""

    owners: bool = IS_ROOT       # chown to the image's owners (needs root)
    fake_super: bool = False     # owner, full mode, devices in user.rsync.%stat instead
    keep_setuid: bool = False    # an image's setuid program would be one here: dropped unless asked
    xattrs: bool = True
    acls: bool = True            # system.* (POSIX ACLs) as xattrs; rsync -X does not carry them
    devices: bool = False        # device nodes: real ones need root, fake-super ones do not
    fifos: bool = True           # fifos (sockets are never written: extract names them)
    private: bool = False        # our scratch copy: always readable/writable by us (no root, no fake-super)
    is_root: bool = IS_ROOT

    def mode(self, entry: Entry) -> tuple[int, bool]:
        """The permission bits to record and whether setuid/setgid were dropped."""
        mode = entry.mode & 0o7777
        if mode & 0o6000 and not self.keep_setuid:
            return mode & ~0o6000, True
        return mode, False

    def disk_mode(self, mode: int, is_dir: bool) -> int | None:
        """The mode to give the file on disk; None: leave it (fake-super records it)."""
        if self.fake_super:
            return None
        if self.private:
            return (mode & 0o777) | (0o700 if is_dir else 0o600)
        return mode

    def xattr_name(self, key: str) -> tuple[str | None, str | None]:
        """(name to store the xattr under, None) or (None, why it is not kept)."""
        if not self.xattrs:
            return None, None
        if key.startswith("system.") and (self.fake_super or not self.acls):
            return None, "system"
        if self.fake_super:
            if key.startswith("user.rsync."):
                return None, "reserved"
            return (key if key.startswith("user.") else "user.rsync." + key), None
        return key, None


# Characters that would make one component several (or a drive) on this platform.
_SEPARATORS = tuple({"/", "\0", os.sep, os.altsep or "/"} | ({":"} if os.name == "nt" else set()))


def check_parts(parts: list[str]) -> list[str]:
    """Components that cannot climb out of the tree or name something else."""
    for p in parts:
        if p in ("", ".", "..") or any(c in p for c in _SEPARATORS):
            raise ValueError(f"unsafe name {'/'.join(parts)!r}")
    return parts


def xattrs_supported(path: str) -> bool:
    try:
        os.setxattr(path, "user.rescue.probe", b"1")
        os.removexattr(path, "user.rescue.probe")
        return True
    except (OSError, AttributeError):
        return False


class LocalTree:
    """Items written below `root`, which must exist and be a directory."""

    def __init__(self, root: str, policy: MetadataPolicy,
                 lose: Callable[[str, str], None] = lambda key, detail: None) -> None:
        self.root = root
        self.policy = policy
        self.lose = lose
        self.root_fd = os.open(root, _DIR_FLAGS) if FD_WALK else None
        self.dirs: dict[tuple[str, ...], tuple[Entry | None, int]] = {}  # made or set: entry, recorded mode
        # The tree owns the descriptors of the last two parents walked (items
        # come in walk order: the next one is most often in the same place). A
        # checked directory stays that directory (we never remove or replace
        # one), so reusing it is safe.
        self._last_key: tuple[str, ...] | None = None
        self._last_fd: int | None = None
        self._retired: int | None = None
        self._partial: tuple[list[str], str] | None = None   # a temporary name being written

    def close(self) -> None:
        for fd in (self._last_fd, self._retired):
            if fd is not None:
                os.close(fd)
        self._last_fd = self._retired = self._last_key = None
        if self.root_fd is not None:
            try:
                os.close(self.root_fd)
            except OSError:
                pass
            self.root_fd = None

    # -- walking ---------------------------------------------------------------

    def parent(self, parts: list[str], create: bool = True) -> Dir:
        """The directory `parts` (checked components), walked without following
        links; missing ones are made (0755, or 0700 then 0755) when `create`."""
        check_parts(parts)
        if not FD_WALK:
            return self._parent_by_path(parts, create)
        key = tuple(parts)
        if key != self._last_key or self._last_fd is None:
            fd = self._walk(parts, create)
            if self._retired is not None:
                os.close(self._retired)
            # the one before stays open for a caller holding two parents (link)
            self._retired, self._last_fd, self._last_key = self._last_fd, fd, key
        return Dir(self._last_fd, "")

    def _parent_of(self, parts: list[str], create: bool = True) -> Dir:
        """The checked parent of the entry `parts` (which must name something)."""
        if not parts:
            raise ValueError("unsafe name ''")
        check_parts(parts[-1:])
        return self.parent(parts[:-1], create)

    def _walk(self, parts: list[str], create: bool) -> int:
        fd = os.dup(self.root_fd)  # type: ignore[arg-type]
        try:
            for i, p in enumerate(parts):
                try:
                    nfd = os.open(p, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise NotADirectory("/".join(parts[:i + 1])) from None
                    if e.errno != errno.ENOENT or not create:
                        raise
                    self._mkdir_implied(Dir(fd, ""), p, tuple(parts[:i + 1]))
                    nfd = os.open(p, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _parent_by_path(self, parts: list[str], create: bool) -> Dir:
        path = self.root
        for i, p in enumerate(parts):
            path = os.path.join(path, p)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                if not create:
                    raise
                self._mkdir_implied(Dir(None, os.path.dirname(path)), p, tuple(parts[:i + 1]))
                continue
            if not stat_mod.S_ISDIR(st.st_mode):
                raise NotADirectory("/".join(parts[:i + 1]))
        return Dir(None, path)

    def _mkdir_implied(self, at: Dir, leaf: str, key: tuple[str, ...]) -> None:
        """A parent the image did not list (or not yet): the usual mode, and
        root's ownership in a fake-super record."""
        try:
            os.mkdir(at.name(leaf), 0o700 if self.policy.fake_super else 0o755, dir_fd=at.fd)
        except FileExistsError:
            return
        if self.policy.fake_super:
            os.chmod(at.name(leaf), 0o755, dir_fd=at.fd)
            self._set_stat_record(at, leaf, b"40755 0,0 0:0")
        self.dirs.setdefault(key, (None, 0o755))

    def _set_stat_record(self, at: Dir, leaf: str, value: bytes) -> None:
        fd = os.open(at.name(leaf), _DIR_FLAGS, dir_fd=at.fd)
        try:
            self.setxattr(fd, STAT_XATTR, value)
        finally:
            os.close(fd)

    def clear(self, at: Dir, leaf: str) -> None:
        """Make room for a non-directory `leaf`: an earlier non-directory (an
        earlier run's, or a name given twice) is replaced, a directory is
        refused (IsADirectoryError)."""
        try:
            st = os.stat(at.name(leaf), dir_fd=at.fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat_mod.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "exists as a directory", leaf)
        os.unlink(at.name(leaf), dir_fd=at.fd)

    # -- entries -----------------------------------------------------------------

    def mkdir(self, parts: list[str], entry: Entry) -> None:
        """A directory (an existing one is kept, a non-directory replaced) with
        its owner and xattrs now; its mode and times wait for finish_dirs()
        (children change its mtime, and a read-only one takes no more children
        when we are not root)."""
        at = self._parent_of(parts)
        leaf = parts[-1]
        try:
            st = os.stat(at.name(leaf), dir_fd=at.fd, follow_symlinks=False)
            if not stat_mod.S_ISDIR(st.st_mode):
                os.unlink(at.name(leaf), dir_fd=at.fd)
                raise FileNotFoundError
            if st.st_mode & 0o700 != 0o700:   # an earlier run left it read-only: ours to fill again
                os.chmod(at.name(leaf), stat_mod.S_IMODE(st.st_mode) | 0o700, dir_fd=at.fd)
        except FileNotFoundError:
            os.mkdir(at.name(leaf), 0o755, dir_fd=at.fd)   # the usual mode until finish_dirs()
        fd = os.open(at.name(leaf), _DIR_FLAGS, dir_fd=at.fd) if FD_WALK else None
        try:
            # A default ACL waits for finish_dirs(): set now, every file written
            # below would inherit entries it does not have in the image.
            now = entry
            if entry.xattrs and DEFAULT_ACL in entry.xattrs:
                now = replace(entry, xattrs={k: v for k, v in entry.xattrs.items() if k != DEFAULT_ACL})
            mode = self._meta(fd if fd is not None else at.path_of(leaf), now, is_dir=True)
        finally:
            if fd is not None:
                os.close(fd)
        self.dirs[tuple(parts)] = (entry, mode)

    def write_file(self, parts: list[str], entry: Entry, content: Content | None, *,
                   temp_names: Iterable[tuple[str, bool]] | None = None, zero_chunks_as_holes: bool = False) -> int:
        """A regular file with its data and metadata; returns the data bytes.
        With `temp_names` ((name, an existing one is stale), tried in order) it
        is written under a temporary name and renamed over the real name once
        complete: an interruption never leaves a cut-off file under the real
        name. Without, it is written in place and removed if the write fails."""
        at = self._parent_of(parts)
        leaf = parts[-1]
        self.clear(at, leaf)
        name, fd = self._open_new(at, [(leaf, False)] if temp_names is None else temp_names,
                                  None if temp_names is None else parts[:-1])
        try:
            try:
                try:
                    used = copy_to_fd(content, fd, entry.path, zero_chunks_as_holes=zero_chunks_as_holes) \
                        if content is not None and content.size else 0
                except FileReadError:
                    raise
                except OSError as exc:   # the target refused the data, not a name
                    raise WriteFailed(exc.errno, exc.strerror) from None
                self._meta(fd if FD_WALK else at.path_of(name), entry)
            finally:
                os.close(fd)
            if name != leaf:
                os.replace(at.name(name), at.name(leaf), src_dir_fd=at.fd, dst_dir_fd=at.fd)
                self._partial = None
        except BaseException:
            try:
                os.unlink(at.name(name), dir_fd=at.fd)
                self._partial = None
            except OSError:
                pass
            raise
        return used

    def _open_new(self, at: Dir, names: Iterable[tuple[str, bool]], parts: list[str] | None = None) -> tuple[str, int]:
        name = ""
        for name, stale in names:
            for _ in range(2):
                # Named before it exists: a signal raised as open() returns still
                # finds it for discard_partial().
                self._partial = None if parts is None else (parts, name)
                try:
                    return name, os.open(at.name(name), _NEW_FILE, 0o600, dir_fd=at.fd)
                except FileExistsError:
                    self._partial = None
                    if not stale:
                        break
                    self.clear(at, name)   # left by an interrupted run: replaced
                    stale = False
        raise FileExistsError(errno.EEXIST, "cannot create a new file", name)

    def discard_partial(self) -> None:
        """Remove a temporary file an interruption left (see write_file)."""
        if self._partial is not None:
            parts, name = self._partial
            self._partial = None
            self.unlink(parts + [name])

    def placeholder(self, parts: list[str], entry: Entry) -> None:
        """A sparse stand-in of the entry's size with its metadata."""
        at = self._parent_of(parts)
        self.clear(at, parts[-1])
        _, fd = self._open_new(at, [(parts[-1], False)])
        try:
            os.ftruncate(fd, entry.size)
            self._meta(fd if FD_WALK else at.path_of(parts[-1]), entry)
        finally:
            os.close(fd)

    def symlink(self, parts: list[str], entry: Entry) -> None:
        at = self._parent_of(parts)
        leaf = parts[-1]
        self.clear(at, leaf)
        os.symlink(entry.link_target or "", at.name(leaf), dir_fd=at.fd)
        p = self.policy
        if p.owners or (p.fake_super and p.is_root):   # a symlink carries no %stat: only root fakes it
            try:
                os.chown(at.name(leaf), entry.uid, entry.gid, dir_fd=at.fd, follow_symlinks=False)
            except OSError as exc:
                self.lose("owners", exc.strerror or str(exc))
        elif hasattr(os, "geteuid") and (entry.uid, entry.gid) != (os.geteuid(), os.getegid()):
            self.lose("symlink-owners", "")
        if entry.xattrs and not p.fake_super:
            self._xattrs(at.path_of(leaf) if at.fd is None else f"/proc/self/fd/{at.fd}/{leaf}", entry,
                         follow=False)
        times = _times(entry)
        if os.utime in os.supports_follow_symlinks:
            try:
                os.utime(at.name(leaf), ns=times, dir_fd=at.fd, follow_symlinks=False)
            except OSError as exc:
                self.lose("utime", exc.strerror or str(exc))

    def special(self, parts: list[str], entry: Entry) -> bool:
        """A device node or fifo as the policy allows; False (and a loss
        reported) when it does not. (Sockets never get here: extract names them.)"""
        p = self.policy
        if entry.kind in (CHAR, BLOCK) and not p.devices:
            self.lose("devices", "")
            return False
        if entry.kind == FIFO and not p.fifos:
            self.lose("fifos", entry.kind)
            return False
        if entry.kind in (CHAR, BLOCK) and not p.fake_super and not p.is_root:
            self.lose("devices-need-root", "")
            return False
        at = self._parent_of(parts)
        leaf = parts[-1]
        self.clear(at, leaf)
        if p.fake_super:     # an empty file whose %stat says what it really is
            fd = os.open(at.name(leaf), _NEW_FILE, 0o600, dir_fd=at.fd)
        else:
            if entry.kind == FIFO:
                os.mkfifo(at.name(leaf), 0o600, dir_fd=at.fd)
            else:
                major, minor = entry.rdev or (0, 0)
                os.mknod(at.name(leaf), (entry.st_mode & ~0o7777) | 0o600, os.makedev(major, minor),
                         dir_fd=at.fd)
            if entry.kind != FIFO or not FD_WALK:   # never open a device node
                self._meta(at.path_of(leaf) if at.fd is None else (at.fd, leaf), entry)
                return True
            fd = os.open(at.name(leaf), os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW, dir_fd=at.fd)
        try:
            self._meta(fd, entry)
        finally:
            os.close(fd)
        return True

    def link(self, existing: list[str], parts: list[str]) -> None:
        """`parts` as a hard link to the entry `existing` of this tree."""
        src = self._parent_of(existing, create=False)
        dst = self._parent_of(parts)
        self.clear(dst, parts[-1])
        if FD_WALK:
            os.link(existing[-1], parts[-1], src_dir_fd=src.fd, dst_dir_fd=dst.fd, follow_symlinks=False)
        else:
            os.link(src.path_of(existing[-1]), dst.path_of(parts[-1]))

    def exists(self, parts: list[str]) -> bool:
        try:
            at = self._parent_of(parts, create=False)
        except (OSError, ValueError):
            return False
        try:
            os.stat(at.name(parts[-1]), dir_fd=at.fd, follow_symlinks=False)
            return True
        except OSError:
            return False

    def unlink(self, parts: list[str]) -> None:
        try:
            at = self._parent_of(parts, create=False)
        except OSError:
            return
        try:
            os.unlink(at.name(parts[-1]), dir_fd=at.fd)
        except (FileNotFoundError, IsADirectoryError, PermissionError):   # gone, or a directory since
            pass

    def finish_dirs(self, modes: bool) -> None:
        """Directories' times (and with `modes`, their recorded modes), deepest
        first: a parent without search permission is closed after its children."""
        for key in sorted(self.dirs, key=len, reverse=True):
            entry, mode = self.dirs[key]
            if entry is None:
                continue
            try:
                at = self.parent(list(key[:-1]), create=False)
            except (OSError, ValueError):
                continue
            name = at.name(key[-1])
            if entry.xattrs and DEFAULT_ACL in entry.xattrs:
                self._default_acl(at, key[-1], entry)
            disk = self.policy.disk_mode(mode, True)
            if modes and disk is not None:
                try:
                    os.chmod(name, disk, dir_fd=at.fd)
                except OSError as exc:
                    self.lose("chmod", exc.strerror or str(exc))
            try:
                os.utime(name, ns=_times(entry), dir_fd=at.fd)
            except OSError:
                pass

    def _default_acl(self, at, leaf: str, entry: Entry) -> None:
        only = replace(entry, xattrs={DEFAULT_ACL: entry.xattrs[DEFAULT_ACL]})  # type: ignore[index]
        if at.fd is None:
            self._xattrs(at.path_of(leaf), only)
            return
        try:
            fd = os.open(at.name(leaf), _DIR_FLAGS, dir_fd=at.fd)
        except OSError:
            return   # gone or no longer searchable: nothing to set it on
        try:
            self._xattrs(fd, only)
        finally:
            os.close(fd)

    # -- metadata ----------------------------------------------------------------

    def _meta(self, target: int | str | tuple[int, str], entry: Entry, is_dir: bool = False) -> int:
        """Owner, mode, xattrs and times of a file just made (a directory's mode
        and times wait for finish_dirs()); `target` is an open descriptor, a
        checked path, or (parent fd, leaf) of something never to be opened.
        Returns the mode recorded."""
        p = self.policy
        at: dict = {}
        if isinstance(target, tuple):
            at = {"dir_fd": target[0]}
            target = target[1]
        mode, dropped = p.mode(entry)
        if dropped:
            self.lose("setuid", "")
        if p.fake_super:
            major, minor = entry.rdev or (0, 0)
            kind_bits = stat_mod.S_IFMT(entry.st_mode)
            self.setxattr(target, STAT_XATTR, f"{kind_bits | mode:o} {major},{minor} {entry.uid}:{entry.gid}".encode(),
                          **at)
        elif p.owners and hasattr(os, "chown"):
            try:
                os.chown(target, entry.uid, entry.gid, **at)
            except OSError as exc:
                self.lose("owners", exc.strerror or str(exc))
        elif hasattr(os, "geteuid") and (entry.uid, entry.gid) != (os.geteuid(), os.getegid()):
            self.lose("owners-unset", "")
        disk = p.disk_mode(mode, is_dir)
        if disk is not None and not is_dir:
            try:
                os.chmod(target, disk, **at)
            except OSError as exc:
                self.lose("chmod", exc.strerror or str(exc))
        if is_dir and disk is not None and p.private:
            os.chmod(target, disk, **at)   # stays ours to fill; the recorded mode is in the tool's hands
        if entry.xattrs:
            self._xattrs(f"/proc/self/fd/{at['dir_fd']}/{target}" if at else target, entry, follow=not at)
        if not is_dir:
            try:
                os.utime(target, ns=_times(entry), **at)
            except OSError as exc:
                self.lose("utime", exc.strerror or str(exc))
        return mode

    def _xattrs(self, target: int | str, entry: Entry, follow: bool = True) -> None:
        if not hasattr(os, "setxattr"):
            if entry.xattrs and self.policy.xattrs:
                self.lose("xattr-unsupported", "this system has no extended attributes")
            return
        for key, value in (entry.xattrs or {}).items():
            name, why = self.policy.xattr_name(key)
            if name is None:
                if why:
                    self.lose("xattr-" + why, key.split(".", 1)[0])
                continue
            self.setxattr(target, name, value, follow_symlinks=follow, namespace=key.split(".", 1)[0])

    def setxattr(self, target: int | str, key: str, value: bytes, *, follow_symlinks: bool = True,
                 namespace: str = "", dir_fd: int | None = None) -> None:
        if dir_fd is not None:   # a node never opened: by its /proc path (Linux) or not at all
            target = f"/proc/self/fd/{dir_fd}/{target}"
            follow_symlinks = False
        try:
            os.setxattr(target, key, value, follow_symlinks=follow_symlinks)
        except OSError as exc:
            if exc.errno in XATTR_REFUSED or exc.errno == errno.ENOENT:
                self.lose("xattr-refused", f"{namespace or key.split('.', 1)[0]}\t{exc.strerror}")
            else:
                raise


class Dir:
    """A checked directory of the tree: its descriptor (FD_WALK; the tree
    owns it) or its path."""

    __slots__ = ("fd", "path")

    def __init__(self, fd: int | None, path: str) -> None:
        self.fd, self.path = fd, path

    def name(self, leaf: str) -> str:
        """What to hand os.* with dir_fd=self.fd."""
        return leaf if self.fd is not None else os.path.join(self.path, leaf)

    def path_of(self, leaf: str) -> str:
        return os.path.join(self.path, leaf) if self.fd is None else leaf



def _times(entry: Entry) -> tuple[int, int]:
    return (entry.atime_ns if entry.atime_ns is not None else entry.mtime_ns, entry.mtime_ns)
