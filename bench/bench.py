#!/usr/bin/env python3
"""rescue against the kernel's own path, on the same images, in the same run.

    sudo .venv/bin/python bench/bench.py                 # all workloads, 3 runs each
    .venv/bin/python bench/bench.py --workloads W1 --runs 5 --json

Workloads are built once with the real tools and cached under bench/work/:
  W1 "dead VPS": 4 GiB GPT disk, ext4 root, /srv with one 1 GiB file and 20 000
     small files (~200 MiB); as raw, qcow2, qcow2 with zlib clusters, VMDK
     streamOptimized, and raw inside a .tar.gz (the provider's archive).
  W2 "big empty disk": 64 GiB virtual, a few hundred MiB used.
  W3 "many tiny files": 200 000 files under one tree.
  W4 "a million entries": 1 000 000 small files (sizes log-normal around 1 KiB, 5 %
     empty; ~2 GiB) in ~15 000 directories of a server-like tree (mostly a handful
     of files each, some hundreds, a few thousands; up to 8 levels), generated
     (seeded) on tmpfs and made into a bare ext4 image by mkfs.ext4 -d.
  B1 "dead Fedora-like VPS": W1's tree on btrfs (filled through a loop mount: root),
     read by the native btrfs reader.
  B2 "btrfs with compress=zstd": W1's shape with text-like (compressible) content,
     written through a compress=zstd loop mount, so the reader inflates zstd extents.
  X1 "dead RHEL-like VPS": W1's tree on an XFS partition (filled through a loop
     mount: root), raw and qcow2; read by the native XFS reader.
--mode pipe times both sides writing the tar into a pipe that discards it
(warm cache): what rescue itself costs, which a file + fsync hides.
References: read-only loop mount + GNU tar (root only), `qemu-img convert -O raw`,
`tar xzf` + mount + tar for the archive, `virt-tar-out` where libguestfs is installed.
Both sides end with the output on disk (rescue fsyncs before renaming OUT.part
to OUT; the kernel path runs `sync OUT` after tar, and `qemu-img convert`,
which never flushes its output, is followed by `sync OUT`), so neither wins by
leaving dirty pages behind. Each figure is the median wall time of alternating runs
with a warm page cache;
peak RSS comes from wait4(); "read" is what rescue read from the snapshot file.
Never part of the unit tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

from measure import Measure, alternate, load, median, ratio, timed, versus

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORK = os.environ.get("RESCUE_BENCH_DIR", os.path.join(HERE, "work"))
RESCUE = [sys.executable, "-m", "rescue"]
IS_ROOT = os.geteuid() == 0
GiB, MiB = 1 << 30, 1 << 20
W4_FILES = int(os.environ.get("RESCUE_BENCH_W4_FILES", "1000000"))   # fewer: a quick trial build
# An installed rescue runs from compiled bytecode; a session's PYTHONDONTWRITEBYTECODE
# would make every timed run compile its ~60 modules again (~0.2 s CPU).
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


def sh(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


# -- building the workloads -------------------------------------------------------

def _text_like(n: int) -> bytes:
    """Compressible but not trivial (base64 of random bytes: zstd keeps ~77%)."""
    import base64
    return base64.b64encode(os.urandom(n * 3 // 4 + 3))[:n]


def _make_tree(root: str, big_file: int, small_files: int, small_size: int, text: bool = False) -> None:
    srv = os.path.join(root, "srv")
    os.makedirs(os.path.join(root, "etc"), exist_ok=True)
    with open(os.path.join(root, "etc", "os-release"), "w") as f:
        f.write('ID=debian\nPRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n')
    os.makedirs(srv, exist_ok=True)
    if big_file:
        with open(os.path.join(srv, "big.bin"), "wb") as f:
            # incompressible like a database file; text=True: compressible, like logs
            chunk = _text_like(4 * MiB) if text else os.urandom(4 * MiB)
            for _ in range(big_file // len(chunk)):
                f.write(chunk)
    seed = _text_like(small_size) if text else os.urandom(small_size)
    for i in range(small_files):
        d = os.path.join(srv, "files", f"{i // 1000:03d}")
        if i % 1000 == 0:
            os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i:06d}.dat"), "wb") as f:
            f.write(seed[i % 64:] + seed[:i % 64])


MILLION_WORDS = ("lib", "src", "dist", "test", "docs", "assets", "cache", "locale", "img", "css", "util",
                 "core", "data", "conf", "build", "vendor", "types", "esm", "static", "mail")
MILLION_EXTS = (".js", ".json", ".md", ".txt", ".html", ".css", ".png", ".py", ".map", ".ts", "", ".conf",
                ".log", ".dat", ".php", ".gz")


def _make_million(root: str, files: int, seed: int = 4) -> int:
    """`files` small files in a tree shaped like a server's (packages, caches,
    mail dirs), depth first; returns the bytes their data takes in 4 KiB blocks."""
    import random
    rnd = random.Random(seed)
    blob = os.urandom(4 * MiB)
    made = blocks = 0

    def fill(d: str, depth: int) -> None:
        nonlocal made, blocks
        os.mkdir(d)
        r = rnd.random()   # files here: mostly a handful, some hundreds, a few thousands
        n = rnd.randint(1, 12) if r < 0.6 else rnd.randint(13, 120) if r < 0.95 else rnd.randint(121, 2000)
        for _ in range(min(n, files - made)):
            size = 0 if rnd.random() < 0.05 else min(int(rnd.lognormvariate(6.8, 1.3)), 256 * 1024)
            name = f"{rnd.choice(MILLION_WORDS)}-{made}{rnd.choice(MILLION_EXTS)}"
            fd = os.open(os.path.join(d, name), os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
            if size:
                at = rnd.randrange(len(blob) - size)
                os.write(fd, blob[at:at + size])
            os.close(fd)
            made += 1
            blocks += -(-size // 4096)
        if depth < 8:
            for j in range(rnd.choice((0, 0, 1, 2, 3, 4, 6, 10))):
                if made >= files:
                    return
                fill(os.path.join(d, f"{rnd.choice(MILLION_WORDS)}{j}"), depth + 1)

    os.makedirs(os.path.join(root, "etc"), exist_ok=True)
    with open(os.path.join(root, "etc", "os-release"), "w") as f:
        f.write('ID=debian\nPRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n')
    os.makedirs(os.path.join(root, "srv"))
    app = 0
    while made < files:
        fill(os.path.join(root, "srv", f"app{app:03d}"), 1)
        app += 1
    return blocks * 4096


def _build_million(path: str, files: int, log) -> None:
    """A bare ext4 image (no partition table) of _make_million's tree: the tree
    is written on tmpfs (/dev/shm) when it has room, and mkfs.ext4 -d copies it."""
    shm = "/dev/shm"
    base = shm if os.path.isdir(shm) and shutil.disk_usage(shm).free > 6 * GiB else WORK
    with tempfile.TemporaryDirectory(dir=base, prefix="rescue-bench-w4-") as tmp:
        data = _make_million(tmp, files)
        log(f"  tree written under {base}: {files} files, {data / GiB:.2f} GiB in blocks; mkfs.ext4 -d ...")
        size = (int((data + files * 512) * 1.4) + GiB) // MiB * MiB   # data, inodes, directories, journal
        with open(path, "wb") as f:
            f.truncate(size)
        sh("mkfs.ext4", "-q", "-F", "-N", str(files + files // 5 + 10_000), "-E", "lazy_itable_init=0",
           "-d", tmp, path)


def _make_disk(path: str, size: int, tree: str, fstype: str = "ext4") -> int:
    """GPT disk with one partition: ext4 made by mkfs.ext4 -d, or XFS made by
    mkfs.xfs and filled through a loop mount (root); returns the partition offset."""
    start = MiB
    part = path + ".part"
    with open(part, "wb") as f:
        f.truncate(size - 2 * MiB)
    if fstype in ("xfs", "btrfs", "btrfs-zstd"):
        if fstype == "xfs":
            sh("mkfs.xfs", "-q", "-f", part)
        else:
            sh("mkfs.btrfs", "-q", "-f", part, stdout=subprocess.DEVNULL)
        mnt = tempfile.mkdtemp(prefix="rescue-bench-fill-")
        try:
            sh("mount", "-o", "loop,compress=zstd" if fstype == "btrfs-zstd" else "loop", part, mnt)
            try:
                sh("cp", "-a", os.path.join(tree, "."), mnt)
            finally:
                sh("umount", mnt)
        finally:
            os.rmdir(mnt)
    else:
        sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0", "-d", tree, part)
    with open(path, "wb") as f:
        f.truncate(size)
    sh("sgdisk", "-o", "-n", f"1:{start // 512}:0", "-t", "1:8300", path, stdout=subprocess.DEVNULL)
    # copy the filesystem in, keeping holes (conv=sparse)
    sh("dd", f"if={part}", f"of={path}", "bs=4M", f"seek={start}", "oflag=seek_bytes", "conv=notrunc,sparse",
       "status=none")
    os.unlink(part)
    return start


@dataclass
class Workload:
    name: str
    title: str
    path_in_guest: str
    images: dict[str, str] = field(default_factory=dict)   # variant -> file
    raw: str = ""
    offset: int = MiB


def build(name: str, log) -> Workload:
    os.makedirs(WORK, exist_ok=True)
    specs = {
        "W1": ("dead VPS: 4 GiB disk, /srv = 1 GiB file + 20 000 small files", 4 * GiB, GiB, 20_000, 10_000),
        "W2": ("big empty disk: 64 GiB virtual, ~300 MiB used", 64 * GiB, 256 * MiB, 2_000, 10_000),
        "W3": ("many tiny files: 200 000 files", 4 * GiB, 0, 200_000, 100),
        # W1's tree on XFS (RHEL family), read by the native XFS reader
        "X1": ("dead RHEL-like VPS: W1's tree on XFS", 4 * GiB, GiB, 20_000, 10_000),
        # W1's tree on btrfs; B2 with compressible content under compress=zstd
        "B1": ("dead Fedora-like VPS: W1's tree on btrfs", 4 * GiB, GiB, 20_000, 10_000),
        "B2": ("W1's shape, text-like content, btrfs compress=zstd", 4 * GiB, GiB, 20_000, 10_000),
    }
    if name in ("X1", "B1", "B2") and not IS_ROOT:
        raise SystemExit(f"bench: {name} fills its filesystem through a loop mount: run as root")
    if name == "W4":
        w = Workload(name, "a million entries: 1 000 000 small files in a server-like tree, bare ext4", "/srv",
                     offset=0)
        w.raw = os.path.join(WORK, f"{name}.raw" if W4_FILES == 1_000_000 else f"{name}-{W4_FILES}.raw")
        if not os.path.exists(w.raw):
            log(f"building {name} ({w.title}) ...")
            _build_million(w.raw + ".tmp", W4_FILES, log)
            os.replace(w.raw + ".tmp", w.raw)
        w.images["raw"] = w.raw
        return w
    title, size, big, count, small = specs[name]
    w = Workload(name, title, "/srv")
    w.raw = os.path.join(WORK, f"{name}.raw")
    if not os.path.exists(w.raw):
        log(f"building {name} ({title}) ...")
        with tempfile.TemporaryDirectory(dir=WORK) as tmp:
            _make_tree(tmp, big, count, small, text=name == "B2")
            fstype = {"X1": "xfs", "B1": "btrfs", "B2": "btrfs-zstd"}.get(name, "ext4")
            _make_disk(w.raw + ".tmp", size, tmp, fstype)
        os.replace(w.raw + ".tmp", w.raw)
    w.images["raw"] = w.raw
    if name == "W1":
        variants = {
            "qcow2": ["qemu-img", "convert", "-O", "qcow2", w.raw],
            "qcow2-zlib": ["qemu-img", "convert", "-c", "-O", "qcow2", w.raw],
            "vmdk-stream": ["qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", w.raw],
        }
        for variant, cmd in variants.items():
            out = os.path.join(WORK, f"{name}.{variant}")
            if not os.path.exists(out):
                log(f"building {name} {variant} ...")
                sh(*cmd, out + ".tmp")
                os.replace(out + ".tmp", out)
            w.images[variant] = out
        tgz = os.path.join(WORK, f"{name}.tar.gz")
        if not os.path.exists(tgz):
            log(f"building {name} tar.gz (the provider's archive) ...")
            sh("tar", "-C", WORK, "-Sczf", tgz + ".tmp", os.path.basename(w.raw))
            os.replace(tgz + ".tmp", tgz)
        w.images["tar.gz"] = tgz
    if name in ("W2", "X1"):
        q = os.path.join(WORK, f"{name}.qcow2")
        if not os.path.exists(q):
            sh("qemu-img", "convert", "-O", "qcow2", w.raw, q + ".tmp")
            os.replace(q + ".tmp", q)
        w.images["qcow2"] = q
    return w


# -- measuring (bench/measure.py: timed runs, alternation, medians) -------------

def rescue_extract(image: str, guest_path: str, out: str) -> Measure:
    if os.path.exists(out):
        os.unlink(out)
    return timed(RESCUE + ["extract", image, "--path", guest_path, "-o", out, "--json"], parse_json=True)


def rescue_extract_pipe(image: str, guest_path: str) -> Measure:
    """The CPU path: the tar goes to a pipe that discards it (`-o - | cat > /dev/null`)."""
    cmd = " ".join(shlex.quote(a) for a in RESCUE + ["extract", image, "--path", guest_path, "-o", "-"])
    return timed(["bash", "-o", "pipefail", "-c", f"{cmd} | cat > /dev/null"])


def kernel_extract_pipe(raw: str, offset: int, guest_path: str) -> Measure | None:
    """losetup + mount -o ro + GNU tar into a discarding pipe (root only)."""
    if not IS_ROOT:
        return None
    mnt = tempfile.mkdtemp(prefix="rescue-bench-mnt-")
    script = (f"set -e -o pipefail; mount -o ro,loop,offset={offset} {raw} {mnt}; "
              f"trap 'umount {mnt}' EXIT; tar -C {mnt} -cf - {guest_path.lstrip('/')} | cat > /dev/null")
    try:
        return timed(["bash", "-c", script])
    finally:
        os.rmdir(mnt)


def kernel_extract(raw: str, offset: int, guest_path: str, out: str) -> Measure | None:
    """losetup + mount -o ro + GNU tar, timed as one job (root only)."""
    if not IS_ROOT:
        return None
    mnt = tempfile.mkdtemp(prefix="rescue-bench-mnt-")
    script = (f"set -e; mount -o ro,loop,offset={offset} {raw} {mnt}; "
              f"trap 'umount {mnt}' EXIT; tar -C {mnt} -cf {out} {guest_path.lstrip('/')}; sync {out}")
    try:
        return timed(["bash", "-c", script])
    finally:
        os.rmdir(mnt)


def archive_kernel_extract(tgz: str, offset: int, guest_path: str, out: str) -> Measure | None:
    """What users do today: unpack the .tar.gz to a full-size file, mount, tar."""
    if not IS_ROOT:
        return None
    tmp = tempfile.mkdtemp(prefix="rescue-bench-unpack-", dir=WORK)
    mnt = tempfile.mkdtemp(prefix="rescue-bench-mnt-")
    script = (f"set -e; tar -C {tmp} -xzf {tgz}; img=$(ls {tmp}/*); "
              f"mount -o ro,loop,offset={offset} $img {mnt}; trap 'umount {mnt}' EXIT; "
              f"tar -C {mnt} -cf {out} {guest_path.lstrip('/')}; sync {out}")
    try:
        return timed(["bash", "-c", script])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.rmdir(mnt)


def run_pipe(w: Workload, runs: int, log, paths: list[str]) -> list[dict]:
    """Warm cache, output into a discarding pipe, rescue and the kernel
    alternating run by run: what rescue itself costs, without the disk's
    write speed hiding it."""
    rows: list[dict] = []
    for guest_path in paths:
        for variant in ("raw", "qcow2"):
            image = w.images.get(variant)
            if image is None:
                continue
            rescue_extract_pipe(image, guest_path)   # warm the page cache for both sides
            before = load()
            ours, ref = versus(lambda: rescue_extract_pipe(image, guest_path),
                               lambda: kernel_extract_pipe(w.raw, w.offset, guest_path), runs)
            r = {"workload": w.name, "task": "extract-pipe", "variant": variant, "path": guest_path,
                 "seconds": round(ours.seconds, 3), "peak_rss_mib": round(ours.peak_rss / MiB, 1),
                 "reference": "loop mount + tar | cat", "ref_seconds": round(ref.seconds, 3) if ref else None,
                 "ratio": ratio(ours, ref), "runs": runs, "load_before": before, "load_after": load(),
                 "cpu_seconds": round(ours.cpu, 3), "ref_cpu_seconds": round(ref.cpu, 3) if ref else None}
            rows.append(r)
            log(f"  {w.name} pipe {guest_path:<12} {variant:<6} {ours.seconds:>7.2f}s  kernel {r['ref_seconds']}s  "
                f"ratio {r['ratio']}  rss {r['peak_rss_mib']} MiB  cpu {r['cpu_seconds']} vs "
                f"{r['ref_cpu_seconds']} s  load {before} -> {r['load_after']}")
    return rows


def run_workload(w: Workload, runs: int, log) -> list[dict]:
    rows: list[dict] = []
    out = os.path.join(WORK, "out.tar")

    def row(task, variant, ours, ref, ref_name):
        r = {"workload": w.name, "task": task, "variant": variant, "seconds": round(ours.seconds, 3),
             "peak_rss_mib": round(ours.peak_rss / MiB, 1),
             "read_mib": round(ours.read / MiB, 1) if ours.read is not None else None,
             "reference": ref_name, "ref_seconds": round(ref.seconds, 3) if ref else None,
             "ratio": round(ours.seconds / ref.seconds, 2) if ref and ref.seconds else None}
        rows.append(r)
        log(f"  {w.name} {task:<8} {variant:<12} {r['seconds']:>8.2f}s  ratio {r['ratio']}  "
            f"rss {r['peak_rss_mib']} MiB  read {r['read_mib']} MiB  (ref {ref_name}: {r['ref_seconds']})")

    # Alternate ours and the kernel's, run by run, so both see the same cache state.
    for variant, image in w.images.items():
        if variant == "tar.gz":
            ours, ref = versus(lambda: rescue_extract(image, w.path_in_guest, out),
                               lambda: archive_kernel_extract(image, w.offset, w.path_in_guest, out), runs)
        else:
            ours, ref = versus(lambda: rescue_extract(image, w.path_in_guest, out),
                               lambda: kernel_extract(w.raw, w.offset, w.path_in_guest, out), runs)
        ref_name = "tar xzf + mount + tar" if variant == "tar.gz" else "loop mount + tar"
        row("extract", variant, ours, ref, ref_name if ref else "loop mount + tar (needs root: skipped)")
    # inspect: must not grow with the virtual size (W2)
    inspect = median(alternate([lambda: timed(RESCUE + ["inspect", "--json", w.raw])], runs)[0])
    rows.append({"workload": w.name, "task": "inspect", "variant": "raw", "seconds": round(inspect.seconds, 3),
                 "peak_rss_mib": round(inspect.peak_rss / MiB, 1)})
    log(f"  {w.name} inspect  raw          {inspect.seconds:>8.2f}s  rss {inspect.peak_rss / MiB:.1f} MiB")
    # convert vs qemu-img convert, for the container formats
    for variant, image in w.images.items():
        if variant in ("raw", "tar.gz") or not have("qemu-img"):
            continue
        target = os.path.join(WORK, "convert.raw")
        ours_cmd = RESCUE + ["convert", image, "-o", target]
        # qemu-img leaves its output in the page cache; rescue fsyncs: compare like with like.
        ref_cmd = ["bash", "-c", f"qemu-img convert -O raw {shlex.quote(image)} {shlex.quote(target)} "
                                 f"&& sync {shlex.quote(target)}"]
        def fresh(cmd: list[str]) -> Measure:
            if os.path.exists(target):
                os.unlink(target)
            return timed(cmd)

        try:
            ours, ref = versus(lambda: fresh(ours_cmd), lambda: fresh(ref_cmd), runs)
        except RuntimeError as exc:
            log(f"  convert {variant}: {exc}")
        else:
            row("convert", variant, ours, ref, "qemu-img convert -O raw")
        finally:
            if os.path.exists(target):
                os.unlink(target)
    if have("guestfish"):
        # -m names the filesystem (the workloads have no OS for inspection to find);
        # exit 1 counts as failure here, unlike rescue's "partial".
        # KVM may be unusable (nested virtualisation): emulate, as rescue's guestfs backend does.
        env = dict(os.environ)
        env.setdefault("LIBGUESTFS_BACKEND", "direct")
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            env.setdefault("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
        # virt-tar-out is `guestfish --ro -i tar-out`: its -i (OS inspection) fails on these
        # OS-less workloads and it passes no -m, so call guestfish with the filesystem named.
        command = ["guestfish", "--ro", "-a", w.raw, "-m", "/dev/sda1", "tar-out", w.path_in_guest, out]
        try:
            try:
                vt = timed(command, ok=(0,), env=env)
            except RuntimeError:
                # /dev/kvm can exist and still abort qemu (nested virtualisation): emulate.
                if env.get("LIBGUESTFS_BACKEND_SETTINGS") == "force_tcg":
                    raise
                env["LIBGUESTFS_BACKEND_SETTINGS"] = "force_tcg"
                vt = timed(command, ok=(0,), env=env)
            rows.append({"workload": w.name, "task": "extract", "variant": "raw", "reference": "virt-tar-out",
                         "ref_seconds": round(vt.seconds, 3)})
            log(f"  {w.name} virt-tar-out (guestfish tar-out) raw {vt.seconds:.2f}s")
        except RuntimeError as exc:
            log(f"  {w.name} virt-tar-out (guestfish tar-out): failed here ({str(exc)[-160:]})")
    if os.path.exists(out):
        os.unlink(out)
    return rows


def machine() -> dict:
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "memory_gib": round(mem / GiB, 1), "python": platform.python_version(),
            "platform": platform.platform(), "root": IS_ROOT}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="W1,W2,W3")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    ap.add_argument("--paths", help="pipe mode: only these guest paths (comma-separated), e.g. /srv/files")
    ap.add_argument("--build-only", action="store_true", help="build (cache) the workloads, measure nothing")
    ap.add_argument("--mode", choices=("file", "pipe", "both"), default="both",
                    help="file: output to a file + fsync (the disk path); pipe: output into a discarding "
                         "pipe, warm cache (the CPU path)")
    args = ap.parse_args()
    log = (lambda s: print(s, file=sys.stderr)) if args.json else print
    for tool in ("mkfs.ext4", "sgdisk", "qemu-img"):
        if not have(tool):
            print(f"bench: {tool} is needed to build the workloads", file=sys.stderr)
            return 2
    log(f"machine: {machine()}")
    rows = []
    for name in args.workloads.split(","):
        w = build(name.strip(), log)
        if args.build_only:
            continue
        log(f"{w.name}: {w.title}")
        if args.mode in ("pipe", "both"):
            paths = [w.path_in_guest] + (["/srv/files"] if w.name in ("W1", "X1", "B1", "B2") else [])
            if args.paths:
                paths = [p for p in args.paths.split(",") if p]
            rows += run_pipe(w, max(args.runs, 5), log, paths)
        if args.mode in ("file", "both"):
            rows += run_workload(w, args.runs, log)
    if args.json:
        print(json.dumps({"machine": machine(), "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
