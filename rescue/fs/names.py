"""Names from an image, shown and typed back: the one escape/unescape pair.

A directory entry may hold any byte but '/' and NUL, and a crafted or damaged
image may hold those too ('../../tmp/x', 'n\\0l'). `rescue ls` shows every
name whole through `escape_name`, and `--path`/`cat` take that form back
through `unescape_name`, so an entry no file name can hold is still fetched:

    \\xNN      a byte: NN < 80 is that ASCII character ('/' is \\x2f, NUL \\x00);
              NN >= 80 a byte that is not UTF-8 (kept by surrogateescape)
    \\uNNNN, \\UNNNNNNNN   a character that is not printable (U+2028, U+0085)
    \\\\        a backslash (so a real name 'a\\x2fb' never reads as 'a/b')

Printable characters, non-ASCII letters included, stay as they are. `visible`
is the same escape for messages: '/' and '\\' kept, so a path stays readable.
"""

from __future__ import annotations

import re

_ESCAPE = re.compile(r"\\(?:x([0-9a-fA-F]{2})|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8})|(\\))")


def _char(c: str) -> str:
    code = ord(c)
    if 0xDC80 <= code <= 0xDCFF:   # a byte that is not UTF-8 (os.fsdecode's surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x80:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def visible(text: str) -> str:
    """`text` with what could garble a terminal or forge a line (control
    characters, escape sequences, bytes that are not UTF-8) as escapes."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _char(c) for c in text)


def escape_name(name: str) -> str:
    """One name as `ls` shows it: whole, one safe path component, and exactly
    what `unescape_name` turns back into `name`."""
    if name.isprintable() and "/" not in name and "\\" not in name:   # nearly every name: no work
        return name
    return "".join("\\\\" if c == "\\" else c if c.isprintable() and c != "/" else _char(c) for c in name)


def unescape_name(text: str) -> str:
    """The name `escape_name` shows as `text`. A backslash that starts no
    escape stays a backslash, so a name typed as is ('C:\\data') still works."""
    if "\\" not in text:
        return text

    def one(m: re.Match) -> str:
        if m.group(4):
            return "\\"
        code = int(m.group(1) or m.group(2) or m.group(3), 16)
        if m.group(1) and code >= 0x80:
            return chr(0xDC00 + code)   # a raw byte, as os.fsdecode keeps it
        return chr(code) if code <= 0x10FFFF else m.group(0)

    name = _ESCAPE.sub(one, text)
    # raw bytes that form UTF-8 ('\xc3\xa9') become the character, as a listing decodes them
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "surrogateescape")


def listed_name(parent: str, path: str) -> str:
    """An entry's name as its directory holds it: everything after the
    parent's path, so a crafted name holding '/' ('../../tmp/x') stays whole."""
    prefix = parent.rstrip("/") + "/"
    if path.startswith(prefix) and len(path) > len(prefix):
        return path[len(prefix):]
    return path.rpartition("/")[2] or "/"


__all__ = ["escape_name", "listed_name", "unescape_name", "visible"]
