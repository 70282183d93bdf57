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
import subprocess
import sys
import tempfile

from measure import Measure, load, ratio, timed, versus

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


def rescue_ls(image: str) -> Measure:
    return timed(RESCUE + ["ls", image, "/big"], ok=(0,))


def kernel_ls(image: str) -> Measure | None:
    if os.geteuid() != 0:
        return None
    mnt = tempfile.mkdtemp(prefix="rescue-bench-mnt-")
    script = (f"set -e -o pipefail; mount -o ro,loop {shlex.quote(image)} {mnt}; trap 'umount {mnt}' EXIT; "
              f"ls -l --time-style=full-iso {mnt}/big | cat > /dev/null")
    try:
        return timed(["bash", "-c", script], ok=(0,))
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
    before = load()
    ours, ref = versus(lambda: rescue_ls(image), lambda: kernel_ls(image), max(args.runs, 5))
    row = {"task": "ls", "entries": args.entries, "seconds": round(ours.seconds, 3),
           "peak_rss_mib": round(ours.peak_rss / MiB, 1), "load_before": before, "load_after": load()}
    if ref is not None:
        row["ref_seconds"] = round(ref.seconds, 3)
        row["reference"] = "loop mount + ls -l | cat"
        row["ratio"] = ratio(ours, ref)
    log(f"ls of {args.entries} entries in one directory: rescue {row['seconds']} s, rss {row['peak_rss_mib']} MiB; "
        f"kernel {row.get('ref_seconds')} s; load {before} -> {row['load_after']}")
    if args.json:
        print(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
