#!/usr/bin/env python3
"""`rescue ls` of one directory holding 200 000 entries, against `ls -l` on the
kernel's read-only loop mount, warm cache, alternating, median of >= 5.

    .venv/bin/python bench/bigdir.py [--entries 200000] [--runs 5] [--json]

The image (bench/work/D1-<entries>.raw: a bare ext4 filesystem, no partition
table, with /big holding the entries as empty files, filled through a loop
mount, root) is built once and cached. Both sides print the long listing into a discarding pipe.
The kernel side needs root (loop mount); without it only rescue is timed.
Never part of the unit tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WORK = os.environ.get("RESCUE_BENCH_DIR", os.path.join(HERE, "work"))
RESCUE = [sys.executable, "-m", "rescue"]
MiB = 1 << 20
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)   # an installed rescue runs from compiled bytecode


def build(entries: int, log) -> str:
    image = os.path.join(WORK, f"D1-{entries}.raw")
    if os.path.exists(image):
        return image
    os.makedirs(WORK, exist_ok=True)
    log(f"building {image} ({entries} entries in /big) ...")
    tmp_image = image + ".tmp"
    with open(tmp_image, "wb") as f:
        f.truncate(max(256 * MiB, entries * 4096))
    subprocess.run(["mkfs.ext4", "-q", "-F", "-N", str(entries + 1000), tmp_image], check=True)
    # Filled through a loop mount (root): the kernel indexes the directory (htree)
    # as a real server's would; `mkfs.ext4 -d` links names one by one (O(n^2)).
    if os.geteuid() != 0:
        raise SystemExit("bench: the 200 000-entry directory is filled through a loop mount: run as root")
    mnt = tempfile.mkdtemp(prefix="rescue-bench-fill-")
    try:
        subprocess.run(["mount", "-o", "loop", tmp_image, mnt], check=True)
        try:
            big = os.path.join(mnt, "big")
            os.mkdir(big)
            for i in range(entries):
                os.close(os.open(os.path.join(big, f"file-{i:07d}.dat"), os.O_CREAT | os.O_WRONLY, 0o644))
        finally:
            subprocess.run(["umount", mnt], check=True)
    finally:
        os.rmdir(mnt)
    os.replace(tmp_image, image)
    return image


def timed(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes of the first process of a pipeline)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    errors = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {errors.decode(errors='replace')[-400:]}")
    return elapsed, usage.ru_maxrss * 1024


def rescue_ls(image: str) -> tuple[float, int]:
    return timed(RESCUE + ["ls", image, "/big"])


def kernel_ls(image: str) -> tuple[float, int] | None:
    if os.geteuid() != 0:
        return None
    mnt = tempfile.mkdtemp(prefix="rescue-bench-mnt-")
    script = (f"set -e -o pipefail; mount -o ro,loop {shlex.quote(image)} {mnt}; trap 'umount {mnt}' EXIT; "
              f"ls -l --time-style=full-iso {mnt}/big | cat > /dev/null")
    try:
        return timed(["bash", "-c", script])
    finally:
        os.rmdir(mnt)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    log = (lambda s: print(s, file=sys.stderr)) if args.json else print
    image = build(args.entries, log)
    rescue_ls(image)   # warm the page cache
    ours, ref = [], []
    for i in range(max(args.runs, 5)):
        pair = [(rescue_ls, ours), (kernel_ls, ref)]
        for fn, results in pair[::1 if i % 2 == 0 else -1]:
            results.append(fn(image))
    row = {"task": "ls", "entries": args.entries, "seconds": round(statistics.median(s for s, _ in ours), 3),
           "peak_rss_mib": round(max(r for _, r in ours) / MiB, 1)}
    if None not in ref:
        row["ref_seconds"] = round(statistics.median(s for s, _ in ref), 3)   # type: ignore[misc]
        row["reference"] = "loop mount + ls -l | cat"
        row["ratio"] = round(row["seconds"] / row["ref_seconds"], 2) if row["ref_seconds"] else None
    log(f"ls of {args.entries} entries in one directory: rescue {row['seconds']} s, rss {row['peak_rss_mib']} MiB; "
        f"kernel {row.get('ref_seconds')} s")
    if args.json:
        print(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
