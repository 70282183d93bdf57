"""HTTP plumbing shared by lazy remote reads and `rescue download`.

One urllib3 PoolManager per process (persistent keep-alive connections,
thread-safe), a probe that finds size, Range support and the validators
(ETag / Last-Modified) of a URL, our own retry loop with backoff (urllib3's
retries are off so a half-received body can be resumed rather than
restarted), and the mapping of HTTP failures to one clear `SourceError`.

References: RFC 9110 sections 13.1.5 (If-Range), 14 (Range requests:
206, Content-Range, 416), 8.8 (validators).
"""

from __future__ import annotations

import os
import re
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Callable, Iterator

import urllib3
from urllib3.exceptions import (HTTPError, MaxRetryError, NameResolutionError,
                                NewConnectionError, ProtocolError, ProxyError,
                                SSLError, TimeoutError as Urllib3Timeout)

from ..errors import SourceError

USER_AGENT = "rescue/0.1 (+https://github.com/; disaster-recovery reader)"
# Statuses worth another try: the server or a proxy is busy or restarting.
TRANSIENT_STATUSES = {408, 425, 429, 500, 502, 503, 504}
# Query parameters that carry secrets (pre-signed URLs, API keys).
_SECRET_PARAM = re.compile(r"(sig|key|token|credential|secret|password|passwd|auth|policy)",
                           re.IGNORECASE)
_EXPIRED_BODY = re.compile(rb"Request has expired|ExpiredToken|expired|AuthenticationFailed.*"
                           rb"(?:expir|Signed expiry)", re.IGNORECASE | re.DOTALL)

_pools: dict[str, urllib3.PoolManager] = {}
_pools_lock = threading.Lock()


def is_url(spec: object) -> bool:
    return isinstance(spec, str) and spec[:8].lower().startswith(("http://", "https://"))


def redact_url(url: str, secrets: tuple[str, ...] = ()) -> str:
    """The URL with credentials masked: user:password@, and query values whose
    name looks secret (X-Amz-Signature, api_key, sig, token, ...)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        query = "&".join(f"{k}=***" if _SECRET_PARAM.search(k) else
                         f"{k}={urllib.parse.quote(v, safe='/:.-_~')}" for k, v in pairs)
    text = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***").replace(urllib.parse.quote(secret, safe=""), "***")
    return text


def _ca_certs() -> str | None:
    # certifi gives the same trust store on Linux, macOS (python.org builds
    # ship without one) and Windows; SSL_CERT_FILE overrides for corporate CAs.
    if os.environ.get("SSL_CERT_FILE"):
        return os.environ["SSL_CERT_FILE"]
    try:
        import certifi
        return certifi.where()
    except ImportError:  # pragma: no cover - certifi is a dependency
        return None


def pool_for(url: str) -> urllib3.PoolManager:
    """The shared pool for this URL, through the environment's proxy if any
    (HTTPS_PROXY / HTTP_PROXY / NO_PROXY, as curl and requests do)."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    host = urllib.parse.urlsplit(url).hostname or ""
    proxy = urllib.request.getproxies().get(scheme)
    if proxy and urllib.request.proxy_bypass(host):
        proxy = None
    key = proxy or ""
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            kw = dict(num_pools=8, maxsize=16, ca_certs=_ca_certs(),
                      headers={"User-Agent": USER_AGENT})
            pool = urllib3.ProxyManager(proxy, **kw) if proxy else urllib3.PoolManager(**kw)
            _pools[key] = pool
        return pool


@dataclass
class Validators:
    """What identifies one version of a remote file."""

    etag: str | None = None
    last_modified: str | None = None

    @classmethod
    def from_headers(cls, headers) -> "Validators":
        return cls(headers.get("ETag"), headers.get("Last-Modified"))

    def if_range(self) -> str | None:
        # RFC 9110 13.1.5: If-Range needs a strong ETag, else a Last-Modified date.
        if self.etag and not self.etag.startswith("W/"):
            return self.etag
        return self.last_modified

    def known(self) -> bool:
        return bool(self.etag or self.last_modified)

    def same_version(self, other: "Validators", *, strict: bool = False) -> bool:
        """True when both name the same version: the ETag decides when both have
        one, else Last-Modified. With neither in common, lenient (within one run:
        only a positive difference counts) says True, strict (between runs) False."""
        if self.etag and other.etag:
            return self.etag == other.etag
        if self.last_modified and other.last_modified:
            return self.last_modified == other.last_modified
        return not strict

    def change(self, other: "Validators") -> str:
        """What tells the two versions apart, for a message."""
        if self.etag or other.etag:
            return f"ETag {self.etag} -> {other.etag}"
        return f"Last-Modified {self.last_modified} -> {other.last_modified}"


@dataclass
class Probe:
    url: str
    size: int | None
    ranges: bool
    validators: Validators
    status: int


class Http:
    """Requests with one policy: timeouts, our own retries with backoff, and
    clear errors. `name` is the redacted URL used in every message."""

    def __init__(self, url: str, *, retries: int = 5, backoff: float = 0.5,
                 timeout: float = 60.0, secrets: tuple[str, ...] = (),
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.url = url
        self.secrets = secrets
        self.name = redact_url(url, secrets)
        self.retries = retries
        self.backoff = backoff
        self.timeout = urllib3.Timeout(connect=min(timeout, 20.0), read=timeout)
        self.sleep = sleep
        self.pool = pool_for(url)
        self.requests = 0
        self.bytes_fetched = 0
        self._lock = threading.Lock()

    # -- single request ---------------------------------------------------
    def open(self, headers: dict[str, str] | None = None, method: str = "GET"):
        """Send one request; return the response with its body unread.
        Raises SourceError (permanent) or TransientError (worth a retry)."""
        hdrs = {"Accept-Encoding": "identity"}
        hdrs.update(headers or {})
        with self._lock:
            self.requests += 1
        try:
            resp = self.pool.request(method, self.url, headers=hdrs, preload_content=False,
                                     decode_content=False, timeout=self.timeout,
                                     retries=urllib3.Retry(total=None, connect=0, read=0,
                                                           status=0, other=0, redirect=10,
                                                           raise_on_status=False))
        except MaxRetryError as e:
            raise self._network_error(e.reason or e) from None
        except HTTPError as e:
            raise self._network_error(e) from None
        if resp.status in TRANSIENT_STATUSES:
            body = _peek(resp)
            raise TransientError(f"HTTP {resp.status} {resp.reason or ''}".strip(), body=body)
        if resp.status >= 400:
            body = _peek(resp)
            raise self.status_error(resp.status, body)
        return resp

    def status_error(self, status: int, body: bytes) -> SourceError:
        snippet = _body_text(body)
        if status == 404:
            return SourceError("not found on the server (HTTP 404)", file=self.name,
                               hint="check the URL; provider download links often point to "
                                    "a snapshot that was deleted or has been purged")
        if status in (401, 403, 400) and _EXPIRED_BODY.search(body or b""):
            return SourceError(f"the download link has expired (HTTP {status}{snippet})",
                               file=self.name,
                               hint="get a fresh link from the provider's panel or API and run "
                                    "the same command again; a partial download resumes")
        if status == 403:
            return SourceError(f"access denied (HTTP 403{snippet})", file=self.name,
                               hint="the link may be private, mistyped, or signed for another "
                                    "method; get a new download link from the provider")
        if status == 401:
            return SourceError("the server wants a login (HTTP 401)", file=self.name,
                               hint="use a pre-signed or public download link")
        if status == 410:
            return SourceError("gone from the server (HTTP 410)", file=self.name)
        return SourceError(f"the server answered HTTP {status}{snippet}", file=self.name)

    def _network_error(self, e: BaseException) -> Exception:
        host = urllib.parse.urlsplit(self.url).netloc.rsplit("@", 1)[-1]
        if isinstance(e, NameResolutionError):
            return SourceError(f"cannot resolve host {urllib.parse.urlsplit(self.url).hostname!r}",
                               file=self.name, hint="check the URL and your network/DNS")
        if isinstance(e, SSLError):
            return SourceError(f"TLS error talking to {host}: {_short(e)}", file=self.name,
                               hint="set SSL_CERT_FILE to your CA bundle if a proxy re-signs TLS")
        if isinstance(e, NewConnectionError) and "refused" in str(e).lower():
            return TransientError(f"connection refused by {host}", refused=True)
        if isinstance(e, ProxyError):
            return TransientError(f"proxy error: {_short(e)}")
        if isinstance(e, (Urllib3Timeout, ProtocolError, NewConnectionError, HTTPError, OSError)):
            return TransientError(f"{type(e).__name__}: {_short(e)}")
        return TransientError(str(e))

    # -- retry policy -----------------------------------------------------
    def attempt(self, fn: Callable[[], object], *, what: str,
                on_retry: Callable[[str], None] | None = None):
        """Call fn() until it succeeds, retrying TransientError with exponential
        backoff (0.5 s, 1 s, 2 s, ... capped at 30 s). `fn` may itself make
        progress between failures: it then raises ProgressMade and the count
        of consecutive failures starts over."""
        failures = 0
        while True:
            try:
                return fn()
            except (TransientError, ProgressMade) as exc:
                # A failure after some progress counts as the first of a new run.
                failures = 1 if isinstance(exc, ProgressMade) else failures + 1
                e = exc.cause if isinstance(exc, ProgressMade) else exc
                if failures > self.retries:
                    raise e.final(self.name, what, failures) from None
                delay = min(self.backoff * (2 ** (failures - 1)), 30.0)
                if on_retry:
                    on_retry(f"{what}: {e.problem}; retry {failures}/{self.retries} in {delay:.1f}s")
                self.sleep(delay)

    # -- probe ------------------------------------------------------------
    def probe(self) -> Probe:
        """Size, Range support and validators, with one `Range: bytes=0-0` GET.
        (A GET, not HEAD: pre-signed S3/OSS links are signed for GET only.)"""
        def once() -> Probe:
            resp = self.open({"Range": "bytes=0-0"})
            try:
                vals = Validators.from_headers(resp.headers)
                if resp.status == 206:
                    total = _content_range_total(resp.headers.get("Content-Range"))
                    self._drain(resp, 2)
                    return Probe(self.url, total, total is not None, vals, 206)
                if resp.status == 416:  # an empty file has no byte 0
                    total = _content_range_total(resp.headers.get("Content-Range"))
                    return Probe(self.url, total if total is not None else 0, True, vals, 416)
                length = resp.headers.get("Content-Length")
                size = int(length) if length and length.isdigit() else None
                return Probe(self.url, size, False, vals, resp.status)
            finally:
                _discard(resp)
        return self.attempt(once, what="probing")

    # -- ranged reads -----------------------------------------------------
    def get_range(self, start: int, end: int | None, pinned: Validators, size: int | None, *,
                  full_ok: bool = False, no_range_hint: str | None = None):
        """One GET of bytes [start, end) (to the end of the file when `end` is
        None) of the version `pinned` names (If-Range, RFC 9110 13.1.5). Returns
        the response, body unread, once the answer is checked: a 206 starting at
        `start`, not past `end`, of a file still `size` bytes long and the same
        version. A 200 (the server ignored Range, or If-Range failed because the
        file changed) raises, unless `full_ok`: then the caller starts over."""
        headers = {"Range": f"bytes={start}-{'' if end is None else end - 1}"}
        tag = pinned.if_range()
        if tag:
            headers["If-Range"] = tag
        resp = self.open(headers)
        try:
            got = Validators.from_headers(resp.headers)
            if resp.status == 200 and full_ok:
                return resp
            if not pinned.same_version(got):
                raise self.changed(pinned.change(got))
            if resp.status == 200:
                raise SourceError("the server stopped honouring Range requests mid-read", file=self.name,
                                  hint=no_range_hint or "download the file first with rescue download")
            if resp.status != 206:
                raise SourceError(f"unexpected HTTP {resp.status} to a Range request", file=self.name)
            cr = content_range(resp.headers.get("Content-Range"))
            if cr is None or cr[0] != start or (end is not None and cr[1] > end - 1):
                raise SourceError(f"the server answered the wrong range (Content-Range "
                                  f"{resp.headers.get('Content-Range')!r} for {headers['Range']})",
                                  file=self.name)
            if cr[2] is not None and size is not None and cr[2] != size:
                raise self.changed(f"size went from {size} to {cr[2]} bytes")
            return resp
        except BaseException:
            release(resp)
            raise

    def changed(self, detail: str) -> "ChangedError":
        return ChangedError(f"the file changed on the server while it was being read ({detail})",
                            file=self.name, hint="run the command again to read the new version")

    def receive(self, resp, write: Callable[[bytes], None], chunk: int = 1 << 20) -> int:
        """Hand the body to `write` chunk by chunk, counting it; a connection
        dropped after some bytes is ProgressMade (the retry budget starts over)."""
        received = 0
        try:
            for data in iter_body(resp, chunk):
                self.count(len(data))
                write(data)
                received += len(data)
        except TransientError as e:
            if received:
                raise ProgressMade(e) from None
            raise
        return received

    def fetch_range(self, start: int, end: int, pinned: Validators, size: int | None,
                    write: Callable[[int, bytes], None], *, what: str,
                    on_retry: Callable[[str], None] | None = None, no_range_hint: str | None = None) -> None:
        """Bytes [start, end) of the version `pinned`, handed in order to
        write(offset, data): one ranged GET, resumed where it stopped after a
        drop (retries with backoff), every answer checked (get_range)."""
        pos = [start]

        def take(data: bytes) -> None:
            data = data[:end - pos[0]]
            write(pos[0], data)
            pos[0] += len(data)

        def once() -> None:
            resp = self.get_range(pos[0], end, pinned, size, no_range_hint=no_range_hint)
            try:
                self.receive(resp, take, min(end - start, 1 << 20))
                if pos[0] < end:
                    raise TransientError(f"connection closed at byte {pos[0]} of {start}-{end - 1}")
            finally:
                release(resp)

        self.attempt(once, what=what, on_retry=on_retry)

    def _drain(self, resp, limit: int) -> bytes:
        data = resp.read(limit)
        self.count(len(data))
        return data

    def count(self, n: int) -> None:
        with self._lock:
            self.bytes_fetched += n


class TransientError(SourceError):
    """Worth another try (timeout, reset, 5xx, 429)."""

    def __init__(self, problem: str, *, body: bytes = b"", refused: bool = False) -> None:
        super().__init__(problem)
        self.body = body
        self.refused = refused

    def final(self, name: str, what: str, attempts: int) -> SourceError:
        if self.refused:
            return SourceError(f"{self.problem} (after {attempts} attempts)", file=name,
                               hint="is the server up? check the host and port in the URL")
        return SourceError(f"{what} failed after {attempts} attempts: {self.problem}", file=name,
                           hint="the network or server is unreliable; run the command again "
                                "(downloads resume where they stopped)")


class ProgressMade(Exception):
    """Raised inside an attempt() callback after a failure that still moved
    data forward: the retry budget starts over."""

    def __init__(self, cause: TransientError) -> None:
        super().__init__(cause.problem)
        self.cause = cause


class ChangedError(SourceError):
    """The remote file is not the version we started with."""


def _content_range_total(value: str | None) -> int | None:
    m = re.match(r"\s*bytes\s+(?:\d+-\d+|\*)/(\d+)", value or "")
    return int(m.group(1)) if m else None


def content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """(first, last, total) from 'bytes first-last/total' (total may be '*')."""
    m = re.match(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)", value or "")
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), (None if m.group(3) == "*" else int(m.group(3)))


def _peek(resp, limit: int = 4096) -> bytes:
    try:
        return resp.read(limit) or b""
    except Exception:
        return b""
    finally:
        _discard(resp)


def release(resp) -> None:
    _discard(resp)


def _discard(resp) -> None:
    """Give the connection back without reading an unwanted body (a 200 for a
    50 GiB file must not be drained): close it, the pool reconnects."""
    try:
        if getattr(resp, "length_remaining", None) != 0 and not resp.isclosed():
            resp.close()  # unread body left: this connection cannot be reused
        resp.release_conn()
    except Exception:
        pass


def _body_text(body: bytes) -> str:
    text = (body or b"")[:2000].decode("utf-8", "replace")
    m = re.search(r"<Code>([^<]{1,60})</Code>\s*<Message>([^<]{1,200})</Message>", text)
    if m:
        return f": {m.group(1)}: {m.group(2)}"
    return ""


def _short(e: BaseException) -> str:
    text = str(e)
    # urllib3 messages repeat the connection object; keep the useful tail.
    text = re.sub(r"<urllib3[^>]*>:?\s*", "", text)
    return text[:200]


def iter_body(resp, chunk: int = 1 << 20) -> Iterator[bytes]:
    """Body chunks; a dropped connection becomes TransientError."""
    try:
        while True:
            data = resp.read(chunk)
            if not data:
                return
            yield data
    except (HTTPError, OSError) as e:
        raise TransientError(f"connection lost mid-transfer ({type(e).__name__})") from None
