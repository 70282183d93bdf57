"""KiwiVM (BandwagonHost, 64clouds) snapshots: list them, download one.

KiwiVM's snapshot of a KVM VPS is a `.tar.gz` holding one raw `.disk`;
`rescue` reads it in place once it is downloaded. The API (KiwiVM panel ->
API) is `GET {base}/v1/snapshot/list?veid=ID&api_key=KEY`, answering
`{"error": 0, "snapshots": [{fileName, os, description, size, md5, sticky,
purgesIn, downloadLink, downloadLinkSSL}, ...]}` or, on failure,
`{"error": 700005, "message": "..."}`.

The API key is a password for the whole VPS: it is never printed or logged;
every message that could contain it goes through `_mask`.
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..download import DownloadResult, Progress, download
from ..errors import RescueError, TargetError
from ..source.http_client import Http, release, redact_url

DEFAULT_API_URL = "https://api.64clouds.com"
ENV_API_URL = "RESCUE_KIWIVM_API_URL"
ENV_API_KEY = "RESCUE_KIWIVM_API_KEY"
MAX_ANSWER = 4 << 20     # a snapshot list is a few KiB; refuse anything absurd


class KiwiVMError(RescueError):
    layer = "kiwivm"


@dataclass
class Snapshot:
    file_name: str
    os: str
    description: str
    size: int | None
    md5: str | None
    sticky: bool
    purges_in: int | None          # seconds until KiwiVM deletes it
    download_link: str | None
    download_link_ssl: str | None

    def to_json(self) -> dict:
        """The API's own field names, so scripts can rely on the documented JSON."""
        return {"fileName": self.file_name, "os": self.os, "description": self.description,
                "size": self.size, "md5": self.md5, "sticky": self.sticky,
                "purgesIn": self.purges_in, "downloadLink": self.download_link,
                "downloadLinkSSL": self.download_link_ssl}


def api_settings(api_key: str | None = None, api_url: str | None = None) -> tuple[str, str]:
    """The key and base URL from arguments, else the environment."""
    key = api_key or os.environ.get(ENV_API_KEY) or ""
    base = (api_url or os.environ.get(ENV_API_URL) or DEFAULT_API_URL).rstrip("/")
    if not key:
        raise KiwiVMError("no API key given",
                          hint=f"set {ENV_API_KEY} (KiwiVM panel -> API -> API key); "
                               f"--api-key also works but stays in your shell history")
    if not base.lower().startswith(("http://", "https://")):
        raise KiwiVMError(f"the API URL must start with https:// (got {redact_url(base)!r})")
    return key, base


def list_snapshots(veid: str | int, api_key: str | None = None, api_url: str | None = None, *,
                   retries: int = 3, backoff: float = 0.5, timeout: float = 30.0) -> list[Snapshot]:
    """The snapshots KiwiVM keeps for VPS `veid`."""
    key, base = api_settings(api_key, api_url)
    veid = _check_veid(veid)
    query = urllib.parse.urlencode({"veid": veid, "api_key": key})
    http = Http(f"{base}/v1/snapshot/list?{query}", retries=retries, backoff=backoff,
                timeout=timeout, secrets=(key,))

    def once() -> bytes:
        resp = http.open()
        try:
            body = resp.read(MAX_ANSWER + 1)
        finally:
            release(resp)
        if len(body) > MAX_ANSWER:
            raise KiwiVMError(f"the API answer is larger than {MAX_ANSWER} bytes", file=http.name)
        return body

    try:
        body = http.attempt(once, what="asking the KiwiVM API")
    except RescueError as e:
        raise _masked(e, key) from None
    return parse_snapshot_list(body, key, http.name)


def parse_snapshot_list(body: bytes, api_key: str = "", where: str = "KiwiVM API") -> list[Snapshot]:
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise KiwiVMError(f"the API did not answer JSON: {_mask(_clip(body), api_key)!r}",
                          file=where, hint="check --api-url (default " + DEFAULT_API_URL + ")") from None
    if not isinstance(data, dict):
        raise KiwiVMError(f"unexpected API answer: a JSON {type(data).__name__}", file=where)
    code = data.get("error", 0)
    if code not in (0, "0", None):
        message = _mask(str(data.get("message") or "no message"), api_key)
        raise KiwiVMError(f"API error {code}: {message}", file=where,
                          hint="check --veid and the API key (KiwiVM panel -> API); a key "
                               "limited to some calls needs the snapshot permissions")
    raw = data.get("snapshots")
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise KiwiVMError(f"'snapshots' is a JSON {type(raw).__name__}, not a list", file=where)
    snaps = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("fileName"), str):
            raise KiwiVMError(f"snapshot #{i} has no fileName", file=where)
        snaps.append(Snapshot(
            file_name=item["fileName"], os=str(item.get("os") or ""),
            description=str(item.get("description") or ""), size=_int(item.get("size")),
            md5=(str(item["md5"]).strip().lower() or None) if item.get("md5") else None,
            sticky=_bool(item.get("sticky")), purges_in=_int(item.get("purgesIn")),
            download_link=item.get("downloadLink") or None,
            download_link_ssl=item.get("downloadLinkSSL") or None))
    return snaps


def choose_snapshot(snaps: list[Snapshot], file_name: str | None = None,
                    latest: bool = False) -> Snapshot:
    """The snapshot asked for by name, or the newest with `latest`.

    The list carries no creation time; KiwiVM deletes a non-sticky snapshot
    a fixed time after it was made, so the one purged last is the newest."""
    if not snaps:
        raise KiwiVMError("this VPS has no snapshots",
                          hint="create one in KiwiVM -> Snapshots (the VPS may stay stopped)")
    names = ", ".join(s.file_name for s in snaps)
    if file_name:
        for s in snaps:
            if s.file_name == file_name:
                return s
        raise KiwiVMError(f"no snapshot named {file_name!r}; there are: {names}",
                          hint="rescue snapshots kiwivm --veid ID lists them")
    if len(snaps) == 1:
        return snaps[0]
    if not latest:
        raise KiwiVMError(f"{len(snaps)} snapshots: {names}",
                          hint="pick one with --snapshot FILE, or use --latest")
    dated = [s for s in snaps if not s.sticky and s.purges_in is not None]
    if not dated:
        raise KiwiVMError(f"cannot tell which snapshot is newest (all sticky): {names}",
                          hint="pick one with --snapshot FILE")
    return max(dated, key=lambda s: s.purges_in)


def download_snapshot(veid: str | int, out_dir: str | os.PathLike, *, api_key: str | None = None,
                      api_url: str | None = None, snapshot: str | None = None,
                      latest: bool = False, connections: int = 1,
                      progress: Progress | None = None, force: bool = False,
                      warn: Callable[[str], None] | None = None, retries: int = 5,
                      backoff: float = 0.5,
                      on_chosen: Callable[[Snapshot], None] | None = None
                      ) -> tuple[Snapshot, DownloadResult]:
    """Download one snapshot into OUT_DIR/fileName, verifying the listed md5."""
    key, base = api_settings(api_key, api_url)
    snaps = list_snapshots(veid, key, base, retries=retries, backoff=backoff)
    snap = choose_snapshot(snaps, snapshot, latest)
    name = _safe_name(snap.file_name)
    link = snap.download_link_ssl or snap.download_link
    if not link:
        raise KiwiVMError(f"snapshot {name} has no download link")
    if not snap.download_link_ssl and warn:
        warn("the API gave only a plain-http link; downloading without TLS (the md5 still "
             "guards the content)")
    if not snap.md5 and warn:
        warn(f"the API lists no md5 for {name}; the download cannot be verified")
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise TargetError("exists and is not a folder; -o takes the folder to write into",
                          file=str(folder))
    try:
        folder.mkdir(exist_ok=True)
    except OSError as e:
        raise TargetError(f"cannot create the folder: {e.strerror or e}", file=str(folder)) from None
    if on_chosen:
        on_chosen(snap)
    try:
        result = download(link, folder / name, md5=snap.md5, connections=connections,
                          progress=progress, force=force, warn=warn, retries=retries,
                          backoff=backoff, secrets=(key,))
    except RescueError as e:
        raise _masked(e, key) from None
    return snap, result


def _check_veid(veid: str | int) -> str:
    text = str(veid).strip()
    if not re.fullmatch(r"\d{1,12}", text):
        raise KiwiVMError(f"--veid must be the VPS's numeric id, got {text!r}",
                          hint="KiwiVM panel -> API shows the VEID next to the key")
    return text


def _safe_name(name: str) -> str:
    """fileName comes from the network: one plain file name, nothing else."""
    if (not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
            or len(name) > 255 or name.startswith(".")):
        raise KiwiVMError(f"refusing the snapshot file name {name!r} from the API",
                          hint="it must be a plain file name")
    return name


def _int(value) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def _bool(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


def _clip(body: bytes) -> str:
    return body[:120].decode("utf-8", "replace")


def _mask(text: str, key: str) -> str:
    if key:
        text = text.replace(key, "***").replace(urllib.parse.quote(key, safe=""), "***")
    return re.sub(r"(api_key=)[^&\s'\"]+", r"\1***", text)


def _masked(e: RescueError, key: str) -> RescueError:
    """The same error with the key scrubbed from every part of it."""
    e.problem = _mask(e.problem, key)
    e.args = (e.problem,)
    if e.file:
        e.file = _mask(e.file, key)
    if e.hint:
        e.hint = _mask(e.hint, key)
    return e
