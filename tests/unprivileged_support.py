"""Running the real CLI as an ordinary user (`nobody` through setpriv when the
tests run as root): shared by the unprivileged CLI tests and the cache tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from repo_paths import REPO

IS_ROOT = os.geteuid() == 0
NOBODY = 65534


def user_ids() -> tuple[int, int]:
    return (NOBODY, NOBODY) if IS_ROOT else (os.getuid(), os.getgid())


def setpriv_prefix() -> list[str]:
    if not IS_ROOT:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is needed to run the CLI as nobody")
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def python_for_user(prefix: list[str], env: dict[str, str]) -> tuple[str, str]:
    """(interpreter, PYTHONPATH) the user can run with this venv's packages: the
    venv's own python, else a system python of the same version (a pyenv or a
    venv under /root is out of a normal user's reach) with the venv's
    site-packages on PYTHONPATH."""
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    purelib, platlib = sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    path = os.pathsep.join(dict.fromkeys([str(REPO), *inherited, purelib, platlib]))
    candidates = [sys.executable] + [c for c in (f"/usr/bin/python{version}", f"/usr/local/bin/python{version}",
                                                 shutil.which(f"python{version}")) if c and os.path.exists(c)]
    tried = []
    for python in dict.fromkeys(candidates):
        # the tests start sys.executable again: that must work for the user too
        probe = subprocess.run([*prefix, python, "-c", "import subprocess, sys, rescue.cli, pytsk3, pytest; "
                                "subprocess.run([sys.executable, '-c', 'import rescue.cli'], check=True); "
                                "print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True, env={**env, "PYTHONPATH": path}, timeout=60)
        if probe.returncode == 0 and probe.stdout.strip() == version:
            return python, path
        tried.append(f"{python}: {(probe.stderr.strip().splitlines() or [probe.stdout.strip()])[-1]}")
    pytest.skip("no Python the unprivileged user can run with this venv's packages "
                "(is the checkout readable by nobody?): " + "; ".join(tried))
