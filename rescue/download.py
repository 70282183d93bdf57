"""`rescue download`: fetch a snapshot so that it survives bad networks.

The data goes to OUT.part and is renamed to OUT only once it is complete and
its checksum (when given) matches, so a file named OUT is always whole. A
small sidecar, OUT.part.meta (JSON), records which version of the remote file
the .part holds (size, ETag, Last-Modified) and, for parallel downloads,
which byte ranges are done. The next run resumes with a Range request guarded
by If-Range, so a file that changed on the server is fetched again from zero
rather than spliced onto old bytes.

References: RFC 9110 section 14 (Range requests) and 13.1.5 (If-Range).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import queue
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import RescueError, SourceError, TargetError
from .extract.copy import write_all_at
from .source.http_client import ChangedError, Http, TransientError, Validators, release

PIECE_SIZE = 8 << 20       # unit of work for parallel downloads (and of their resume)
HASH_CHUNK = 4 << 20
META_VERSION = 1
log = logging.getLogger("rescue.download")

Progress = Callable[[int, "int | None"], None]


class _Stopped(Exception):
    """A parallel worker gives up its piece because another one failed."""


class ChecksumMismatch(RescueError):
    """The downloaded bytes are not the ones the provider listed."""

    layer = "download"


@dataclass
class DownloadResult:
    path: str                     # the final file
    size: int
    fetched: int                  # body bytes received by this run
    resumed_from: int             # bytes already in the .part when this run started
    requests: int
    digests: dict[str, str] = field(default_factory=dict)   # algorithm -> hex, as verified
    warnings: list[str] = field(default_factory=list)


def download(url: str, out: str | os.PathLike, md5: str | None = None,
             sha256: str | None = None, connections: int = 1,
             progress: Progress | None = None, *, force: bool = False,
             retries: int = 5, backoff: float = 0.5, timeout: float = 60.0,
             piece_size: int = PIECE_SIZE, warn: Callable[[str], None] | None = None,
             secrets: tuple[str, ...] = ()) -> DownloadResult:
    """Download URL to OUT, resuming OUT.part and verifying md5/sha256.

    Raises SourceError (URL problems), TargetError (cannot write OUT: exists,
    disk full), ChecksumMismatch (the .part is kept, never renamed)."""
    return _Download(url, Path(out), md5, sha256, max(1, int(connections)), progress, force,
                     retries, backoff, timeout, piece_size, warn, secrets).run()


def _check_hex(name: str, value: str | None, length: int) -> str | None:
    if value is None:
        return None
    v = value.strip().lower()
    if not re.fullmatch(rf"[0-9a-f]{{{length}}}", v):
        raise RescueError(f"--{name} must be {length} hex digits, got {value!r}", layer="download")
    return v


class _Download:
    def __init__(self, url, out: Path, md5, sha256, connections, progress, force, retries,
                 backoff, timeout, piece_size, warn, secrets) -> None:
        self.expect = {k: v for k, v in (("md5", _check_hex("md5", md5, 32)),
                                         ("sha256", _check_hex("sha256", sha256, 64))) if v}
        self.out = out
        self.part = out.with_name(out.name + ".part")
        self.meta = out.with_name(out.name + ".part.meta")
        self.connections = connections
        self.progress = progress
        self.force = force
        self.piece_size = max(1 << 16, piece_size)
        self.http = Http(url, retries=retries, backoff=backoff, timeout=timeout, secrets=secrets)
        self.warnings: list[str] = []
        self._warn_cb = warn
        self.lock = threading.Lock()

    # -- small helpers --------------------------------------------------------
    def warn(self, text: str) -> None:
        self.warnings.append(text)
        (self._warn_cb or log.warning)(text)

    def note(self, text: str) -> None:
        """A retry in progress: shown, not kept as a warning."""
        (self._warn_cb or log.info)(text)

    def tick(self, done: int, total: int | None) -> None:
        if self.progress:
            self.progress(done, total)

    def save_meta(self, size: int | None, vals: Validators, mode: str,
                  done: list[list[int]] | None = None) -> None:
        data = {"version": META_VERSION, "url": self.http.name, "size": size,
                "etag": vals.etag, "last_modified": vals.last_modified, "mode": mode,
                "done": done or []}
        tmp = self.meta.with_name(self.meta.name + ".tmp")
        try:
            tmp.write_text(json.dumps(data))
            os.replace(tmp, self.meta)
        except OSError as e:
            raise self.write_error(e, self.meta) from None

    def load_meta(self) -> dict | None:
        try:
            data = json.loads(self.meta.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("version") != META_VERSION:
            return None
        return data

    def write_error(self, e: OSError, path: Path) -> TargetError:
        if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
            have = self.part.stat().st_size if self.part.exists() else 0
            return TargetError(f"disk full while writing ({have} bytes saved so far)",
                               file=str(path),
                               hint=f"free some space (or pick another -o) and run the same "
                                    f"command again: {self.part.name} resumes")
        return TargetError(f"cannot write: {e.strerror or e}", file=str(path))

    # -- the whole job ----------------------------------------------------------
    def run(self) -> DownloadResult:
        if self.out.is_dir():
            raise TargetError("is a directory; give the file name to write", file=str(self.out))
        if self.out.exists() and not self.force:
            raise TargetError("already exists; not overwriting it", file=str(self.out),
                              hint="pass --force to replace it, or choose another -o")
        if not self.out.parent.is_dir():
            raise TargetError("the folder to write into does not exist", file=str(self.out))
        for attempt in range(2):
            try:
                return self._run_once()
            except ChangedError as e:
                # Changed mid-run (parallel pieces): the .meta now disagrees
                # with the server, so the second pass starts from zero.
                if attempt:
                    raise
                self.warn(f"{e.problem}; starting again from zero")
        raise AssertionError("unreachable")

    def _run_once(self) -> DownloadResult:
        probe = self.http.probe()
        size, vals = probe.size, probe.validators
        done = self._resume_state(probe)
        resumed_from = sum(b - a for a, b in done)
        start_fetched = self.http.bytes_fetched
        parallel = (self.connections > 1 and probe.ranges and size is not None
                    and size - resumed_from > self.piece_size)
        if self.connections > 1 and not probe.ranges:
            self.warn("the server does not support Range requests: one connection only")
        sequential_tail = len(done) == 0 or (len(done) == 1 and done[0][0] == 0)
        if parallel or not sequential_tail:
            # Hashes the file at the end; gaps of an earlier parallel run are
            # filled even with one connection.
            size, digests = self._pieces(size, vals, done, self.connections if parallel else 1)
        else:
            # Streams and hashes as it goes (the resumed prefix is hashed first).
            size, digests = self._sequential(size, vals, done[0][1] if done else 0,
                                             probe.ranges)
        self._verify(digests)
        try:
            os.replace(self.part, self.out)
        except OSError as e:
            raise self.write_error(e, self.out) from None
        try:
            self.meta.unlink()
        except OSError:
            pass
        return DownloadResult(str(self.out), size, self.http.bytes_fetched - start_fetched,
                              resumed_from, self.http.requests, digests, self.warnings)

    def _resume_state(self, probe) -> list[list[int]]:
        """Byte ranges of the .part that hold the current remote version."""
        if not self.part.exists():
            return []
        meta = self.load_meta()
        have = self.part.stat().st_size
        why = None
        if not probe.ranges or probe.size is None:
            why = "the server does not support Range requests, so the partial file cannot be resumed"
        elif meta is None:
            why = f"{self.meta.name} is missing, so the partial file's version is unknown"
        elif not (old := Validators(meta.get("etag"), meta.get("last_modified"))).same_version(
                probe.validators, strict=True):
            why = f"the file changed on the server since the partial download ({old.change(probe.validators)})"
        elif meta.get("size") != probe.size:
            why = f"the file's size changed on the server ({meta.get('size')} -> {probe.size})"
        if why:
            self.warn(f"{why}; starting again from zero")
            self._truncate()
            return []
        if meta["mode"] == "seq":
            return [[0, min(have, probe.size)]] if have else []
        return [[int(a), int(b)] for a, b in meta.get("done", [])
                if 0 <= int(a) < int(b) <= min(have, probe.size)]

    def _truncate(self) -> None:
        try:
            with open(self.part, "r+b") as f:
                f.truncate(0)
        except OSError as e:
            raise self.write_error(e, self.part) from None

    # -- one connection, streaming --------------------------------------------------
    def _sequential(self, size: int | None, vals: Validators, have: int,
                    ranges: bool) -> tuple[int, dict[str, str]]:
        hashers = {k: hashlib.new(k) for k in self.expect}
        try:
            fd = os.open(self.part, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o644)
        except OSError as e:
            raise self.write_error(e, self.part) from None
        state = {"have": have, "size": size, "vals": vals}
        try:
            os.ftruncate(fd, have)
            if have and hashers:
                _hash_range(fd, 0, have, hashers)  # the part already on disk
            self.save_meta(size, vals, "seq")
            self.tick(have, size)

            def once() -> None:
                pos = state["have"]
                if pos and ranges:   # resume: the rest of the version begun, or a 200 to start over
                    resp = self.http.get_range(pos, None, state["vals"], state["size"], full_ok=True)
                else:
                    resp = self.http.open()
                try:
                    if resp.status == 200:
                        got = Validators.from_headers(resp.headers)
                        if pos:
                            if not state["vals"].same_version(got):
                                self.warn("the file changed on the server during the download; "
                                          "starting again from zero")
                            else:
                                self.warn("the server ignored the Range request; starting again "
                                          "from zero")
                        length = resp.headers.get("Content-Length")
                        state["size"] = int(length) if length and length.isdigit() else None
                        state["vals"] = got
                        state["have"] = 0
                        os.ftruncate(fd, 0)
                        for h in list(hashers):
                            hashers[h] = hashlib.new(h)
                        self.save_meta(state["size"], got, "seq")
                    elif resp.status != 206 or not (pos and ranges):
                        raise SourceError(f"unexpected HTTP {resp.status}", file=self.http.name)

                    def take(chunk: bytes) -> None:
                        _write_all(fd, chunk, state["have"], self)
                        for h in hashers.values():
                            h.update(chunk)
                        state["have"] += len(chunk)
                        self.tick(state["have"], state["size"])

                    self.http.receive(resp, take)
                    if state["size"] is not None and state["have"] < state["size"]:
                        raise TransientError(f"connection closed at byte {state['have']} of "
                                             f"{state['size']}")
                finally:
                    release(resp)

            self.http.attempt(once, what="downloading",
                              on_retry=self.note)
            try:
                os.fsync(fd)
            except OSError as e:
                raise self.write_error(e, self.part) from None
        finally:
            os.close(fd)
        return state["have"], {k: h.hexdigest() for k, h in hashers.items()}

    # -- N connections, pieces --------------------------------------------------------
    def _pieces(self, size: int, vals: Validators, done: list[list[int]],
                workers: int) -> tuple[int, dict[str, str]]:
        try:
            fd = os.open(self.part, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o644)
        except OSError as e:
            raise self.write_error(e, self.part) from None
        try:
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)  # sparse; the pieces fill it in
            done = _merge(done)
            self.save_meta(size, vals, "ranges", done)
            todo: queue.Queue = queue.Queue()
            for a, b in _gaps(done, size):
                for p in range(a, b, self.piece_size):
                    todo.put((p, min(b, p + self.piece_size)))
            counter = {"bytes": sum(b - a for a, b in done)}
            self.tick(counter["bytes"], size)
            stop = threading.Event()
            errors: list[BaseException] = []

            def worker() -> None:
                while not stop.is_set():
                    try:
                        a, b = todo.get_nowait()
                    except queue.Empty:
                        return
                    try:
                        self._piece(fd, a, b, size, vals, counter, stop)
                    except _Stopped:
                        return  # another worker failed; this piece stays undone
                    except BaseException as e:  # handed to the main thread
                        errors.append(e)
                        stop.set()
                        return
                    with self.lock:
                        done.append([a, b])
                        done[:] = _merge(done)
                        self.save_meta(size, vals, "ranges", done)

            threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
            for t in threads:
                t.start()
            try:
                for t in threads:
                    while t.is_alive():
                        t.join(0.2)  # a bare join() would not see Ctrl-C
            except BaseException:
                # Workers must stop writing before the file descriptor closes
                # (its number could be reused for another file).
                stop.set()
                for t in threads:
                    t.join()
                raise
            if errors:
                raise errors[0]
            try:
                os.fsync(fd)
            except OSError as e:
                raise self.write_error(e, self.part) from None
            digests = {}
            if self.expect:
                hashers = {k: hashlib.new(k) for k in self.expect}
                _hash_range(fd, 0, size, hashers)
                digests = {k: h.hexdigest() for k, h in hashers.items()}
        finally:
            os.close(fd)
        return size, digests

    def _piece(self, fd: int, a: int, b: int, size: int, vals: Validators,
               counter: dict, stop: threading.Event) -> None:
        def write(at: int, chunk: bytes) -> None:
            _write_all(fd, chunk, at, self)
            with self.lock:
                counter["bytes"] += len(chunk)
                self.tick(counter["bytes"], size)
            if stop.is_set():
                raise _Stopped()

        def retrying(text: str) -> None:
            if stop.is_set():   # another worker failed: no more tries for this piece
                raise _Stopped()
            self.note(text)

        if stop.is_set():
            raise _Stopped()
        self.http.fetch_range(a, b, vals, size, write, what=f"downloading bytes {a}-{b - 1}",
                              on_retry=retrying, no_range_hint="run again with --connections 1")

    # -- verification ------------------------------------------------------------------
    def _verify(self, digests: dict[str, str]) -> None:
        for algo, want in self.expect.items():
            got = digests.get(algo)
            if got != want:
                raise ChecksumMismatch(
                    f"{algo} mismatch: expected {want}, got {got}", file=str(self.part),
                    hint=f"the download is kept as {self.part.name} for inspection and not "
                         f"renamed; delete it and {self.meta.name} to download it again")


def _write_all(fd: int, data: bytes, offset: int, job: _Download) -> None:
    try:
        write_all_at(fd, data, offset)
    except OSError as e:
        raise job.write_error(e, job.part) from None


def _hash_range(fd: int, start: int, end: int, hashers: dict) -> None:
    pos = start
    while pos < end:
        n = min(HASH_CHUNK, end - pos)
        data = os.pread(fd, n, pos) if hasattr(os, "pread") else _seek_read(fd, n, pos)
        if not data:
            break
        for h in hashers.values():
            h.update(data)
        pos += len(data)


def _seek_read(fd: int, n: int, offset: int) -> bytes:
    os.lseek(fd, offset, os.SEEK_SET)
    return os.read(fd, n)


def _merge(ranges: list[list[int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _gaps(done: list[list[int]], size: int) -> list[tuple[int, int]]:
    gaps, pos = [], 0
    for a, b in _merge(done):
        if a > pos:
            gaps.append((pos, a))
        pos = max(pos, b)
    if pos < size:
        gaps.append((pos, size))
    return gaps
