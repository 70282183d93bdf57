"""Recognise the remote `-o` targets: rsync daemon, rsync over ssh, rclone.

    rsync://HOST[:PORT]/MODULE/PATH/     rsync daemon
    USER@HOST:PATH/  HOST:PATH/          rsync over ssh (like scp/rsync syntax)
    rclone:REMOTE:PATH/                  a tree of files on an rclone remote
    rclone:REMOTE:PATH/NAME.tar.zst      one tarball streamed with `rclone rcat`
                                         (also .tar, .tar.gz, .tgz)

Anything else (a local path, `C:\\out`, `./a:b`, `s3://...`) is not ours:
`parse_remote_target` returns None and the caller treats it as a local target.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import TargetError

RSYNC_DAEMON, RSYNC_SSH, RCLONE_TREE, RCLONE_TAR = "rsync-daemon", "rsync-ssh", "rclone-tree", "rclone-tar"

TAR_SUFFIXES = (".tar.zst", ".tar.gz", ".tgz", ".tar")

# HOST:PATH / USER@HOST:PATH. Host: a name or [IPv6]; user: no '/', ':' or '@'.
_SSH_RE = re.compile(r"^(?:(?P<user>[^/:@\s]+)@)?(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9._-]*):(?P<path>.*)$",
                     re.DOTALL)
_DAEMON_RE = re.compile(r"^rsync://(?:(?P<user>[^/@:]+)(?::(?P<password>[^/@]*))?@)?(?P<host>\[[0-9A-Fa-f:.]+\]|[^/:\[\]]+)(?::(?P<port>\d+))?/(?P<module>[^/]+)(?:/(?P<path>.*))?$",
                        re.DOTALL)
_RCLONE_RE = re.compile(r"^rclone:(?P<remote>[\w.+@ -]+):(?P<path>.*)$", re.DOTALL)


@dataclass
class RemoteTarget:
    kind: str                   # RSYNC_DAEMON, RSYNC_SSH, RCLONE_TREE, RCLONE_TAR
    text: str                   # what the user typed
    dest: str                   # what the tool gets: rsync destination or "REMOTE:PATH"
    host: str | None = None
    port: int | None = None
    user: str | None = None
    module: str | None = None   # rsync daemon module
    remote: str | None = None   # rclone remote name
    path: str = ""              # path below the module / host / remote
    compression: str | None = None  # rclone tarball: None, "gz", "zst"
    password: str | None = field(default=None, repr=False)  # rsync://user:PASS@ (passed as RSYNC_PASSWORD)


def parse_remote_target(target: str) -> RemoteTarget | None:
    """The remote target `target` names, or None when it is a local path.

    Raises TargetError when it is clearly meant as a remote target but malformed
    (rsync:// without a module, a bad port, rclone: without a remote)."""
    if target.startswith("rclone:"):
        return _parse_rclone(target)
    if target.startswith("rsync://"):
        parsed = _parse_daemon(target)
        parsed.text = masked(target)
        return parsed
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", target):
        return None                      # another URL scheme (s3://, http://): not an ssh host
    m = _SSH_RE.match(target)
    if not m:
        return None
    host = m.group("host")
    if len(host) == 1 and m.group("user") is None:
        return None                      # C:\out or C:/out is a Windows drive, not host "C"
    if "\\" in host:
        return None
    path = m.group("path")
    return RemoteTarget(RSYNC_SSH, target, dest=f"{target.rstrip('/')}/" if path.strip("/") else target,
                        host=host.strip("[]"), user=m.group("user"), path=path)


def masked(target: str) -> str:
    """The target as shown in messages: a password in user:pass@ becomes ***."""
    return re.sub(r"^(rsync://[^/@:]+):[^/@]*@", r"\1:***@", target)


def _parse_daemon(target: str) -> RemoteTarget:
    m = _DAEMON_RE.match(target)
    if not m:
        raise TargetError(f"rsync target {masked(target)!r} has no module",
                          hint="write rsync://HOST[:PORT]/MODULE/PATH/")
    port = None
    if m.group("port"):
        port = int(m.group("port"))
        if not 0 < port < 65536:
            raise TargetError(f"rsync target {masked(target)!r}: port {port} is out of range")
    path = (m.group("path") or "").strip("/")
    host, user = m.group("host"), m.group("user")
    dest = (f"rsync://{user + '@' if user else ''}{host}{':%d' % port if port else ''}/{m.group('module')}/"
            f"{path + '/' if path else ''}")
    return RemoteTarget(RSYNC_DAEMON, target, dest=dest, host=host.strip("[]"), port=port, user=user,
                        module=m.group("module"), path=path, password=m.group("password"))


def _parse_rclone(target: str) -> RemoteTarget:
    m = _RCLONE_RE.match(target)
    if not m:
        raise TargetError(f"rclone target {target!r} names no remote",
                          hint="write rclone:REMOTE:PATH/ (see `rclone listremotes`)")
    remote, path = m.group("remote"), m.group("path")
    lower = path.lower()
    for suffix in TAR_SUFFIXES:
        if lower.endswith(suffix) and len(path.rsplit("/", 1)[-1]) > len(suffix):
            compression = {".tar.zst": "zst", ".tar.gz": "gz", ".tgz": "gz", ".tar": None}[suffix]
            return RemoteTarget(RCLONE_TAR, target, dest=f"{remote}:{path}", remote=remote, path=path,
                                compression=compression)
    return RemoteTarget(RCLONE_TREE, target, dest=f"{remote}:{path}", remote=remote, path=path)


def parse_size(text: str) -> int:
    """'1G', '512M', '64k', '1000' -> bytes (binary units), for --scratch-limit."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not m:
        raise TargetError(f"cannot read size {text!r}", hint="write e.g. 512M or 2G")
    factor = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * factor)
