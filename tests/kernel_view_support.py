"""A readable comparison of two views of one filesystem (the kernel's mount
and a reader's), each {path: tuple of FIELDS}; shared by the XFS and btrfs tests."""

from __future__ import annotations


def view_differences(fields: tuple[str, ...], expected: dict[str, tuple], got: dict[str, tuple],
                     limit: int = 20, skip: dict[str, set[str]] | None = None) -> list[str]:
    """Human-readable differences, empty when the views agree. `skip` maps a
    path to fields not compared there (what the kernel makes up at run time)."""
    out = []
    for path in sorted(set(expected) | set(got)):
        if path not in got:
            out.append(f"{path!r}: missing from the reader")
        elif path not in expected:
            out.append(f"{path!r}: not in the kernel's view")
        elif expected[path] != got[path]:
            for name, a, b in zip(fields, expected[path], got[path]):
                if a == b or name in (skip or {}).get(path, ()):
                    continue
                if name == "xattrs":
                    for key in sorted(set(a) | set(b)):
                        if a.get(key) != b.get(key):
                            out.append(f"{path!r}: xattr {key} kernel={a.get(key)!r:.120} reader={b.get(key)!r:.120}")
                else:
                    out.append(f"{path!r}: {name} kernel={a!r:.200} reader={b!r:.200}")
        if len(out) >= limit:
            out.append("...")
            break
    return out
