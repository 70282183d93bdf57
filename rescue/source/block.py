"""A block device read in place: /dev/vdb, /dev/loop5, /dev/rdisk2, \\\\.\\PhysicalDrive1.

A device's `st_size` is 0, so its size comes from the device itself:
  Linux   ioctl BLKGETSIZE64 (linux/fs.h: _IOR(0x12, 114, size_t)), else
          /sys/class/block/<dev>/size (always in 512-byte units);
          logical sector size from BLKSSZGET (_IO(0x12, 104)).
  macOS   DKIOCGETBLOCKCOUNT x DKIOCGETBLOCKSIZE (sys/disk.h: _IOR('d', 25, uint64_t),
          _IOR('d', 24, uint32_t)).
  Windows IOCTL_DISK_GET_LENGTH_INFO (winioctl.h: CTL_CODE(IOCTL_DISK_BASE, 0x17,
          METHOD_BUFFERED, FILE_READ_ACCESS) = 0x7405C) and BytesPerSector from
          IOCTL_DISK_GET_DRIVE_GEOMETRY (0x70000). The Windows path cannot be run on
          the Linux test machines: it is written from the documented structures only.
The device is opened read-only (never for writing: non-negotiable). Every read is
widened to whole logical sectors: raw devices on macOS and Windows refuse others.
A filesystem on the device that is mounted read-write right now is reported, because
what is read may be changing underneath (Linux: /proc/self/mounts).
"""

from __future__ import annotations

import os
import stat
import struct
import sys

from ..errors import SourceError
from .base import DescriptorSource, clip_read

BLKGETSIZE64 = 0x80081272    # _IOR(0x12, 114, size_t) on 64-bit Linux
BLKSSZGET = 0x1268           # _IO(0x12, 104): logical sector size, an int
DKIOCGETBLOCKSIZE = 0x40046418   # _IOR('d', 24, uint32_t)
DKIOCGETBLOCKCOUNT = 0x40086419  # _IOR('d', 25, uint64_t)
IOCTL_DISK_GET_LENGTH_INFO = 0x0007405C
IOCTL_DISK_GET_DRIVE_GEOMETRY = 0x00070000
# DISK_GEOMETRY: LARGE_INTEGER Cylinders; MEDIA_TYPE MediaType; DWORD TracksPerCylinder,
# SectorsPerTrack, BytesPerSector
DISK_GEOMETRY = struct.Struct("<qIIII")
MAX_READ = 64 << 20   # one pread at most; a longer request is served in pieces


def _is_windows_device(spec: str) -> bool:
    s = spec.replace("/", "\\").lower()
    return s.startswith("\\\\.\\") and (s[4:].startswith(("physicaldrive", "harddisk", "cdrom"))
                                         or (len(s) == 6 and s[5] == ":"))


def is_block_device(spec: str | os.PathLike) -> bool:
    """True for a block device (or a macOS raw /dev/rdiskN, which is a character device)."""
    if not isinstance(spec, (str, os.PathLike)):
        return False
    spec = os.fspath(spec)
    if not isinstance(spec, str):
        return False
    if sys.platform == "win32":
        return _is_windows_device(spec)
    try:
        mode = os.stat(spec).st_mode
    except (OSError, ValueError):
        return False
    if stat.S_ISBLK(mode):
        return True
    return sys.platform == "darwin" and stat.S_ISCHR(mode) and os.path.basename(spec).startswith("rdisk")


def _permission_hint(path: str) -> str:
    if sys.platform == "win32":
        return "run the command from a terminal opened with 'Run as administrator'"
    if sys.platform == "darwin":
        return f"run it with sudo: sudo rescue ... {path}"
    return ("add yourself to the disk group (sudo usermod -aG disk $USER, then log in again) "
            f"or run it with sudo")


class BlockDeviceSource(DescriptorSource):
    """A ByteSource over a block device, opened read-only. It shares the
    descriptor reading of FileSource (base.DescriptorSource) without being one:
    what takes a FileSource for a plain file (split sets, libguestfs drives,
    zero-copy) does not take a device."""

    max_read = MAX_READ

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self.name = self.path
        self.bytes_read = 0
        self.identity = None   # a device's content changes: never cache an index for it
        self.notes: list[str] = []
        self._fd = self._open()
        try:
            self.size, self.sector_size = self._geometry()
            if sys.platform.startswith("linux"):
                self.notes += _linux_mounted_rw(self._fd, self.path)
        except BaseException:
            self.close()
            raise

    # -- opening ------------------------------------------------------------
    def _open(self) -> int:
        try:
            if sys.platform == "win32":
                return _windows_open(self.path)
            return os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise SourceError("no such device", file=self.path) from None
        except PermissionError:
            raise SourceError("permission denied reading the device", file=self.path,
                              hint=_permission_hint(self.path)) from None
        except OSError as exc:
            raise SourceError(f"cannot open the device: {exc.strerror or exc}", file=self.path) from None

    def _geometry(self) -> tuple[int, int]:
        try:
            if sys.platform == "win32":
                return _windows_geometry(self._fd)
            if sys.platform == "darwin":
                return _darwin_geometry(self._fd)
            return _linux_geometry(self._fd, self.path)
        except OSError as exc:
            raise SourceError(f"cannot read the device's size: {exc.strerror or exc}", file=self.path) from None

    # -- ByteSource ---------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        length = clip_read(self.size, offset, length)
        if not length:
            return b""
        self.bytes_read += length
        ss = self.sector_size
        start = offset - offset % ss                     # whole sectors only
        end = min(-(-(offset + length) // ss) * ss, self.size)
        data = self._read_at(start, end - start)
        return data[offset - start:offset - start + length]

    def _pread(self, n: int, pos: int) -> bytes:
        try:
            return super()._pread(n, pos)
        except OSError as exc:
            raise SourceError(f"read error at byte {pos}: {exc.strerror or exc}", file=self.path,
                              hint="the disk may be failing; copy it with ddrescue first") from None

    def __repr__(self) -> str:
        return f"BlockDeviceSource({self.path!r}, size={getattr(self, 'size', '?')})"


# -- Linux --------------------------------------------------------------------

def _sysfs_dir(fd: int) -> str | None:
    rdev = os.fstat(fd).st_rdev
    d = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"
    return d if os.path.isdir(d) else None


def _linux_geometry(fd: int, path: str) -> tuple[int, int]:
    import fcntl
    size = sector = None
    try:
        size = struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8))[0]
    except OSError:
        d = _sysfs_dir(fd)
        if d is None:
            raise
        with open(os.path.join(d, "size")) as f:
            size = int(f.read()) * 512   # sysfs counts 512-byte units whatever the sector size
    try:
        sector = struct.unpack("i", fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4))[0]
    except OSError:
        sector = 512
    if sector <= 0 or sector & (sector - 1):
        sector = 512
    return size, sector


def _device_family(fd: int) -> tuple[set[int], list[str]]:
    """rdevs of the device, its partitions and what is stacked on it (dm, md), and
    their names: a filesystem mounted from any of them reads from our device."""
    rdevs: set[int] = {os.fstat(fd).st_rdev}
    names: list[str] = []
    d = _sysfs_dir(fd)
    if d is None:
        return rdevs, names
    todo = [os.path.realpath(d)]
    seen: set[str] = set()
    while todo:
        cur = todo.pop()
        if cur in seen or len(seen) > 256:
            continue
        seen.add(cur)
        try:
            with open(os.path.join(cur, "dev")) as f:
                major, minor = f.read().strip().split(":")
            rdevs.add(os.makedev(int(major), int(minor)))
            names.append(os.path.basename(cur))
        except (OSError, ValueError):
            pass
        try:
            children = os.listdir(cur)
        except OSError:
            continue
        for child in children:   # partitions are subdirectories holding a 'partition' file
            if os.path.isfile(os.path.join(cur, child, "partition")):
                todo.append(os.path.join(cur, child))
        holders = os.path.join(cur, "holders")
        if os.path.isdir(holders):
            todo.extend(os.path.realpath(os.path.join(holders, h)) for h in os.listdir(holders))
    return rdevs, names


def _linux_mounted_rw(fd: int, path: str) -> list[str]:
    try:
        rdevs, _ = _device_family(fd)
        with open("/proc/self/mounts", "rb") as f:
            lines = f.read().decode("utf-8", "surrogateescape").splitlines()
    except OSError:
        return []
    notes = []
    for line in lines:
        fields = line.split()
        if len(fields) < 4 or not fields[0].startswith("/"):
            continue
        source = fields[0].replace("\\040", " ")
        try:
            st = os.stat(source)
        except OSError:
            continue
        if not stat.S_ISBLK(st.st_mode) or st.st_rdev not in rdevs:
            continue
        if "rw" in fields[3].split(","):
            mnt = fields[1].replace("\\040", " ")
            notes.append(f"{source} is mounted read-write on {mnt} right now: files being written may be "
                         f"copied inconsistently (unmount it or remount it read-only for an exact copy)")
    return notes


# -- macOS --------------------------------------------------------------------

def _darwin_geometry(fd: int) -> tuple[int, int]:
    import fcntl
    sector = struct.unpack("I", fcntl.ioctl(fd, DKIOCGETBLOCKSIZE, b"\0" * 4))[0]
    count = struct.unpack("Q", fcntl.ioctl(fd, DKIOCGETBLOCKCOUNT, b"\0" * 8))[0]
    return count * sector, sector or 512


# -- Windows (not run on the test machines; written from the documented API) --

def _windows_open(path: str) -> int:
    import ctypes
    import msvcrt
    from ctypes import wintypes
    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    kernel32.CreateFileW.restype = wintypes.HANDLE
    kernel32.CreateFileW.argtypes = [wintypes.LPCWSTR, wintypes.DWORD, wintypes.DWORD, wintypes.LPVOID,
                                     wintypes.DWORD, wintypes.DWORD, wintypes.HANDLE]
    GENERIC_READ, FILE_SHARE_READ, FILE_SHARE_WRITE, OPEN_EXISTING = 0x80000000, 1, 2, 3
    handle = kernel32.CreateFileW(path, GENERIC_READ, FILE_SHARE_READ | FILE_SHARE_WRITE, None,
                                  OPEN_EXISTING, 0, None)
    if handle in (None, wintypes.HANDLE(-1).value):
        err = ctypes.get_last_error()
        if err == 5:       # ERROR_ACCESS_DENIED
            raise PermissionError(err, "access denied")
        if err in (2, 3):  # ERROR_FILE_NOT_FOUND, ERROR_PATH_NOT_FOUND
            raise FileNotFoundError(err, "not found")
        raise OSError(err, ctypes.FormatError(err))
    return msvcrt.open_osfhandle(handle, os.O_RDONLY | getattr(os, "O_BINARY", 0))


def _windows_ioctl(fd: int, code: int, out_size: int) -> bytes:
    import ctypes
    import msvcrt
    from ctypes import wintypes
    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    kernel32.DeviceIoControl.restype = wintypes.BOOL
    kernel32.DeviceIoControl.argtypes = [wintypes.HANDLE, wintypes.DWORD, wintypes.LPVOID, wintypes.DWORD,
                                         wintypes.LPVOID, wintypes.DWORD, ctypes.POINTER(wintypes.DWORD),
                                         wintypes.LPVOID]
    buf = ctypes.create_string_buffer(out_size)
    returned = wintypes.DWORD(0)
    ok = kernel32.DeviceIoControl(msvcrt.get_osfhandle(fd), code, None, 0, buf, out_size,
                                  ctypes.byref(returned), None)
    if not ok:
        err = ctypes.get_last_error()
        raise OSError(err, ctypes.FormatError(err))
    return buf.raw[:returned.value]


def _windows_geometry(fd: int) -> tuple[int, int]:
    size = struct.unpack("<q", _windows_ioctl(fd, IOCTL_DISK_GET_LENGTH_INFO, 8)[:8])[0]
    try:
        raw = _windows_ioctl(fd, IOCTL_DISK_GET_DRIVE_GEOMETRY, DISK_GEOMETRY.size)
        sector = DISK_GEOMETRY.unpack(raw[:DISK_GEOMETRY.size])[4]
    except (OSError, struct.error):
        sector = 512
    return size, sector if sector > 0 and not sector & (sector - 1) else 512
