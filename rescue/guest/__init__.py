"""Guest layer: the server as a whole.

`open_snapshot()` stacks the layers (source -> disk -> volumes), picks the
filesystem that holds the guest's root, and knows the guest's users and OS.
Everything the CLI shows comes from here, so it is all callable from Python.
"""

from .snapshot import Snapshot, SnapshotOptions, open_snapshot

__all__ = ["Snapshot", "SnapshotOptions", "open_snapshot"]
