"""The libguestfs backend: XFS, btrfs and anything else the Linux kernel reads.

The Sleuth Kit reads neither XFS nor btrfs. libguestfs boots a tiny Linux
appliance under qemu, attaches our volume read-only, mounts it read-only inside
the appliance and answers lstat/readdir/read calls over a channel, so files come
out with the same entries as from the TSK backend: owners, modes, ns times,
links, xattrs. Linux only (it needs qemu and a kernel); on macOS/Windows use the
Vagrant VM (see README).

How the volume gets to the appliance: each drive is a throwaway qcow2 overlay
of ours on top of the volume, so even a journal replay never touches the
snapshot. A plain local file is the overlay's backing file (qemu opens it
read-only); any other byte source (a partition of a qcow2 inside a tar.gz, an
LVM logical volume) is served read-only over NBD on a unix socket by
`nbd_export.NbdExport`. Once qemu has the overlays open they are deleted, so no
signal (not even SIGKILL) can leave them behind.

The launch is bounded: when qemu with KVM has not booted the appliance after
`launch_timeout` seconds (seen: SeaBIOS "Booting from ROM..." and then nothing,
for ever), it is killed and the launch retried under qemu's emulator (TCG,
force_tcg); when that fails too, one FilesystemError says both reasons.

References: guestfs(3) and guestfs-python(3) (add_drive_opts, lstatnslist,
readlinklist, lxattrlist, pread: a reply is limited to 4 MiB), guestfs(3)
"BACKEND SETTINGS" (force_tcg).
"""

from __future__ import annotations

import glob
import importlib
import logging
import os
import posixpath
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Iterator, Sequence

from ..errors import FilesystemError, GuestPathError
from ..source.base import ByteSource, FileSource, Window
from .base import (BLOCK, CHAR, DIR, FIFO, FILE, SOCKET, SYMLINK, Entry, FileReadError, FileSystem,
                   FsInfo, normalize)

log = logging.getLogger(__name__)

# Where distributions put the bindings for the system python3.
SYSTEM_DIRS = (
    "/usr/lib/python3/dist-packages",                                  # Debian, Ubuntu
    f"/usr/lib64/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages",  # Fedora, RHEL
    f"/usr/lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages",    # Arch, SUSE
)
INSTALL_HINT = ("install libguestfs (Debian/Ubuntu: apt install libguestfs-tools python3-guestfs; "
                "Fedora: dnf install guestfs-tools python3-libguestfs) and run rescue from a venv made "
                "with `python3 -m venv --system-site-packages`; on macOS or Windows use the Vagrant VM "
                "(vagrant up; see README)")

_S_IFMT = 0o170000
_KINDS = {0o100000: FILE, 0o040000: DIR, 0o120000: SYMLINK, 0o010000: FIFO, 0o020000: CHAR,
          0o060000: BLOCK, 0o140000: SOCKET}
PREAD_MAX = 2 << 20          # under the 4 MiB protocol message limit
BATCH = 1000                 # names per lstatnslist/readlinklist/lxattrlist call
# Seconds a launch may take: KVM boots the appliance in 2-5 s (more on a busy
# machine); qemu's emulator takes 15-60 s. RESCUE_GUESTFS_TIMEOUT="KVM[,TCG]" overrides.
KVM_LAUNCH_TIMEOUT = 60.0
TCG_LAUNCH_TIMEOUT = 600.0
STATUS_EVERY = 10.0          # a "still starting" line this often while the appliance boots
# Signals that end a launch (their Python handlers raise: KeyboardInterrupt, errors.Interrupted).
ENDING_SIGNALS = {int(getattr(signal, n)) for n in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT") if hasattr(signal, n)}

_guestfs_module: Any = None
_import_problem: str | None = None


def import_guestfs():
    """The `guestfs` module, or raise FilesystemError saying why not.

    A venv does not see the system's dist-packages; the bindings are compiled
    for the system python3, so they load only into the same Python minor version
    (the file name says which: libguestfsmod.cpython-311-...so)."""
    global _guestfs_module, _import_problem
    if _guestfs_module is not None:
        return _guestfs_module
    if _import_problem is None:
        try:
            _guestfs_module = importlib.import_module("guestfs")
            return _guestfs_module
        except ImportError:
            pass
        for directory in SYSTEM_DIRS:
            if not os.path.exists(os.path.join(directory, "guestfs.py")):
                continue
            sys.path.append(directory)   # for this import only
            try:
                _guestfs_module = importlib.import_module("guestfs")
                return _guestfs_module
            except ImportError as exc:
                built = sorted(os.path.basename(p) for p in
                               glob.glob(os.path.join(directory, "libguestfsmod*.so")))
                _import_problem = (f"the libguestfs Python bindings in {directory} ({', '.join(built)}) "
                                   f"do not load into Python {sys.version_info[0]}."
                                   f"{sys.version_info[1]} ({exc}); run rescue with the system "
                                   "python3 (python3 -m venv --system-site-packages)")
            finally:
                try:
                    sys.path.remove(directory)
                except ValueError:
                    pass
            break
        else:
            _import_problem = "the libguestfs Python bindings are not installed"
    raise FilesystemError(_import_problem, hint=INSTALL_HINT, layer="fs")


def guestfs_unavailable() -> str | None:
    """None when the bindings import, else the reason (for skips and the CLI's choice)."""
    try:
        import_guestfs()
    except FilesystemError as exc:
        return exc.problem
    return None


def _kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def _launch_timeouts() -> tuple[float, float]:
    """(KVM, TCG) launch timeouts, from RESCUE_GUESTFS_TIMEOUT when set."""
    kvm, tcg = KVM_LAUNCH_TIMEOUT, TCG_LAUNCH_TIMEOUT
    raw = os.environ.get("RESCUE_GUESTFS_TIMEOUT", "").strip()
    if raw:
        try:
            parts = [float(p) for p in raw.split(",")]
            kvm = parts[0]
            tcg = parts[1] if len(parts) > 1 else tcg
        except ValueError:
            log.warning("RESCUE_GUESTFS_TIMEOUT=%r is not 'SECONDS[,SECONDS]'; using %g,%g", raw, kvm, tcg)
    return kvm, tcg


class LaunchTimeout(Exception):
    """The appliance did not finish booting in time."""


class GuestfsAppliance:
    """One libguestfs appliance with one or more volumes attached, launched once
    (the launch costs seconds: ~2 s with KVM, ~15-60 s under TCG). Several
    `GuestfsFileSystem`s (the root and a separate /var, say) share one appliance.

    When KVM is missing, qemu fails with it, or the launch does not complete in
    `launch_timeout` seconds, and the user has not chosen
    LIBGUESTFS_BACKEND_SETTINGS, the launch is retried with force_tcg (qemu's
    emulator: slower, works everywhere), bounded by `tcg_timeout`. `status`
    receives what is going on (for the progress display); `launch_seconds` and
    `accelerator` say what happened."""

    _tcg_needed: bool | None = None       # learned once per process

    def __init__(self, sources: Sequence[ByteSource | str | os.PathLike], *,
                 launch_timeout: float | None = None, tcg_timeout: float | None = None,
                 status: Callable[[str], None] | None = None) -> None:
        self.guestfs = import_guestfs()
        if not sources:
            raise ValueError("no sources")
        self.sources = list(sources)
        default_kvm, default_tcg = _launch_timeouts()
        self.launch_timeout = default_kvm if launch_timeout is None else launch_timeout
        self.tcg_timeout = default_tcg if tcg_timeout is None else tcg_timeout
        self.status = status
        self._exports: list[Any] = []
        self._tmpdir: str | None = None
        self.g = None
        self.launch_seconds = 0.0
        self.accelerator = "?"
        self._mount_slots: dict[str, str] = {}
        self._next_slot = 0
        self.drives: list[tuple[str, dict]] = []
        try:
            for source in self.sources:
                self.drives.append(self._drive(source))
            self._launch()
        except BaseException:
            self.close()
            raise

    def _say(self, text: str) -> None:
        log.info("%s", text)
        if self.status is not None:
            self.status(text)

    def _drive(self, source: ByteSource | str | os.PathLike) -> tuple[str, dict]:
        """(filename, add_drive_opts kwargs) for one source: a qcow2 overlay of
        ours (deleted once qemu has it open) on the file or on our NBD export."""
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
        elif isinstance(source, FileSource):
            path = source.path
        else:
            path = None
        if self._tmpdir is None:
            self._tmpdir = tempfile.mkdtemp(prefix="rescue-guestfs-")
        overlay = os.path.join(self._tmpdir, f"overlay{len(self.drives)}.qcow2")
        if path is not None:
            backing = os.path.abspath(path)
            size = source.size if isinstance(source, FileSource) else os.path.getsize(path)
        else:
            from .nbd_export import NbdExport

            export = NbdExport(source)
            self._exports.append(export)
            backing, size = f"nbd+unix:///?socket={export.socket_path}", export.export_size
        # -u: without opening the backing file (the bindings keep the GIL while
        # add_drive runs qemu-img, so our NBD server thread could never answer).
        # Writes land in the overlay; the export refuses them anyway.
        res = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "raw",
                              overlay, str(size)], capture_output=True, text=True)
        if res.returncode != 0:
            raise FilesystemError(f"qemu-img cannot make an overlay for {getattr(source, 'name', path)}: "
                                  f"{res.stderr.strip()}", layer="fs")
        return overlay, dict(readonly=0, format="qcow2")

    def _new_handle(self, force_tcg: bool):
        g = self.guestfs.GuestFS(python_return_dict=True)   # closed at exit: no stray qemu
        if "LIBGUESTFS_BACKEND" not in os.environ:
            g.set_backend("direct")   # no libvirt daemon needed
        if force_tcg:
            g.set_backend_settings(["force_tcg"])
        for filename, opts in self.drives:
            g.add_drive_opts(filename, **opts)
        return g

    def _try_launch(self, tcg: bool, timeout: float, what: str) -> None:
        """Launch a new handle and wait at most `timeout` s, saying every
        STATUS_EVERY s that it is still going. The launch runs in this thread
        (libguestfs prints its errors itself for calls from other threads); a
        watchdog thread kills our qemu when the time is up (LaunchTimeout) or
        a signal arrives (the bindings hold no GIL while qemu boots, but Python
        runs signal handlers only between bytecodes: the wakeup fd tells the
        watchdog at once). A failing launch raises RuntimeError."""
        import select

        self.g = self._new_handle(tcg)
        done = threading.Event()
        timed_out: list[float] = []
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        try:
            previous = signal.set_wakeup_fd(wake_w)
        except ValueError:   # not the main thread: signals are not ours to watch
            previous = None
        start = time.monotonic()

        def watch() -> None:
            next_note = start + STATUS_EVERY
            stopping = False
            while not done.is_set():
                ready, _, _ = select.select([wake_r], [], [], 0.25)
                if ready and set(os.read(wake_r, 512)) & ENDING_SIGNALS:
                    stopping = True   # stop qemu so the launch returns and the handler runs
                now = time.monotonic()
                if not stopping and now - start > timeout:
                    timed_out.append(now - start)
                    stopping = True
                if stopping:   # again until the launch returns (supermin may still be building)
                    _kill_qemu()
                    continue
                if now >= next_note and not done.is_set():
                    self._say(f"still starting the libguestfs appliance ({what}, {now - start:.0f} s)")
                    next_note = now + STATUS_EVERY

        watchdog = threading.Thread(target=watch, name="guestfs-launch-watchdog", daemon=True)
        watchdog.start()
        try:
            self.g.launch()
        except RuntimeError:
            if timed_out:
                raise LaunchTimeout(f"not started after {timeout:.0f} s") from None
            raise
        finally:
            done.set()
            watchdog.join()
            if previous is not None:
                signal.set_wakeup_fd(previous)
            os.close(wake_r)
            os.close(wake_w)

    def _launch(self) -> None:
        user_choice = "LIBGUESTFS_BACKEND_SETTINGS" in os.environ
        cls = GuestfsAppliance
        tcg = False if user_choice else (cls._tcg_needed if cls._tcg_needed is not None
                                         else not _kvm_usable())
        start = time.monotonic()
        mode = (os.environ["LIBGUESTFS_BACKEND_SETTINGS"] if user_choice
                else "qemu's emulator (TCG), 15-60 s" if tcg else "KVM")
        self._say(f"starting the libguestfs appliance for {len(self.sources)} volume(s) ({mode})")
        try:
            self._try_launch(tcg, self.tcg_timeout if tcg or user_choice else self.launch_timeout,
                             "TCG" if tcg else "KVM")
        except (RuntimeError, LaunchTimeout) as exc:
            if user_choice or tcg:
                raise FilesystemError(f"the libguestfs appliance did not start ({mode}): {_first_line(exc)}",
                                      hint="run libguestfs-test-tool to see why", layer="fs") from None
            self._say(f"the libguestfs appliance did not start with KVM ({_first_line(exc)}); retrying with "
                      f"qemu's emulator (TCG: slower, up to {self.tcg_timeout:.0f} s)")
            self._close_handle()
            tcg = True
            try:
                self._try_launch(True, self.tcg_timeout, "TCG")
            except (RuntimeError, LaunchTimeout) as exc2:
                raise FilesystemError(f"the libguestfs appliance did not start, with KVM "
                                      f"({_first_line(exc)}) nor with TCG ({_first_line(exc2)})",
                                      hint="run libguestfs-test-tool to see why", layer="fs") from None
        # qemu holds the overlays open now: delete them, so nothing is left behind
        # whatever ends this process.
        self._remove_overlays()
        if not user_choice:
            cls._tcg_needed = tcg
        self.launch_seconds = time.monotonic() - start
        self.accelerator = "tcg" if tcg else ("kvm" if not user_choice else
                                              os.environ["LIBGUESTFS_BACKEND_SETTINGS"])
        self._say(f"libguestfs appliance ready after {self.launch_seconds:.0f} s ({self.accelerator})")
        self.devices: list[str] = list(self.g.list_devices())

    def _remove_overlays(self) -> None:
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def filesystems(self) -> dict[str, str]:
        """device -> filesystem type, for every filesystem libguestfs finds
        (partitions, LVs, whole devices): what `inspect` can show."""
        return dict(self.g.list_filesystems())

    def mount(self, device: str) -> str:
        """Mount `device` read-only inside the appliance; return its mount point."""
        if device in self._mount_slots:
            return self._mount_slots[device]
        if self._next_slot == 0:
            # mkmountpoint works only before anything is mounted on /: make a
            # slot for every filesystem the appliance can see.
            count = max(len(self.filesystems()), len(self.devices), 1)
            for i in range(min(count, 256)):
                self.g.mkmountpoint(f"/r{i}")
            self._slots = min(count, 256)
        if self._next_slot >= self._slots:
            raise FilesystemError(f"too many filesystems mounted in one appliance ({self._slots})")
        where = f"/r{self._next_slot}"
        try:
            self.g.mount_ro(device, where)
        except RuntimeError as exc:
            raise FilesystemError(f"libguestfs cannot mount {device}: {_first_line(exc)}",
                                  layer="fs") from None
        self._next_slot += 1
        self._mount_slots[device] = where
        return where

    users = 0    # GuestfsFileSystems that close the appliance with them (own=True)

    def release(self) -> None:
        """One owning filesystem is done; the last one closes the appliance."""
        self.users -= 1
        if self.users <= 0:
            self.close()

    def _close_handle(self) -> None:
        if self.g is not None:
            try:
                self.g.shutdown()
            except Exception:
                pass
            try:
                self.g.close()
            except Exception:
                pass
            self.g = None

    def close(self) -> None:
        self._close_handle()
        for export in self._exports:
            export.close()
        self._exports = []
        self._remove_overlays()

    def __enter__(self) -> "GuestfsAppliance":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _qemu_children() -> list[int]:
    """Process ids of the qemu (and supermin, which builds the appliance)
    processes this process started: libguestfs's direct backend forks them itself."""
    me = os.getpid()
    found = []
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return found
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            if int(fields[1]) != me:
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")[:2]
        except (OSError, IndexError, ValueError):
            continue
        if any(b"qemu" in os.path.basename(a) or os.path.basename(a) == b"supermin" for a in argv):
            found.append(pid)
    return found


def _kill_qemu() -> None:
    for pid in _qemu_children():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _decode_dev(dev: int) -> tuple[int, int]:
    """Linux's dev_t (the appliance's stat): 12+ bit major, 20+ bit minor."""
    major = ((dev >> 8) & 0xFFF) | ((dev >> 32) & ~0xFFF)
    minor = (dev & 0xFF) | ((dev >> 12) & ~0xFF)
    return major, minor & 0xFFFFFFFF


class GuestfsFileSystem(FileSystem):
    """One filesystem read through libguestfs.

    `GuestfsFileSystem(source)` attaches `source` (a volume: partition window,
    LV, bare-filesystem file) to its own appliance and mounts it. To read
    several volumes with one appliance launch, make a `GuestfsAppliance` with
    all of them and pass `appliance=` and `device=` (from `appliance.devices`,
    or a partition/LV name from `appliance.filesystems()`)."""

    backend = "guestfs"

    def __init__(self, source: ByteSource | str | os.PathLike | None = None, *,
                 appliance: GuestfsAppliance | None = None, device: str | None = None,
                 name: str | None = None, own: bool = False) -> None:
        if appliance is None:
            if source is None:
                raise ValueError("need a source or an appliance")
            appliance = GuestfsAppliance([source])
            appliance.users = 0
            own = True
        self._own = own
        if own:
            appliance.users += 1
        self.appliance = appliance
        try:
            self._setup(source, device, name)
        except BaseException:
            self.close()
            raise

    def _setup(self, source, device: str | None, name: str | None) -> None:
        appliance = self.appliance
        self.g = appliance.g
        self.device = device or appliance.devices[0]
        self.name = name or getattr(source, "name", None) or (os.fspath(source) if source else self.device)
        try:
            fstype = self.g.vfs_type(self.device)
        except RuntimeError:
            fstype = ""
        if not fstype or fstype in ("LVM2_member", "swap"):
            found = appliance.filesystems()
            raise FilesystemError(f"no filesystem libguestfs can mount on {self.device}"
                                  f"{' (' + fstype + ')' if fstype else ''}; it sees: "
                                  + (", ".join(f"{d} {t}" for d, t in found.items()) or "nothing"),
                                  file=self.name, layer="fs")
        self.skipped: list[str] = []   # entries the bindings cannot name (non-UTF-8)
        self._unnamed: dict[str, list[str]] = {}   # directory -> its names the bindings cannot pass
        self.root = appliance.mount(self.device)
        self.info = self._info(fstype)

    @property
    def launch_seconds(self) -> float:
        """How long the appliance took to start (for the progress display)."""
        return self.appliance.launch_seconds

    def _info(self, fstype: str) -> FsInfo:
        def ask(call, *args):
            try:
                return call(*args) or None
            except RuntimeError:
                return None

        info = FsInfo(type=fstype, label=ask(self.g.vfs_label, self.device),
                      uuid=ask(self.g.vfs_uuid, self.device))
        sv = ask(self.g.statvfs, self.root)
        if sv:
            frsize = sv.get("frsize") or sv.get("bsize") or 0
            info.block_size = sv.get("bsize")
            info.size = sv["blocks"] * frsize
            info.free = sv["bfree"] * frsize
            info.used = info.size - info.free
        info.details = {"backend": "guestfs", "device": self.device,
                        "accelerator": self.appliance.accelerator,
                        "launch_seconds": round(self.appliance.launch_seconds, 2)}
        return info

    # -- paths -------------------------------------------------------------------

    def _real(self, path: str) -> str:
        """Guest path -> appliance path (under this filesystem's mount point)."""
        path = normalize(path)
        return self.root if path == "/" else self.root + path

    def _entry(self, path: str, st: dict, link: str | None = None) -> Entry:
        mode = st["st_mode"]
        kind = _KINDS.get(mode & _S_IFMT, FILE)
        entry = Entry(path=path, kind=kind, mode=mode & 0o7777, uid=st["st_uid"], gid=st["st_gid"],
                      size=st["st_size"] if kind in (FILE, SYMLINK, DIR) else 0,
                      mtime_ns=st["st_mtime_sec"] * 1_000_000_000 + st["st_mtime_nsec"],
                      atime_ns=st["st_atime_sec"] * 1_000_000_000 + st["st_atime_nsec"],
                      ctime_ns=st["st_ctime_sec"] * 1_000_000_000 + st["st_ctime_nsec"],
                      nlink=st["st_nlink"], inode=st["st_ino"], link_target=link)
        if kind in (CHAR, BLOCK):
            entry.rdev = _decode_dev(st["st_rdev"])
        return entry

    def stat(self, path: str) -> Entry:
        path = normalize(path)
        real = self._real(path)
        try:
            st = self.g.lstatns(real)
        except (RuntimeError, UnicodeError):
            raise GuestPathError(f"no such file or directory: {path}", file=self.name) from None
        link = None
        if st["st_mode"] & _S_IFMT == 0o120000:
            try:
                link = self.g.readlink(real)
            except RuntimeError as exc:
                raise FileReadError(f"{path}: cannot read the link: {_first_line(exc)}") from None
        return self._entry(path, st, link)

    def listdir(self, path: str) -> list[Entry]:
        path = normalize(path)
        real = self._real(path)
        try:
            names = [n for n in self._names(real) if n not in (".", "..")]
        except RuntimeError as exc:
            if self.stat(path).kind != DIR:
                raise GuestPathError(f"not a directory: {path}", file=self.name) from None
            raise FileReadError(f"cannot list {path}: {_first_line(exc)}") from None
        out: list[Entry] = []
        for i in range(0, len(names), BATCH):   # batched: one round trip per 1000 names
            batch = names[i:i + BATCH]
            try:
                stats = self.g.lstatnslist(real, batch)
            except RuntimeError as exc:
                raise FileReadError(f"cannot stat the entries of {path}: {_first_line(exc)}") from None
            links = [n for n, st in zip(batch, stats) if st["st_mode"] & _S_IFMT == 0o120000]
            targets = dict(zip(links, self.g.readlinklist(real, links))) if links else {}
            for name, st in zip(batch, stats):
                if st["st_ino"] == -1:      # vanished or unstattable: lstatnslist's marker
                    continue
                out.append(self._entry(posixpath.join(path, name), st, targets.get(name)))
        return out

    def _names(self, real: str) -> list[str]:
        try:
            return list(self.g.ls(real))
        except UnicodeDecodeError:
            pass
        # The bindings pass names as strict UTF-8 str and cannot carry other
        # bytes either way: list them as bytes (ls0 into a local file), keep the
        # UTF-8 ones and report the others.
        fd, tmp = tempfile.mkstemp(prefix="rescue-ls0-")
        os.close(fd)
        try:
            self.g.ls0(real, tmp)
            with open(tmp, "rb") as f:
                raw = f.read().split(b"\0")
        finally:
            os.unlink(tmp)
        names = []
        directory = real[len(self.root):] or "/"
        lost = []
        for name in raw:
            if not name:
                continue
            try:
                names.append(name.decode("utf-8"))
            except UnicodeDecodeError:
                lost.append(name.decode("utf-8", "backslashreplace"))
        if lost:
            # Not a warning of its own: listing_damage reports the directory as
            # partly read, so extract counts it as skipped (exit 1, --json "skipped").
            self._unnamed[directory] = lost
            self.skipped.extend(posixpath.join(directory, n) for n in lost)
        return names

    def listing_damage(self, path: str) -> str | None:
        lost = self._unnamed.get(normalize(path))
        if not lost:
            return None
        shown = ", ".join(lost[:5]) + (f" and {len(lost) - 5} more" if len(lost) > 5 else "")
        return (f"{len(lost)} name(s) not UTF-8, which libguestfs cannot pass, left out: {shown} "
                "(the native readers have no such limit: --backend auto)")

    def read_chunks(self, entry: Entry, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        if entry.kind != FILE or entry.size == 0:
            return
        real = self._real(entry.path)
        step = max(1, min(chunk_size, PREAD_MAX))
        pos = 0
        while pos < entry.size:
            want = min(step, entry.size - pos)
            try:
                data = self.g.pread(real, want, pos)
            except RuntimeError as exc:
                raise FileReadError(f"{entry.path}: read at {pos} failed: {_first_line(exc)}") from None
            if not data:
                raise FileReadError(f"{entry.path}: file ends at {pos}, expected {entry.size} bytes")
            pos += len(data)
            yield data

    def read_range(self, entry: Entry, offset: int, length: int) -> bytes:
        out = []
        end = min(entry.size, offset + length)
        pos = offset
        while pos < end:
            try:
                data = self.g.pread(self._real(entry.path), min(PREAD_MAX, end - pos), pos)
            except RuntimeError as exc:
                raise FileReadError(f"{entry.path}: read at {pos} failed: {_first_line(exc)}") from None
            if not data:
                break
            out.append(data)
            pos += len(data)
        return b"".join(out)

    def xattrs(self, entry: Entry) -> dict[str, bytes]:
        try:
            found = self.g.lgetxattrs(self._real(entry.path))
        except RuntimeError as exc:
            raise FileReadError(f"{entry.path}: cannot read xattrs: {_first_line(exc)}") from None
        out = {}
        for item in found:
            value = item["attrval"]
            out[item["attrname"]] = value if isinstance(value, bytes) else bytes(value, "latin-1")
        return out

    def close(self) -> None:
        if self._own:
            self._own = False
            self.appliance.release()


def _volume_source(volume) -> ByteSource:
    source = volume.source
    if isinstance(source, Window) and isinstance(source.parent, FileSource) and source.start == 0 \
            and source.size == source.parent.size:
        source = source.parent   # a bare filesystem file: attach it directly
    return source


def open_volume(volume, name: str | None = None,
                status: Callable[[str], None] | None = None) -> GuestfsFileSystem:
    """The snapshot layer's entry point: one volume (`rescue.volume.base.Volume`)
    in its own appliance. The volume's byte source goes in by path when it is a
    whole local file, else over the NBD export."""
    return open_volumes([volume], [name or volume.id], status=status)[0]


def open_volumes(volumes: Sequence, names: Sequence[str] | None = None,
                 status: Callable[[str], None] | None = None) -> list[GuestfsFileSystem]:
    """Several volumes (root and a separate /var, say) with ONE appliance
    launch; the appliance closes when the last of them is closed. `status`
    hears how the launch goes."""
    if not volumes:
        return []
    appliance = GuestfsAppliance([_volume_source(v) for v in volumes], status=status)
    out: list[GuestfsFileSystem] = []
    try:
        for i, volume in enumerate(volumes):
            out.append(GuestfsFileSystem(appliance=appliance, device=appliance.devices[i],
                                         name=names[i] if names else volume.id, own=True))
    except BaseException:
        for fs in out:
            fs.close()
        appliance.close()
        raise
    return out
