"""The archive-index progress bar is drawn on a terminal only: with stderr sent
to a file or a pipe (`rescue inspect snapshot.tar.gz 2>log`) it writes nothing,
instead of an empty line per refresh (issue 14)."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

from repo_paths import REPO

DRIVE = """
import time
from rescue import cli
progress = cli._IndexProgress()
progress.started -= 5            # as if indexing had been going on for a while
for step in range(1, 11):
    progress(step * 10, 100)
    time.sleep(0.15)
"""


def _run(stderr) -> None:
    subprocess.run([sys.executable, "-c", DRIVE], stderr=stderr, check=True, timeout=60,
                   env=dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="100", TERM="xterm"))


def test_index_progress_writes_nothing_when_stderr_is_a_file(tmp_path):
    log = tmp_path / "log"
    with open(log, "wb") as f:
        _run(f)
    assert log.read_bytes() == b""


def test_index_progress_is_drawn_on_a_terminal():
    leader, follower = pty.openpty()
    try:
        _run(follower)
        os.close(follower)
        drawn = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(leader)
    assert b"indexing archive" in drawn
