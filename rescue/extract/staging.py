"""Bounded local staging for the rsync and rclone tree sinks.

rsync and rclone copy *trees*, so items are written into a private scratch
directory one batch at a time; the sink runs the tool over the batch, then
clears the batch's files. Directories stay (they are small) so every batch
carries the whole directory skeleton and the last one sets their mtimes.

Safety: item names are untrusted. The scratch tree is written by the one local
writer (`local_tree.LocalTree`: component by component from the scratch root
with O_NOFOLLOW, `..`/NUL refused), so nothing is ever written outside the
scratch dir even if the image names a symlink "a" and then a file "a/b".

Owners, modes, devices, non-user xattrs: a non-root process cannot give its
staged files foreign owners or create device nodes. rsync's `--fake-super`
solves that on the sending side: rsync then reads a file's owner, full mode
and device numbers from its `user.rsync.%stat` xattr ("%o %u,%u %u:%u", see
rsync's xattrs.c) and `trusted.x`/`security.x` xattrs from
`user.rsync.trusted.x`/`user.rsync.security.x`, and sends them as if they
were real. Staging uses that whenever the scratch filesystem takes user xattrs
(`fake_super`); otherwise it falls back to real chown/mknod when root and
loses owners (with a warning) when not; a device node it cannot hold is
skipped by name (NotWritten: the engine lists it, exit 1). The rules are the
writer's `MetadataPolicy`, the same one the directory target uses.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from ..errors import TargetError
from ..fs.base import DIR, FILE, SYMLINK, Entry
from .base import Item, NotWritten
from .local_tree import IS_ROOT, STAT_XATTR, LocalTree, MetadataPolicy, xattrs_supported

__all__ = ["Staging", "split_name", "xattrs_supported", "STAT_XATTR"]

# How a loss reads in the target's warnings ("{target}: N {what} not kept").
_LOSSES = {
    "owners-unset": "owners (not root, no xattrs for --fake-super)",
    "symlink-owners": "symlink owners",
    "setuid": "setuid/setgid bits (dropped as asked)",
    "xattr-system": "system.* xattrs (POSIX ACLs)",
    "xattr-reserved": "xattrs named user.rsync.* (reserved by --fake-super)",
    "xattr-unsupported": "xattrs (this system has none)",
}


# Entries the scratch tree cannot hold: each is skipped by name (exit 1), as in a directory target.
_NOT_STAGED = {
    "devices": "device node not sent (add --devices to send it; a tar target keeps it)",
    "devices-need-root": ("device node not sent: not root, and the scratch directory takes no user xattrs "
                          "for --fake-super (point TMPDIR at a filesystem that does; a tar target keeps it)"),
    "fifos": "{detail} not sent: this target stores files only (a tar target keeps it)",
}


def split_name(name: str) -> list[str]:
    """An item name as path components; refuses names that could climb out."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    for p in parts:
        if p == ".." or "\0" in p:
            raise ValueError(f"unsafe name {name!r}")
    return parts


class Staging:
    """A scratch directory holding one batch of items at a time."""

    def __init__(self, scratch_dir: str | None = None, *, fake_super: bool | None = None,
                 devices: bool = True, fifos: bool = True, keep_setuid: bool = True, xattrs: bool = True,
                 prefix: str = "rescue-stage-") -> None:
        try:
            self.root = tempfile.mkdtemp(prefix=prefix, dir=scratch_dir)
        except OSError as e:
            raise TargetError(f"cannot create scratch dir in {scratch_dir or tempfile.gettempdir()}: "
                              f"{e.strerror}", hint="point TMPDIR at a writable disk") from None
        os.chmod(self.root, 0o700)
        self.is_root = IS_ROOT
        self.fake_super = xattrs_supported(self.root) if fake_super is None else fake_super
        self.policy = MetadataPolicy(owners=self.is_root, fake_super=self.fake_super, keep_setuid=keep_setuid,
                                     xattrs=xattrs, acls=False, devices=devices, fifos=fifos,
                                     private=not self.is_root and not self.fake_super, is_root=self.is_root)
        self.tree = LocalTree(self.root, self.policy, lose=self._lose)
        self.batch_files: list[str] = []   # non-directories staged since the last clear
        self.batch_bytes = 0               # data bytes (not holes) staged since the last clear
        self.lost: dict[str, int] = {}     # metadata that could not be staged, by reason -> count
        self._refused: str | None = None   # why the last entry could not be staged at all

    def _lose(self, key: str, detail: str) -> None:
        if key in _NOT_STAGED:   # a whole entry: stage() raises NotWritten, the engine names it
            self._refused = _NOT_STAGED[key].format(detail=detail.upper() if detail == "fifo" else detail)
            return
        if key == "xattr-refused":
            what = f"xattrs the scratch filesystem refused ({detail.partition(chr(9))[2] or detail})"
        else:
            what = _LOSSES.get(key) or f"{key} ({detail})"
        self.lost[what] = self.lost.get(what, 0) + 1

    def stage(self, item: Item) -> int:
        """Write one item; returns the data bytes it took. Raises FileReadError
        from the content after removing the partial file, NotWritten for an
        entry the scratch tree cannot hold (a device node without root or
        --fake-super), ValueError for an unsafe name, OSError for a local
        scratch problem."""
        parts = split_name(item.name)
        entry = item.entry
        if not parts:
            raise ValueError(f"unsafe name {item.name!r}")
        name = "/".join(parts)
        try:
            if entry.kind == DIR:
                self.tree.mkdir(parts, entry)
                return 0
            if entry.kind == FILE:
                used = self.tree.write_file(parts, entry, item.content, zero_chunks_as_holes=True)
                self.batch_bytes += used
            elif entry.kind == SYMLINK:
                self.tree.symlink(parts, entry)
                used = 0
            elif not self.tree.special(parts, entry):
                why, self._refused = self._refused, None
                raise NotWritten(why or f"{entry.kind} not sent: the scratch directory cannot hold it")
            else:
                used = 0
        except IsADirectoryError:
            raise ValueError(f"{name} exists as a directory") from None
        self.batch_files.append(name)
        return used

    # -- hard links ----------------------------------------------------------

    def exists(self, name: str) -> bool:
        return self.tree.exists(split_name(name))

    def link(self, existing: str, name: str) -> None:
        """Stage `name` as a hard link to the staged `existing`."""
        dst = split_name(name)
        self.tree.link(split_name(existing), dst)
        self.batch_files.append("/".join(dst))

    def placeholder(self, name: str, entry: Entry) -> None:
        """A sparse stand-in for a file sent in an earlier batch: same size,
        mtime, owner and xattrs, so rsync's quick check finds the receiver's
        copy up to date and only uses it to hard-link the new names."""
        parts = split_name(name)
        self.tree.placeholder(parts, entry)
        self.batch_files.append("/".join(parts))

    # -- batches -------------------------------------------------------------

    def fix_dirs(self) -> None:
        """Staging children changed the directories' mtimes: set them back,
        deepest first, just before the tool reads the tree."""
        self.tree.finish_dirs(modes=True)

    def clear_batch(self) -> None:
        """Remove the batch's files (directories stay as the skeleton)."""
        for name in self.batch_files:
            self.tree.unlink(split_name(name))
        self.batch_files = []
        self.batch_bytes = 0

    def cleanup(self) -> None:
        self.tree.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def lost_warnings(self, target: str) -> list[str]:
        return [f"{target}: {n} {what} not kept" for what, n in sorted(self.lost.items())]
