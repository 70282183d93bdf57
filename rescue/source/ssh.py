"""A disk or file on another machine, read in place over SSH: ssh://[user@]host[:port]/dev/vda.

The transport is the user's own OpenSSH client (`ssh`, or the command in $RESCUE_SSH),
run as a subprocess, so ~/.ssh/config aliases, the agent, keys, ProxyJump, known_hosts
and password prompts on the terminal behave exactly as `ssh HOST` does (Linux, macOS,
Windows 10+ all ship it). Over its pipes we speak SFTP version 3 to the server's `sftp`
subsystem (draft-ietf-secsh-filexfer-02; OpenSSH PROTOCOL, "limits@openssh.com"), with
many READ requests in flight so a long round trip does not dominate, and a block cache
with read-ahead (blockcache.py). When the server has no SFTP subsystem, a remote POSIX
shell loop answers each range with `dd iflag=skip_bytes,count_bytes` instead.

Read-only by construction: files are opened with SSH_FXF_READ only, the only SFTP
requests ever sent are INIT, OPEN(READ), READ, STAT, REALPATH, CLOSE and the limits
query, and the fallback runs only `dd if=...` to stdout, `blockdev --getsize64`, `cat`
of sysfs and `wc -c`. A dropped connection is re-established and the read continues.
"""

from __future__ import annotations

import os
import posixpath
import re
import secrets
import shlex
import stat as stat_mod
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import deque
from dataclasses import dataclass

from ..errors import DamagedRange, SourceError
from .blockcache import CachedRemote

# -- SFTP v3 wire format (draft-ietf-secsh-filexfer-02, sections 3-7) -------------
FXP_INIT, FXP_VERSION, FXP_OPEN, FXP_CLOSE, FXP_READ = 1, 2, 3, 4, 5
FXP_STAT, FXP_REALPATH, FXP_EXTENDED = 17, 16, 200
FXP_STATUS, FXP_HANDLE, FXP_DATA, FXP_NAME, FXP_ATTRS, FXP_EXTENDED_REPLY = 101, 102, 103, 104, 105, 201
FXF_READ = 0x00000001                      # the only open flag ever sent
FX_OK, FX_EOF, FX_NO_SUCH_FILE, FX_PERMISSION_DENIED = 0, 1, 2, 3
ATTR_SIZE, ATTR_UIDGID, ATTR_PERMISSIONS, ATTR_ACMODTIME, ATTR_EXTENDED = 1, 2, 4, 8, 0x80000000

U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
HEADER = struct.Struct(">IB")            # packet length, type
READ_REQ = struct.Struct(">BI")          # type, request id (then handle string, offset, length)
OFFSET_LEN = struct.Struct(">QI")
DATA_HEAD = struct.Struct(">II")          # request id, data length (after the type byte)
LIMITS = struct.Struct(">QQQQ")          # max packet, read, write length, open handles

SFTP_VERSION = 3
READ_CHUNK = 256 << 10                   # per READ, capped by the server's advertised limit
MIN_READ_CHUNK = 32 << 10                # every SFTP server serves at least this
IN_FLIGHT = 64                           # READ requests outstanding at once
BLOCK_SIZE = 256 << 10
CACHE_SIZE = 128 << 20
MAX_READAHEAD = 32 << 20
RECONNECTS = 6                           # consecutive reconnects without progress before giving up


class SshConnectError(SourceError):
    """ssh could not reach the server (refused, reset, timed out): worth another try
    when it happens while reconnecting."""


class _Lost(Exception):
    """The ssh process went away (connection dropped)."""


class _NoSftp(Exception):
    """The server refused the sftp subsystem."""


@dataclass
class SshTarget:
    user: str | None
    host: str
    port: int | None
    path: str

    @classmethod
    def parse(cls, url: str) -> "SshTarget":
        parts = urllib.parse.urlsplit(url)
        netloc = parts.netloc
        user = None
        if "@" in netloc:
            user, netloc = netloc.rsplit("@", 1)
            user = urllib.parse.unquote(user)
        port = None
        if netloc.startswith("["):                       # [IPv6]:port
            host, _, rest = netloc[1:].partition("]")
            if rest.startswith(":") and rest[1:]:
                port = rest[1:]
        else:
            host, _, port_s = netloc.partition(":")
            port = port_s or None
        path = urllib.parse.unquote(parts.path)
        if not host or host.startswith("-") or (user or "").startswith("-"):
            raise SourceError("an ssh:// address needs a host: ssh://[user@]host[:port]/dev/vda", file=url)
        if port is not None and not port.isdigit():
            raise SourceError(f"port {port!r} is not a number", file=url)
        if not path or path == "/":
            raise SourceError("say which device or file to read: ssh://host/dev/vda", file=url)
        if path.startswith("/~/"):
            path = path[3:]                              # relative to the login's home directory
        return cls(user, host, int(port) if port else None, path)

    def display(self, path: str | None = None) -> str:
        who = f"{self.user}@" if self.user else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = f":{self.port}" if self.port else ""
        path = path if path is not None else self.path
        return f"ssh://{who}{host}{port}{path if path.startswith('/') else '/~/' + path}"

    def ssh_line(self) -> str:
        return " ".join(["ssh"] + (["-p", str(self.port)] if self.port else [])
                        + [f"{self.user}@{self.host}" if self.user else self.host])


def _has_tty() -> bool:
    if sys.platform == "win32":
        return bool(sys.stdin and sys.stdin.isatty())
    try:
        fd = os.open("/dev/tty", os.O_RDWR | getattr(os, "O_NOCTTY", 0))
    except OSError:
        return False
    os.close(fd)
    return True


def _ssh_argv(target: SshTarget, *, subsystem: bool) -> list[str]:
    base = shlex.split(os.environ.get("RESCUE_SSH", "ssh"), posix=sys.platform != "win32")
    argv = base + ["-v", "-T", "-x", "-a", "-o", "ClearAllForwardings=yes",
                   "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
    # Without a terminal ssh cannot ask anything: fail at once instead of hanging, unless
    # the user set up an askpass program for that (SSH_ASKPASS_REQUIRE=force).
    if not _has_tty() and os.environ.get("SSH_ASKPASS_REQUIRE") != "force":
        argv += ["-o", "BatchMode=yes"]
    if target.port:
        argv += ["-p", str(target.port)]
    if target.user:
        argv += ["-l", target.user]
    if subsystem:
        argv += ["-s"]
    return argv + ["--", target.host]


class _Process:
    """One ssh process: binary pipes, stderr collected (it carries ssh's -v log)."""

    def __init__(self, argv: list[str], counter: list[int]) -> None:
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE)
        except FileNotFoundError:
            raise SourceError(f"the OpenSSH client ({argv[0]}) is not installed", layer="source",
                              hint="install OpenSSH (Windows: Settings > Optional features > OpenSSH Client)") \
                from None
        self.log: deque[str] = deque(maxlen=600)
        self._counter = counter
        self._err = threading.Thread(target=self._drain, daemon=True)
        self._err.start()

    def _drain(self) -> None:
        for raw in iter(self.proc.stderr.readline, b""):
            self.log.append(raw.decode("utf-8", "replace").rstrip("\r\n"))

    def write(self, data: bytes) -> None:
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except (OSError, ValueError):
            raise _Lost() from None

    def read_exact(self, n: int) -> bytes:
        try:
            data = self.proc.stdout.read(n)
        except (OSError, ValueError):
            raise _Lost() from None
        if data is None or len(data) < n:
            raise _Lost()
        self._counter[0] += n
        return data

    def read_some(self) -> bytes:
        try:
            data = self.proc.stdout.read1(1 << 20)
        except (OSError, ValueError):
            raise _Lost() from None
        if not data:
            raise _Lost()
        self._counter[0] += len(data)
        return data

    def finished_log(self, wait: float = 5.0) -> list[str]:
        try:
            self.proc.wait(wait)
        except subprocess.TimeoutExpired:
            pass
        self._err.join(1.0)
        return list(self.log)

    def close(self) -> None:
        for f in (self.proc.stdin,):
            try:
                f.close()
            except OSError:
                pass
        try:
            self.proc.wait(2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._err.join(1.0)   # stderr reaches EOF once ssh is gone
        try:
            self.proc.stdout.close()
        except OSError:
            pass


_FINGERPRINT = re.compile(r"Server host key: (\S+) (\S+)")


def _explain(log: list[str], target: SshTarget, name: str) -> Exception:
    """ssh's own words turned into one line (or _NoSftp for the fallback)."""
    text = "\n".join(log)
    said = [line for line in log if line.strip() and not line.startswith(
            ("debug", "OpenSSH_", "Authenticated", "Transferred:", "Bytes per second"))]
    fp = _FINGERPRINT.search(text)
    key = f"{fp.group(1)} {fp.group(2)}" if fp else "fingerprint not shown"
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in text:
        return SourceError(f"the host key of {target.host} has CHANGED since you last connected (it is now {key}): "
                           "a rescue system has its own key, or someone is in the middle",
                           file=name, hint=f"if you just booted the rescue system, drop the old key with "
                                           f"ssh-keygen -R {target.host}, then check the new one with: {target.ssh_line()}")
    if "Host key verification failed" in text or "host key is known" in text:
        return SourceError(f"the host key of {target.host} is not known ({key})", file=name,
                           hint=f"check that fingerprint and accept it once with: {target.ssh_line()}")
    if re.search(r"Permission denied \(|Too many authentication failures", text):
        return SourceError(f"{target.host} refused the login: wrong password or key", file=name,
                           hint=f"check that this works: {target.ssh_line()}")
    if re.search(r"subsystem request failed|Request for subsystem .* failed", text, re.I):
        return _NoSftp()
    for pattern in ("Could not resolve hostname", "Connection refused", "Connection timed out",
                    "No route to host", "Network is unreachable", "Connection closed", "Connection reset"):
        for line in said:
            if pattern in line:
                return SshConnectError(f"cannot connect: {line.strip()}", file=name)
    last = said[-1].strip() if said else "ssh exited without saying why"
    return SshConnectError(f"ssh failed: {last}", file=name, hint=f"check that this works: {target.ssh_line()}")


def _string(b: bytes) -> bytes:
    return U32.pack(len(b)) + b


def _take_string(body: bytes, pos: int) -> tuple[bytes, int]:
    n = U32.unpack_from(body, pos)[0]
    return body[pos + 4:pos + 4 + n], pos + 4 + n


@dataclass
class Attrs:
    size: int | None = None
    mode: int | None = None
    mtime: int | None = None


def _take_attrs(body: bytes, pos: int) -> tuple[Attrs, int]:
    flags = U32.unpack_from(body, pos)[0]
    pos += 4
    a = Attrs()
    if flags & ATTR_SIZE:
        a.size = U64.unpack_from(body, pos)[0]
        pos += 8
    if flags & ATTR_UIDGID:
        pos += 8
    if flags & ATTR_PERMISSIONS:
        a.mode = U32.unpack_from(body, pos)[0]
        pos += 4
    if flags & ATTR_ACMODTIME:
        a.mtime = U32.unpack_from(body, pos + 4)[0]
        pos += 8
    if flags & ATTR_EXTENDED:
        count = U32.unpack_from(body, pos)[0]
        pos += 4
        for _ in range(count):
            _, pos = _take_string(body, pos)
            _, pos = _take_string(body, pos)
    return a, pos


class _SftpStatus(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Sftp:
    """One SFTP v3 session over one ssh process."""

    def __init__(self, target: SshTarget, name: str, counter: list[int]) -> None:
        self.proc = _Process(_ssh_argv(target, subsystem=True) + ["sftp"], counter)
        self._id = 0
        try:
            self._send(FXP_INIT, U32.pack(SFTP_VERSION))
            kind, body = self._recv()
        except _Lost:
            raise _explain(self.proc.finished_log(), target, name) from None
        if kind != FXP_VERSION:
            self.proc.close()
            raise SourceError(f"the SFTP server answered INIT with packet type {kind}", file=name)
        self.extensions: dict[bytes, bytes] = {}
        pos = 4
        while pos < len(body):
            k, pos = _take_string(body, pos)
            v, pos = _take_string(body, pos)
            self.extensions[k] = v
        self.read_chunk = MIN_READ_CHUNK
        if b"limits@openssh.com" in self.extensions:
            kind, body = self.request(FXP_EXTENDED, _string(b"limits@openssh.com"))
            if kind == FXP_EXTENDED_REPLY and len(body) >= 4 + LIMITS.size:
                max_read = LIMITS.unpack_from(body, 4)[1]
                self.read_chunk = max(MIN_READ_CHUNK, min(READ_CHUNK, max_read or READ_CHUNK))
        # Requests sit on multiples of a power of two, so read-ahead asked for during one
        # fetch is found again, piece for piece, by the next one.
        self.read_chunk = 1 << (self.read_chunk.bit_length() - 1)
        self.pending: dict[int, tuple[bytes, int, int]] = {}   # read-ahead in flight: rid -> (handle, off, n)
        self.stash: dict[tuple[bytes, int], bytes] = {}          # read-ahead that arrived: (handle, off) -> data

    def _send(self, kind: int, payload: bytes) -> int:
        self._id = (self._id + 1) & 0xFFFFFFFF
        self.proc.write(HEADER.pack(len(payload) + 5, kind) + U32.pack(self._id) + payload
                        if kind != FXP_INIT else HEADER.pack(len(payload) + 1, kind) + payload)
        return self._id

    def _recv(self) -> tuple[int, bytes]:
        length, kind = HEADER.unpack(self.proc.read_exact(HEADER.size))
        if length < 1 or length > (1 << 24):
            raise _Lost()   # framing lost: treat as a broken connection
        return kind, self.proc.read_exact(length - 1)

    def request(self, kind: int, payload: bytes) -> tuple[int, bytes]:
        rid = self._send(kind, payload)
        while True:
            rkind, body = self._recv()
            got = U32.unpack_from(body, 0)[0]
            if got == rid:
                return rkind, body
            if got in self.pending:   # read-ahead answered meanwhile: keep it
                handle, off, _ = self.pending.pop(got)
                if rkind == FXP_DATA:
                    self._keep(handle, off, _take_string(body, 4)[0])

    def _keep(self, handle: bytes, off: int, data: bytes) -> None:
        self.stash[(handle, off)] = data
        while len(self.stash) > 2 * IN_FLIGHT:   # bounded: read-ahead nobody came for goes first
            del self.stash[next(iter(self.stash))]

    @staticmethod
    def status(body: bytes) -> _SftpStatus:
        code = U32.unpack_from(body, 4)[0]
        msg, _ = _take_string(body, 8) if len(body) >= 12 else (b"", 0)
        return _SftpStatus(code, msg.decode("utf-8", "replace"))

    def stat(self, path: str) -> Attrs:
        kind, body = self.request(FXP_STAT, _string(os.fsencode(path)))
        if kind == FXP_ATTRS:
            return _take_attrs(body, 4)[0]
        raise self.status(body)

    def realpath(self, path: str) -> str:
        kind, body = self.request(FXP_REALPATH, _string(os.fsencode(path)))
        if kind == FXP_NAME and U32.unpack_from(body, 4)[0] >= 1:
            return os.fsdecode(_take_string(body, 8)[0])
        raise self.status(body)

    def open(self, path: str) -> bytes:
        kind, body = self.request(FXP_OPEN, _string(os.fsencode(path)) + U32.pack(FXF_READ) + U32.pack(0))
        if kind == FXP_HANDLE:
            return _take_string(body, 4)[0]
        raise self.status(body)

    def close_handle(self, handle: bytes) -> None:
        self.request(FXP_CLOSE, _string(handle))

    def read_into(self, handle: bytes, ranges: list[list[int]], buf: bytearray, base: int,
                  ahead: tuple[int, int] | None = None) -> None:
        """Fill buf[off - base ...] for every [off, length] in `ranges`, many requests in flight.

        `ranges` is consumed as pieces complete, so after a lost connection the caller
        retries with what is left. A READ past the end (EOF) raises DamagedRange.
        `ahead` (offset, length) is read-ahead: once every piece asked for is requested,
        the pipe is kept full with it, and what it brings is kept for the next call."""
        hstr = _string(handle)
        rc = self.read_chunk
        inflight: dict[int, list[int]] = {}
        queue: list[list[int]] = []
        for off, n in ranges:   # pieces on multiples of the chunk size
            end = off + n
            while off < end:
                stop = min(end, (off // rc + 1) * rc)
                queue.append([off, stop - off])
                off = stop
        ranges.clear()
        spec: list[int] = []
        if ahead is not None:
            a_off, a_n = ahead
            first = -(-a_off // rc) * rc
            spec = [o for o in range(first, a_off + a_n, rc)]
        by_place = {(h, o): rid for rid, (h, o, _) in self.pending.items()}
        try:
            while queue or inflight:
                while queue and len(inflight) + len(self.pending) < IN_FLIGHT:
                    off, n = queue.pop(0)
                    kept = self.stash.pop((handle, off), None)
                    if kept is not None:
                        take = kept[:n]
                        buf[off - base:off - base + len(take)] = take
                        if len(take) < n:
                            queue.insert(0, [off + len(take), n - len(take)])
                        continue
                    rid = by_place.pop((handle, off), None)
                    if rid is not None and rid in self.pending:   # asked for as read-ahead: adopt it
                        _, _, pn = self.pending.pop(rid)
                        take = min(pn, n)
                        inflight[rid] = [off, take]
                        if take < n:
                            queue.insert(0, [off + take, n - take])
                        continue
                    take = min(n, rc)
                    if n > take:
                        queue.insert(0, [off + take, n - take])
                    rid = (self._id + 1) & 0xFFFFFFFF
                    inflight[rid] = [off, take]   # before sending: a failed write must not lose it
                    self._send(FXP_READ, hstr + OFFSET_LEN.pack(off, take))
                if not queue:
                    while spec and len(inflight) + len(self.pending) < IN_FLIGHT:
                        off = spec.pop(0)
                        if (handle, off) in self.stash or (handle, off) in by_place:
                            continue
                        rid = (self._id + 1) & 0xFFFFFFFF
                        self.pending[rid] = (handle, off, rc)
                        by_place[(handle, off)] = rid
                        self._send(FXP_READ, hstr + OFFSET_LEN.pack(off, rc))
                if not inflight and not self.pending:
                    continue
                length, kind = HEADER.unpack(self.proc.read_exact(HEADER.size))
                if length < 5 or length > (1 << 24):
                    raise _Lost()
                if kind == FXP_DATA:
                    rid, dlen = DATA_HEAD.unpack(self.proc.read_exact(DATA_HEAD.size))
                    data = self.proc.read_exact(length - 1 - DATA_HEAD.size)[:dlen]
                    req = inflight.pop(rid, None)
                    if req is None:
                        spec_req = self.pending.pop(rid, None)
                        if spec_req is not None:
                            self._keep(spec_req[0], spec_req[1], data)
                        continue
                    off, n = req
                    data = data[:n]   # an adopted read-ahead piece may be longer than asked
                    buf[off - base:off - base + len(data)] = data
                    if len(data) < n:                     # a short read: ask for the rest
                        queue.insert(0, [off + len(data), n - len(data)])
                else:
                    body = self.proc.read_exact(length - 1)
                    rid = U32.unpack_from(body, 0)[0]
                    req = inflight.pop(rid, None)
                    if req is None:
                        self.pending.pop(rid, None)       # read-ahead past the end: forget it
                        continue
                    st = self.status(body) if kind == FXP_STATUS else _SftpStatus(-1, f"packet type {kind}")
                    if st.code == FX_EOF:
                        raise DamagedRange(f"the remote file ends before byte {req[0]}")
                    raise DamagedRange(f"remote read error at byte {req[0]}: {st.message or st.code}")
        finally:
            ranges.extend(queue)
            ranges.extend(inflight.values())
            ranges.sort()

    def close(self) -> None:
        self.proc.close()


class _DdShell:
    """The fallback for a server without SFTP: a remote POSIX shell loop reading
    'offset length' lines and answering each with dd's bytes then a nonce marker."""

    SCRIPT = r"""f=$1; m=$2
if [ ! -e "$f" ]; then echo "RESCUE-ERR missing"; exit 0; fi
if [ -b "$f" ]; then
  s=$(blockdev --getsize64 "$f" 2>/dev/null) || {
    [ -r "$f" ] || { echo "RESCUE-ERR denied"; exit 0; }
    n=$(basename "$(readlink -f "$f")"); s=$(( $(cat "/sys/class/block/$n/size") * 512 )); }
  k=device
elif [ -f "$f" ]; then s=$(wc -c < "$f") || { echo "RESCUE-ERR denied"; exit 0; }; k=file
else echo "RESCUE-ERR notfile"; exit 0; fi
dd if="$f" bs=1 count=0 2>/dev/null || { echo "RESCUE-ERR denied"; exit 0; }
echo "RESCUE-SIZE $s $k"
while read o n; do
  dd if="$f" iflag=skip_bytes,count_bytes skip="$o" count="$n" bs=1048576 2>/dev/null
  printf '\n%s %s\n' "$m" "$?"
done
"""

    def __init__(self, target: SshTarget, path: str, name: str, counter: list[int]) -> None:
        self.marker = ("\nRESCUE-END-" + secrets.token_hex(12)).encode()
        command = " ".join(["sh", "-c", shlex.quote(self.SCRIPT), "rescue-dd", shlex.quote(path),
                            shlex.quote(self.marker.decode().strip())])
        self.proc = _Process(_ssh_argv(target, subsystem=False) + [command], counter)
        self._buf = bytearray()
        try:
            line = self._line()
        except _Lost:
            raise _explain(self.proc.finished_log(), target, name) from None
        words = line.split()
        if words[:1] == ["RESCUE-ERR"]:
            self.proc.close()
            raise _RemoteMissing(words[1] if len(words) > 1 else "?")
        if words[:1] != ["RESCUE-SIZE"] or len(words) < 3 or not words[1].isdigit():
            self.proc.close()
            raise SourceError(f"the remote shell did not answer as expected ({line[:80]!r})", file=name,
                              hint="the fallback needs a POSIX sh, dd and blockdev on the server")
        self.size, self.kind = int(words[1]), words[2]

    def _line(self) -> str:
        while b"\n" not in self._buf:
            self._buf += self.proc.read_some()
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf = bytearray(rest)
        return line.decode("utf-8", "replace")

    def read(self, off: int, n: int) -> bytes:
        self.proc.write(f"{off} {n}\n".encode())
        # dd's bytes, then "\n<marker> <status>\n": data never contains the random marker
        end_at = -1
        while True:
            if len(self._buf) >= n + len(self.marker):
                end_at = self._buf.find(self.marker, n)
                if end_at >= 0 and self._buf.find(b"\n", end_at + len(self.marker)) >= 0:
                    break
            elif len(self._buf) >= len(self.marker):
                early = self._buf.find(self.marker)
                if early >= 0 and self._buf.find(b"\n", early + len(self.marker)) >= 0:
                    end_at = early
                    break
            self._buf += self.proc.read_some()
        data = bytes(self._buf[:end_at])
        nl = self._buf.find(b"\n", end_at + len(self.marker))
        del self._buf[:nl + 1]
        if len(data) != n:
            raise DamagedRange(f"remote dd read {len(data)} of {n} bytes at byte {off}")
        return data

    def close(self) -> None:
        self.proc.close()


class _RemoteMissing(Exception):
    pass


class _Link:
    """The connection to one host, shared by every file opened there; reconnects."""

    def __init__(self, target: SshTarget) -> None:
        self.target = target
        self.counter = [0]         # bytes received from ssh (SFTP packets or dd output)
        self.reconnects = 0
        self.mode = "sftp"
        self.generation = 0
        self._sftp: _Sftp | None = None
        self._dd: dict[str, _DdShell] = {}

    def sftp(self, name: str) -> _Sftp | None:
        """The SFTP session (connecting if needed), or None when the server has no SFTP."""
        if self.mode == "sftp" and self._sftp is None:
            try:
                self._sftp = _Sftp(self.target, name, self.counter)
                self.generation += 1
            except _NoSftp:
                self.mode = "dd"
        return self._sftp

    def dd(self, path: str, name: str) -> _DdShell:
        shell = self._dd.get(path)
        if shell is None:
            try:
                shell = _DdShell(self.target, path, name, self.counter)
            except _NoSftp:
                raise SourceError("the server refused to run a command", file=name) from None
            self._dd[path] = shell
            self.generation += 1
        return shell

    def drop(self) -> None:
        """Forget the current session after it was lost (the next use reconnects)."""
        if self._sftp is not None:
            self._sftp.close()
            self._sftp = None
        for shell in self._dd.values():
            shell.close()
        self._dd.clear()

    def close(self) -> None:
        self.drop()


def _denied(name: str, target: SshTarget) -> SourceError:
    return SourceError(f"permission denied on {target.host}", file=name,
                       hint="log in as root (ssh://root@HOST/...) or as a user in the disk group")


class SshSource(CachedRemote):
    """A remote device or file as a ByteSource. `bytes_fetched` is what came over the wire."""

    def __init__(self, url: str, *, link: _Link | None = None, target: SshTarget | None = None,
                 block_size: int = BLOCK_SIZE, cache_size: int = CACHE_SIZE,
                 max_readahead: int = MAX_READAHEAD) -> None:
        self.target = target or SshTarget.parse(url)
        self.path = self.target.path
        self.name = self.target.display()
        self.url = self.name
        self._link = link or _Link(self.target)
        self._owns_link = link is None
        self._handle: bytes | None = None
        self._handle_gen = -1
        self._opts = dict(block_size=block_size, cache_size=cache_size, max_readahead=max_readahead)
        self.notes: list[str] = []
        self._init_cache(block_size, cache_size, max_readahead)
        try:
            self.size, self.is_device, mtime = self._connect_and_size()
        except BaseException:
            if self._owns_link:
                self._link.close()
            raise
        # A remote device changes under us; a remote file is the same one at the same size and mtime.
        self.identity = None if self.is_device else ("ssh", self.target.user, self.target.host,
                                                     self.target.port, self.path, self.size, mtime)

    # -- what the remote thing is ------------------------------------------------
    def _connect_and_size(self) -> tuple[int, bool, int | None]:
        for attempt in range(RECONNECTS):
            try:
                sftp = self._link.sftp(self.name)
                if sftp is None:
                    shell = self._dd_shell()
                    return shell.size, shell.kind == "device", None
                return self._sftp_size(sftp)
            except _Lost:
                self._link.drop()
                time.sleep(min(0.5 * 2 ** attempt, 8))
        raise SourceError("the connection kept dropping while opening the file", file=self.name)

    def _dd_shell(self) -> _DdShell:
        try:
            return self._link.dd(self.path, self.name)
        except _RemoteMissing as exc:
            what = str(exc)
            if what == "missing":
                raise SourceError(f"no such device or file on {self.target.host}", file=self.name) from None
            if what == "denied":
                raise _denied(self.name, self.target) from None
            raise SourceError(f"not a device or regular file on {self.target.host}", file=self.name) from None

    def _sftp_size(self, sftp: _Sftp) -> tuple[int, bool, int | None]:
        try:
            attrs = sftp.stat(self.path)
        except _SftpStatus as st:
            if st.code == FX_NO_SUCH_FILE:
                raise SourceError(f"no such device or file on {self.target.host}", file=self.name) from None
            if st.code == FX_PERMISSION_DENIED:
                raise _denied(self.name, self.target) from None
            raise SourceError(f"the server cannot stat it: {st.message}", file=self.name) from None
        mode = attrs.mode or 0
        if stat_mod.S_ISDIR(mode):
            raise SourceError(f"is a directory on {self.target.host}, not a disk or snapshot file", file=self.name)
        handle = self._open_handle(sftp)
        if stat_mod.S_ISBLK(mode) or (stat_mod.S_ISCHR(mode) and not attrs.size):
            real = self._quiet(sftp.realpath, self.path) or self.path
            size = self._sysfs_size(sftp, real)
            if size is None:
                size = self._probe_size(sftp, handle)
            self.notes += self._remote_mounts(sftp, real)
            return size, True, None
        return attrs.size or 0, False, attrs.mtime

    def _open_handle(self, sftp: _Sftp) -> bytes:
        if self._handle is not None and self._handle_gen == self._link.generation:
            return self._handle
        try:
            self._handle = sftp.open(self.path)
        except _SftpStatus as st:
            if st.code == FX_PERMISSION_DENIED:
                raise _denied(self.name, self.target) from None
            if st.code == FX_NO_SUCH_FILE:
                raise SourceError(f"no such device or file on {self.target.host}", file=self.name) from None
            raise SourceError(f"the server cannot open it: {st.message}", file=self.name) from None
        self._handle_gen = self._link.generation
        return self._handle

    @staticmethod
    def _quiet(fn, *args):
        try:
            return fn(*args)
        except _SftpStatus:
            return None

    def _small_file(self, sftp: _Sftp, path: str, limit: int = 1 << 20) -> bytes | None:
        try:
            h = sftp.open(path)
        except _SftpStatus:
            return None
        out = bytearray()
        try:
            while len(out) < limit:
                kind, body = sftp.request(FXP_READ, _string(h) + OFFSET_LEN.pack(len(out), 32768))
                if kind != FXP_DATA:
                    break
                chunk, _ = _take_string(body, 4)
                if not chunk:
                    break
                out += chunk
        finally:
            self._quiet(sftp.close_handle, h)
        return bytes(out)

    def _sysfs_size(self, sftp: _Sftp, real: str) -> int | None:
        raw = self._small_file(sftp, f"/sys/class/block/{posixpath.basename(real)}/size")
        try:
            return int(raw.strip()) * 512 if raw else None   # sysfs counts 512-byte units
        except ValueError:
            return None

    def _probe_size(self, sftp: _Sftp, handle: bytes) -> int:
        """A device's size without sysfs: the first offset a 1-byte READ finds at EOF."""
        def readable(off: int) -> bool:
            kind, body = sftp.request(FXP_READ, _string(handle) + OFFSET_LEN.pack(off, 1))
            return kind == FXP_DATA and U32.unpack_from(body, 4)[0] > 0
        lo, hi = 0, 512
        while readable(hi - 1):
            lo, hi = hi, hi * 2
        while hi - lo > 1:                # size in (lo, hi]: the last readable byte is size - 1
            mid = (lo + hi) // 2
            if readable(mid - 1):
                lo = mid
            else:
                hi = mid
        return lo

    def _remote_mounts(self, sftp: _Sftp, real: str) -> list[str]:
        raw = self._small_file(sftp, "/proc/self/mounts")
        if not raw:
            return []
        notes = []
        base = posixpath.basename(real)
        for line in raw.decode("utf-8", "replace").splitlines():
            f = line.split()
            if len(f) < 4 or not f[0].startswith("/dev/"):
                continue
            dev = posixpath.basename(f[0])
            if (dev == base or (dev.startswith(base) and dev[len(base):].lstrip("p").isdigit())) \
                    and "rw" in f[3].split(","):
                notes.append(f"{f[0]} is mounted read-write on {f[1]} on {self.target.host}: files being written "
                             "may be copied inconsistently (unmount it in the rescue system for an exact copy)")
        return notes

    # -- reading -------------------------------------------------------------------
    @property
    def bytes_fetched(self) -> int:
        return self._link.counter[0]

    @property
    def reconnects(self) -> int:
        return self._link.reconnects

    def _fetch(self, start: int, end: int) -> bytes:
        """Bytes [start, end), pipelined; a dropped connection is re-made and the
        read goes on from what is still missing."""
        buf = bytearray(end - start)
        remaining = [[start, end - start]]
        failures = 0
        while remaining:
            before = sum(n for _, n in remaining)
            try:
                sftp = self._link.sftp(self.name)
                if sftp is None:
                    shell = self._dd_shell()
                    while remaining:
                        off, n = remaining[0]
                        take = min(n, 16 << 20)
                        buf[off - start:off - start + take] = shell.read(off, take)
                        if take == n:
                            remaining.pop(0)
                        else:
                            remaining[0] = [off + take, n - take]
                else:
                    ahead = None
                    if self._readahead and end < self.size:   # a sequential reader: keep the pipe full
                        ahead = (end, min(self._readahead, self.size - end))
                    sftp.read_into(self._open_handle(sftp), remaining, buf, start, ahead)
            except (_Lost, SshConnectError) as exc:
                self._link.drop()
                if isinstance(exc, SshConnectError) and not self._link.reconnects:
                    raise
                failures = 0 if sum(n for _, n in remaining) < before else failures + 1
                if failures >= RECONNECTS:
                    raise SourceError("the connection dropped and could not be re-established "
                                      f"({RECONNECTS} attempts)", file=self.name,
                                      hint="run the command again when the server is reachable") from None
                self._link.reconnects += 1
                time.sleep(min(0.25 * 2 ** failures, 8))
        return bytes(buf)

    def read(self, offset: int, length: int) -> bytes:
        try:
            return super().read(offset, length)
        except SourceError:
            raise
        except DamagedRange:
            raise
        except (OSError, struct.error, IndexError) as exc:
            raise SourceError(f"reading over ssh failed: {exc}", file=self.name) from None

    # -- siblings (backing files, VMDK extents) and the end ---------------------------
    def open_relative(self, name: str) -> "SshSource":
        path = name if name.startswith("/") else posixpath.normpath(posixpath.join(posixpath.dirname(self.path), name))
        target = SshTarget(self.target.user, self.target.host, self.target.port, path)
        return SshSource(target.display(), link=self._link, target=target, **self._opts)

    def close(self) -> None:
        self._drop_cache()
        if self._owns_link:
            self._link.close()

    def __repr__(self) -> str:
        return f"SshSource({self.name!r}, size={getattr(self, 'size', '?')})"

