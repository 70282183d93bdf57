"""Pick a sink from what the user typed after -o."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..errors import TargetError
from .base import Sink


@dataclass
class TargetOptions:
    devices: bool = False            # --devices: create device nodes (root only)
    keep_setuid: bool | None = None  # --keep-setuid
    force: bool = False              # overwrite an existing output file
    rsync_opts: list[str] = field(default_factory=list)
    scratch_limit: int = 1 << 30


def is_directory_target(target: str) -> bool:
    return target.endswith(("/", os.sep)) or os.path.isdir(target)


def open_sink(target: str, options: TargetOptions | None = None) -> Sink:
    """-o OUT.tar|.tar.gz|.tar.zst | - | DIR/ (remote targets: see rsync/rclone sinks)."""
    options = options or TargetOptions()
    remote = _open_remote(target, options)
    if remote is not None:
        return remote
    if target == "-":
        from .tar_sink import TarSink
        return TarSink("-")
    if is_directory_target(target):
        from .dir_sink import DirectorySink
        return DirectorySink(target, devices=options.devices, keep_setuid=options.keep_setuid)
    lower = target.lower()
    if lower.endswith((".tar", ".tar.gz", ".tgz", ".tar.zst", ".tzst", ".tar.zstd")):
        if os.path.exists(target) and not options.force:
            raise TargetError("the output file exists already", file=target,
                              hint="choose another name or add --force")
        from .tar_sink import TarSink
        return TarSink(target)
    raise TargetError("cannot tell what kind of output this is", file=target,
                      hint="end the name in .tar, .tar.gz or .tar.zst, end a directory with '/', or use '-'")


def _open_remote(target: str, options: TargetOptions) -> Sink | None:
    """rsync and rclone targets (rsync://, [USER@]HOST:PATH/, rclone:REMOTE:PATH[/NAME.tar.zst])."""
    from .remote_target import RCLONE_TAR, RCLONE_TREE, parse_remote_target
    remote = parse_remote_target(target)
    if remote is None:
        return None
    if remote.kind == RCLONE_TAR:
        from .rclone_sink import RcloneTarSink
        return RcloneTarSink(remote, force=options.force)
    if remote.kind == RCLONE_TREE:
        from .rclone_sink import RcloneSink
        return RcloneSink(remote, scratch_limit=options.scratch_limit)
    from .rsync_sink import RsyncSink
    # setuid bits: kept unless --keep-setuid is explicitly False; they land on the
    # server being restored, not on this machine
    return RsyncSink(remote, scratch_limit=options.scratch_limit, rsync_opts=options.rsync_opts,
                     devices=options.devices, keep_setuid=options.keep_setuid is not False)
