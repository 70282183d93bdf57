"""What reading a snapshot cost, found through a stack of wrapped sources."""

from __future__ import annotations


def bytes_fetched(source) -> int | None:
    """Bytes fetched over the network by the remote source somewhere under
    `source` (an archive member, a decompressed view, a window), or None when
    everything is local. Duck-typed so local runs never import the HTTP stack."""
    for _ in range(16):
        if source is None:
            return None
        fetched = getattr(source, "bytes_fetched", None)
        if isinstance(fetched, int):
            return fetched
        nxt = None
        for attr in ("source", "archive", "parent", "inner"):
            nxt = getattr(source, attr, None)
            if nxt is not None and nxt is not source:
                break
        source = nxt
    return None
