"""A real HTTP/1.1 server on 127.0.0.1 for the download and remote-read tests.

It serves files from disk the way nginx/S3 do: Range (single ranges), 206 +
Content-Range, 416, If-Range, ETag (from inode, size and mtime, so a replaced
file gets a new one) and Last-Modified, keep-alive. Switches put it into the
failure modes the tests need: no Range support, forced status with an S3-style
body, dropped connections after N bytes, transient 503s, slow bodies.
"""

from __future__ import annotations

import email.utils
import os
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import pytest

EXPIRED_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
                b'<Message>Request has expired</Message><Expires>2024-01-01T00:00:00Z</Expires>'
                b'</Error>')
DENIED_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
               b'<Message>Access Denied</Message></Error>')


@dataclass
class LogEntry:
    method: str
    path: str
    range: str | None
    if_range: str | None
    status: int
    sent: int = 0


@dataclass
class Modes:
    no_range: bool = False          # ignore Range, always 200 with the whole file
    probe_range_only: bool = False  # honour only `bytes=0-0` (a CDN that lies about Range)
    status: int | None = None       # answer every file request with this status
    body: bytes = b""               # ... and this body
    drop_after: int | None = None   # close the connection after N body bytes per response
    fail_times: int = 0             # answer the next N requests with 503
    budget: int | None = None       # body bytes the server sends in total before it cuts every response
    slow: float = 0.0               # seconds to sleep per 64 KiB chunk
    no_validators: bool = False     # send neither ETag nor Last-Modified


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.files: dict[str, str] = {}
        self.routes: dict[str, Callable[[dict[str, list[str]]], tuple[int, str, bytes]]] = {}
        self.modes = Modes()
        self.log: list[LogEntry] = []
        self.lock = threading.Lock()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + "/" + path.lstrip("/")

    def serve(self, path: str, local: str | os.PathLike) -> str:
        self.files["/" + path.lstrip("/")] = os.fspath(local)
        return self.url(path)

    def body_bytes_sent(self, path: str | None = None) -> int:
        with self.lock:
            return sum(e.sent for e in self.log if path is None or e.path == "/" + path.lstrip("/"))

    def reset(self) -> None:
        with self.lock:
            self.modes = Modes()
            self.log.clear()


def etag_of(path: str) -> str:
    st = os.stat(path)
    return f'"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"'


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_HEAD(self) -> None:
        self.do_GET(head=True)

    def do_GET(self, head: bool = False) -> None:
        parts = urllib.parse.urlsplit(self.path)
        entry = LogEntry(self.command, parts.path, self.headers.get("Range"),
                         self.headers.get("If-Range"), 0)
        with self.server.lock:
            self.server.log.append(entry)
            modes = self.server.modes
            transient = modes.fail_times > 0
            if transient:
                modes.fail_times -= 1
        if parts.path in self.server.routes:
            status, ctype, body, *extra = self.server.routes[parts.path](
                urllib.parse.parse_qs(parts.query))
            return self._simple(entry, status, body, ctype, extra[0] if extra else {})
        if transient:
            return self._simple(entry, 503, b"busy, try later")
        local = self.server.files.get(parts.path)
        if local is None or not os.path.exists(local):
            return self._simple(entry, 404, b"<Error><Code>NoSuchKey</Code></Error>")
        if modes.status:
            return self._simple(entry, modes.status, modes.body)
        self._file(entry, local, modes, head)

    def _simple(self, entry: LogEntry, status: int, body: bytes,
                ctype: str = "application/xml", headers: dict | None = None) -> None:
        entry.status = status
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        entry.sent = len(body)
        self.wfile.write(body)

    def _file(self, entry: LogEntry, local: str, modes: Modes, head: bool) -> None:
        st = os.stat(local)
        size = st.st_size
        etag = etag_of(local)
        last_mod = email.utils.formatdate(st.st_mtime, usegmt=True)
        start, end, status = 0, size - 1, 200
        rng = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        honoured = not modes.no_range and not (modes.probe_range_only and rng != "bytes=0-0")
        if rng and honoured and (if_range is None or if_range in (etag, last_mod)):
            first, _, last = rng.removeprefix("bytes=").partition("-")
            if first == "":
                start, end = max(0, size - int(last)), size - 1
            else:
                start = int(first)
                end = min(int(last), size - 1) if last else size - 1
            if start >= size or start > end:
                entry.status = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        entry.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        if not modes.no_range:
            self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        if not modes.no_validators:
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", last_mod)
        self.end_headers()
        if head:
            return
        with open(local, "rb") as f:
            pos = start
            while pos <= end:
                n = min(64 << 10, end - pos + 1)
                cut = modes.drop_after is not None and entry.sent + n > modes.drop_after
                if cut:
                    n = modes.drop_after - entry.sent
                with self.server.lock:
                    if modes.budget is not None and n > modes.budget:
                        n, cut = modes.budget, True
                    if modes.budget is not None:
                        modes.budget -= max(n, 0)
                if cut:
                    if n > 0:
                        entry.sent += n
                        self.wfile.write(os.pread(f.fileno(), n, pos))
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                entry.sent += n  # counted before sending: the client may finish first
                try:
                    self.wfile.write(os.pread(f.fileno(), n, pos))
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True
                    return
                pos += n
                if modes.slow:
                    time.sleep(modes.slow)


@pytest.fixture
def http_server():
    server = Server()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
