"""The one escape pair for names from an image (rescue/fs/names.py): what `ls`
shows is one safe, printable path component, and turns back into the name."""

from __future__ import annotations

import os
import random

import pytest

from rescue.fs.names import escape_name, unescape_name, visible

CASES = {
    "plain.txt": "plain.txt",
    "../../tmp/pwned3": r"..\x2f..\x2ftmp\x2fpwned3",
    "n\0l": r"n\x00l",
    "a\\x2fb": r"a\\x2fb",                  # a real backslash is doubled: never read as an escape
    "line\nbreak": r"line\x0abreak",
    "esc\x1b[31m": r"esc\x1b[31m",
    "caf\udce9": r"caf\xe9",                 # a byte that is not UTF-8 (surrogateescape)
    "café ü 日本": "café ü 日本",              # printable letters stay as they are
    "nel\x85": r"nel\u0085",                 # a C1 control character is not the byte 0x85
    "sep\u2028": r"sep\u2028",
    "tag\U000e0001": r"tag\U000e0001",
}


@pytest.mark.parametrize("name", list(CASES))
def test_known_names(name):
    assert escape_name(name) == CASES[name]
    assert unescape_name(CASES[name]) == name


def test_random_byte_names_round_trip_into_one_safe_component():
    rng = random.Random(14)
    for _ in range(3000):
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 24)))
        name = os.fsdecode(raw)
        shown = escape_name(name)
        assert unescape_name(shown) == name, raw
        assert "/" not in shown and "\0" not in shown and shown.isprintable(), raw
        assert os.fsencode(unescape_name(shown)) == raw


def test_a_backslash_that_starts_no_escape_is_kept():
    assert unescape_name(r"C:\data\new") == r"C:\data\new"
    assert unescape_name(r"\xzz\u12") == r"\xzz\u12"
    assert unescape_name(r"\xc3\xa9") == "é"   # raw UTF-8 bytes mean the character, as a listing decodes them


def test_messages_keep_slashes_and_backslashes_readable():
    assert visible("/var/lib/x\0y\\z") == "/var/lib/x\\x00y\\z"
    assert visible("ok/path") == "ok/path"
