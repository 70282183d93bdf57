"""A minimal read-only NBD server exporting any byte source on a unix socket.

libguestfs (through qemu) reads drives by path or over NBD. A partition of a
qcow2 inside a tar.gz, or an LVM logical volume, is a byte source, not a file:
exporting it over NBD lets the appliance read exactly those bytes, read-only,
with nothing written to disk.

Reference: the NBD protocol, https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md
(fixed newstyle handshake; options EXPORT_NAME, GO, INFO, ABORT; commands READ,
DISC, FLUSH; simple replies). Everything else is answered "unsupported", and
writes get EPERM: the export is read-only.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import tempfile
import threading

from construct import Bytes, Const, Int16ub, Int32ub, Int64ub, Struct

from ..source.base import ByteSource

log = logging.getLogger(__name__)

NBDMAGIC = 0x4E42444D41474943          # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054          # "IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
CLIENT_NO_ZEROES = 2
OPT_EXPORT_NAME, OPT_ABORT, OPT_INFO, OPT_GO = 1, 2, 6, 7
REP_ACK, REP_INFO = 1, 3
REP_ERR_UNSUP, REP_ERR_INVALID = (1 << 31) + 1, (1 << 31) + 3
INFO_EXPORT, INFO_BLOCK_SIZE = 0, 3
TFLAG_HAS_FLAGS, TFLAG_READ_ONLY, TFLAG_SEND_FLUSH, TFLAG_CAN_MULTI_CONN = 1, 2, 4, 1 << 8
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3
EPERM, EIO, EINVAL, ENOTSUP = 1, 5, 22, 95

MAX_READ = 32 << 20                    # qemu asks for at most 32 MiB per request

ServerHello = Struct("magic" / Const(NBDMAGIC, Int64ub), "opt" / Const(IHAVEOPT, Int64ub),
                     "flags" / Int16ub)
OptionHeader = Struct("magic" / Int64ub, "option" / Int32ub, "length" / Int32ub)
OptionReply = Struct("magic" / Const(REPLY_MAGIC, Int64ub), "option" / Int32ub, "type" / Int32ub,
                     "length" / Int32ub)
Request = Struct("magic" / Int32ub, "flags" / Int16ub, "type" / Int16ub, "handle" / Bytes(8),
                 "offset" / Int64ub, "length" / Int32ub)
SimpleReply = Struct("magic" / Const(SIMPLE_REPLY_MAGIC, Int32ub), "error" / Int32ub,
                     "handle" / Bytes(8))

TRANSMISSION_FLAGS = TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN


class _Closed(Exception):
    pass


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise _Closed()
        buf += part
    return bytes(buf)


class NbdExport:
    """Serves `source` read-only at `self.socket_path` until closed; `url` is the
    form qemu and libguestfs take (`unix:/path`)."""

    def __init__(self, source: ByteSource, directory: str | None = None) -> None:
        self.source = source
        # qemu hangs on an export whose size is not a whole number of sectors:
        # round up, the tail reads as zeros.
        self.export_size = -(-source.size // 512) * 512
        self._dir = tempfile.mkdtemp(prefix="rescue-nbd-", dir=directory)
        self.socket_path = os.path.join(self._dir, "export.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.socket_path)
        os.chmod(self.socket_path, 0o600)   # only our user (qemu runs as us)
        self._listener.listen(4)
        self._lock = threading.Lock()       # byte sources are not assumed thread-safe
        self._conns: list[socket.socket] = []
        self._closed = False
        self.bytes_served = 0
        self._thread = threading.Thread(target=self._accept_loop, name="nbd-export", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"unix:{self.socket_path}"

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), name="nbd-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                if self._handshake(conn):
                    self._transmission(conn)
        except (_Closed, ConnectionError, OSError):
            pass
        except Exception:   # a protocol bug must not kill the process; the client sees EOF
            log.exception("NBD export of %s: connection failed", self.source.name)

    def _handshake(self, conn: socket.socket) -> bool:
        conn.sendall(ServerHello.build(dict(flags=FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)))
        (client_flags,) = struct.unpack(">I", _recv(conn, 4))
        no_zeroes = bool(client_flags & CLIENT_NO_ZEROES)
        while True:
            opt = OptionHeader.parse(_recv(conn, 16))
            if opt.magic != IHAVEOPT or opt.length > 65536:
                return False
            data = _recv(conn, opt.length)
            if opt.option == OPT_EXPORT_NAME:   # old-style: no reply header, straight in
                conn.sendall(struct.pack(">QH", self.export_size, TRANSMISSION_FLAGS)
                             + (b"" if no_zeroes else bytes(124)))
                return True
            if opt.option == OPT_ABORT:
                self._reply(conn, opt.option, REP_ACK)
                return False
            if opt.option in (OPT_INFO, OPT_GO):
                if len(data) < 6:
                    self._reply(conn, opt.option, REP_ERR_INVALID)
                    continue
                # any export name is this one export
                self._reply(conn, opt.option, REP_INFO,
                            struct.pack(">HQH", INFO_EXPORT, self.export_size, TRANSMISSION_FLAGS))
                self._reply(conn, opt.option, REP_INFO,   # any alignment, 4 KiB preferred
                            struct.pack(">HIII", INFO_BLOCK_SIZE, 1, 4096, MAX_READ))
                self._reply(conn, opt.option, REP_ACK)
                if opt.option == OPT_GO:
                    return True
                continue
            self._reply(conn, opt.option, REP_ERR_UNSUP)   # STRUCTURED_REPLY, META_CONTEXT, TLS...

    @staticmethod
    def _reply(conn: socket.socket, option: int, kind: int, data: bytes = b"") -> None:
        conn.sendall(OptionReply.build(dict(option=option, type=kind, length=len(data))) + data)

    def _transmission(self, conn: socket.socket) -> None:
        while True:
            req = Request.parse(_recv(conn, 28))
            if req.magic != REQUEST_MAGIC:
                return
            if req.type == CMD_DISC:
                return
            if req.type == CMD_WRITE:
                _recv(conn, req.length)   # drain the payload, then refuse
                conn.sendall(SimpleReply.build(dict(error=EPERM, handle=req.handle)))
                continue
            if req.type == CMD_FLUSH:
                conn.sendall(SimpleReply.build(dict(error=0, handle=req.handle)))
                continue
            if req.type != CMD_READ:
                conn.sendall(SimpleReply.build(dict(error=ENOTSUP, handle=req.handle)))
                continue
            if req.length > MAX_READ or req.offset + req.length > self.export_size:
                conn.sendall(SimpleReply.build(dict(error=EINVAL, handle=req.handle)))
                continue
            try:
                with self._lock:
                    data = self.source.read(req.offset, req.length)
            except OSError as exc:   # DamagedRange and friends: the guest sees an I/O error
                log.warning("%s: read at %d+%d failed: %s", self.source.name, req.offset,
                            req.length, exc)
                conn.sendall(SimpleReply.build(dict(error=EIO, handle=req.handle)))
                continue
            if len(data) < req.length:   # the rounded-up tail, or a window past the disk's end
                data += bytes(req.length - len(data))
            self.bytes_served += len(data)
            conn.sendall(SimpleReply.build(dict(error=0, handle=req.handle)) + data)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        for conn in self._conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            os.unlink(self.socket_path)
            os.rmdir(self._dir)
        except OSError:
            pass

    def __enter__(self) -> "NbdExport":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
