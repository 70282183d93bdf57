#!/usr/bin/env python3
"""ssh:// over a slow link: what crosses the wire, and how fast a large file comes.

    sudo .venv/bin/python bench/ssh_remote.py                # 4 GiB disk, 1 GiB file, 50 ms each way
    sudo .venv/bin/python bench/ssh_remote.py --file-mib 256 --delay-ms 50

A real sshd on 127.0.0.1 (tests/ssh_support.py) behind a TCP relay that delays every
packet by --delay-ms in each direction (100 ms round trip), so a request costs what it
costs from a laptop to a provider's rescue system.
  1. A 4 GiB raw disk (sparse file), ext4 made by mkfs.ext4 -d from a tree holding a
     400 MiB file and one small directory (/srv/small, 50 files); `rescue extract
     ssh://.../disk.img --path /srv/small` through the relay. Printed: bytes that crossed
     the relay (both ways) as a share of the disk, and of the data on it.
  2. A --file-mib random file: sequential read through SshSource vs `ssh HOST cat FILE`
     over the same relay. Printed: both rates and their ratio.
Needs root (sshd), openssh-server, mkfs.ext4. Never part of the unit tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from ssh_support import Relay, SshServer, sshd_missing  # noqa: E402


def make_disk(work: Path) -> Path:
    tree = work / "tree"
    (tree / "srv" / "small").mkdir(parents=True)
    (tree / "srv" / "bulk").mkdir(parents=True)
    for i in range(50):
        (tree / "srv" / "small" / f"note-{i:02}.txt").write_text(f"note {i}\n" * 40)
    with open(tree / "srv" / "bulk" / "big.bin", "wb") as f:
        for _ in range(400):
            f.write(os.urandom(1 << 20))
    disk = work / "disk.img"
    subprocess.run(["mkfs.ext4", "-q", "-d", str(tree), str(disk), "4G"], check=True)
    return disk


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--delay-ms", type=float, default=50.0, help="added to each packet, each way")
    ap.add_argument("--file-mib", type=int, default=1024, help="size of the file for the rate test")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp dir)")
    args = ap.parse_args()
    why = sshd_missing()
    if why:
        print(f"skipped: {why}")
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="rescue-ssh-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    server = SshServer(work / "sshd")
    relay = Relay(server.port, delay=args.delay_ms / 1000)
    host = server.add_host("slow", relay.port)
    env = dict(os.environ, **server.env, PYTHONPATH=str(REPO))
    try:
        disk = make_disk(work)
        size = disk.stat().st_size
        used = os.stat(disk).st_blocks * 512
        before = relay.up + relay.down
        t = time.monotonic()
        res = subprocess.run([sys.executable, "-m", "rescue", "extract", f"ssh://{host}{disk}", "--path",
                              "/srv/small", "-o", str(work / "small.tar"), "--force", "--json"],
                             capture_output=True, env=env)
        took = time.monotonic() - t
        if res.returncode != 0:
            print(res.stderr.decode(errors="replace"))
            return 1
        report = json.loads(res.stdout)
        wire = relay.up + relay.down - before
        print(f"extract /srv/small (50 files) from a {size >> 30} GiB disk ({used >> 20} MiB allocated) over "
              f"{args.delay_ms:.0f} ms each way: {wire / 1e6:.1f} MB over the wire = {100 * wire / size:.2f} % "
              f"of the disk, {100 * wire / used:.1f} % of its data; rescue counted "
              f"{report.get('bytes_fetched', 0) / 1e6:.1f} MB from ssh; {took:.1f} s")

        big = work / "file.bin"
        with open(big, "wb") as f:
            for _ in range(args.file_mib):
                f.write(os.urandom(1 << 20))
        t = time.monotonic()
        subprocess.run(["ssh", "-F", str(server.client_config), host, "cat", str(big)],
                       stdout=subprocess.DEVNULL, check=True)
        cat_s = time.monotonic() - t
        os.environ.update(server.env)
        from rescue.source.ssh import SshSource
        t = time.monotonic()
        src = SshSource(f"ssh://{host}{big}")
        pos = 0
        while pos < src.size:
            pos += len(src.read(pos, 4 << 20))
        src.close()
        ours_s = time.monotonic() - t
        mb = args.file_mib * (1 << 20) / 1e6
        print(f"{args.file_mib} MiB file over {args.delay_ms:.0f} ms each way: ssh cat {mb / cat_s:.1f} MB/s, "
              f"rescue ssh:// {mb / ours_s:.1f} MB/s = {cat_s / ours_s:.2f}x of ssh cat")
    finally:
        relay.stop()
        server.stop()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
