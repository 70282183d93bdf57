"""What `inspect` shows about the archive or compression around a disk."""

from __future__ import annotations


class ArchiveSummary(dict):
    """What `inspect` shows about the archive around the disk: plain data for
    --json, one readable line for the terminal."""

    def __str__(self) -> str:
        kind = self["format"] + (f".{CODEC_SUFFIX.get(self['compression'], self['compression'])}"
                                 if self.get("compression") and self["format"] != "compressed"
                                 else "")
        if self["format"] == "compressed":
            kind = f"{self['compression']}-compressed disk"
        text = kind
        if self.get("member"):
            files = [m for m in self.get("members", []) if m["type"] in ("file", "sparse")]
            text += f", member {self['member']} (of {len(files)} file{'s' if len(files) != 1 else ''})"
        if self.get("tree") is not None:
            text += f", a server's file tree (root at {self['tree']})"
        if self.get("inside"):
            text += f", inside {self['inside']}"
        for note in self.get("notes", []):
            text += f"; note: {note}"
        return text


CODEC_SUFFIX = {"gzip": "gz", "zstd": "zst", "xz": "xz", "bzip2": "bz2"}


def with_outer(info: ArchiveSummary, notes: list[str], outer) -> ArchiveSummary:
    """`info` with the reader's notes and, when `outer` (the source it was read
    from) is itself inside an archive, what that archive is."""
    if notes:
        info["notes"] = list(notes)
    describe_outer = getattr(outer, "archive_info", None)
    if describe_outer is not None:
        info["inside"] = describe_outer()
    return info
