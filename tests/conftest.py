"""Shared test setup: nothing a test does may land in the user's own cache."""

from __future__ import annotations

import os
import tempfile

import pytest

# test_target_rsync/rclone load it as a plugin (shared fixtures) after importing it
pytest.register_assert_rewrite("remote_servers")


@pytest.fixture(scope="session", autouse=True)
def _private_cache_dir():
    """Archive seek indexes go to a throwaway directory (tests that check the
    cache set RESCUE_CACHE_DIR themselves, per test)."""
    previous = os.environ.get("RESCUE_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="rescue-test-cache-") as cache:
        if previous is None:
            os.environ["RESCUE_CACHE_DIR"] = cache
        yield
        if previous is None:
            os.environ.pop("RESCUE_CACHE_DIR", None)
