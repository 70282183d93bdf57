"""Seek-index build speed, random read latency and cache size for compressed
snapshots, against the decompressor CLIs (`gzip -d`, `zstd -d`) on the same file.

    .venv/bin/python bench/archive_index.py DISK.raw.gz [DISK.raw.zst ...]

Uses a throw-away RESCUE_CACHE_DIR. Numbers go to stdout as one line per file.
"""

from __future__ import annotations

import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time

CLI = {".gz": ["gzip", "-dc"], ".zst": ["zstd", "-dcq"], ".xz": ["xz", "-dc"], ".bz2": ["bzip2", "-dc"]}


def cli_seconds(path: str) -> float | None:
    cmd = CLI.get(os.path.splitext(path)[1])
    if not cmd or not shutil.which(cmd[0]):
        return None
    start = time.perf_counter()
    subprocess.run(cmd + [path], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main(paths: list[str]) -> None:
    cache = tempfile.mkdtemp(prefix="rescue-bench-cache-")
    os.environ["RESCUE_CACHE_DIR"] = cache
    from rescue.source import open_source
    for path in paths:
        start = time.perf_counter()
        source = open_source(path)
        build = time.perf_counter() - start
        source.close()
        start = time.perf_counter()
        source = open_source(path)
        reopen = time.perf_counter() - start
        rng = random.Random(1)
        lat = []
        spent = 0.0
        while len(lat) < 100 and (spent < 30 or len(lat) < 3):  # forward-only streams are slow
            offset = rng.randrange(0, max(source.size - 65536, 1))
            t = time.perf_counter()
            source.read(offset, 65536)
            lat.append(time.perf_counter() - t)
            spent += lat[-1]
        lat.sort()
        source.close()
        cached = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache) for f in fs)
        cli = cli_seconds(path)
        print(f"{os.path.basename(path)}: compressed {os.path.getsize(path) / 2**20:.0f} MiB, "
              f"disk {source.size / 2**20:.0f} MiB; first open (index build) {build:.2f} s"
              + (f" vs {CLI[os.path.splitext(path)[1]][0]} -d {cli:.2f} s" if cli else "")
              + f"; reopen {reopen * 1e3:.0f} ms; 64 KiB random read median "
              f"{lat[len(lat) // 2] * 1e3:.1f} ms, p90 {lat[len(lat) * 9 // 10] * 1e3:.1f} ms "
              f"({len(lat)} reads); cache {cached / 1024:.0f} KiB "
              f"(cumulative); max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
