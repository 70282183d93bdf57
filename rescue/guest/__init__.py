"""Guest layer: the server as a whole.

`stack.py` opens the layers (source -> disk -> volumes -> filesystems);
`root.py` picks the filesystem that holds the guest's root and stitches its
/etc/fstab mounts into one tree; `snapshot.py` puts them together as
`open_snapshot()`, which also knows the guest's users and OS and what
`rescue inspect` shows. Everything the CLI shows comes from here, so it is
all callable from Python.
"""

from .snapshot import Snapshot, SnapshotOptions, open_snapshot

__all__ = ["Snapshot", "SnapshotOptions", "open_snapshot"]
