"""The libguestfs backend on XFS and btrfs made by the real tools, against the
kernel's view (read-only loop mounts, as root) or the tree they were made from.

One appliance for the whole session (open_volumes), both images attached: XFS
as a local file, btrfs as a partition-like window of a bigger file, which goes
through our NBD export. Also: the NBD export alone against qemu-img, and the provisioning
script (CI only)."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from repo_paths import REPO
from common_support import sha256_file
from rescue.fs.base import DIR, FILE, SYMLINK
from rescue.fs.nbd_export import NbdExport
from rescue.source.base import BytesSource, FileSource, Window

ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
PAD = 1 << 20       # the btrfs image sits 1 MiB into its "disk"


def run(*cmd: str) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{cmd} failed: {res.stderr.strip()}")


def make_tree(top: Path) -> None:
    top.mkdir()
    (top / "etc").mkdir()
    (top / "etc" / "hostname").write_text("dead-vps\n")
    (top / "empty").write_bytes(b"")
    big = top / "var" / "lib" / "db"
    big.mkdir(parents=True)
    # 3 MiB + a bit: more than one pread (2 MiB) per file
    (big / "data.bin").write_bytes(hashlib.sha256(b"x").digest() * ((3 << 20) // 32 + 7))
    (top / "emptydir").mkdir()
    os.symlink("etc/hostname", top / "link")
    os.symlink("/nowhere/../../escape", top / "dangling")
    os.link(top / "etc" / "hostname", top / "hardlink")
    os.mkfifo(top / "fifo")
    (top / "setuid").write_text("#!/bin/sh\n")
    os.chmod(top / "setuid", 0o4755)
    os.setxattr(top / "etc" / "hostname", "user.origin", b"cloud-init")
    os.setxattr(top / "var", "user.empty", b"")
    os.utime(top / "etc" / "hostname", ns=(1_600_000_000_111_111_111, 1_700_000_000_123_456_789))
    (top / "utf8-ñame").write_text("n\n")
    with open(os.path.join(os.fsencode(top), b"latin1-\xe9"), "wb") as f:   # not UTF-8
        f.write(b"x")
    if ROOT:
        os.chown(top / "etc" / "hostname", 1000, 1001)
        os.setxattr(top / "etc" / "hostname", "trusted.t", b"\x00\xff")
        os.mknod(top / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(top / "bigdev", 0o660 | stat.S_IFBLK, os.makedev(259, 200000))  # XFS keeps 18-bit minors


def guestfs_reason() -> str | None:
    from rescue.fs.guestfs import guestfs_unavailable

    return guestfs_unavailable()


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    base = tmp_path_factory.mktemp("guestfs")
    tree = base / "tree"
    make_tree(tree)
    out = {"tree": tree}
    if shutil.which("mkfs.btrfs"):
        img = base / "btrfs.img"
        with open(img, "wb") as f:
            f.truncate(120 << 20)
        run("mkfs.btrfs", "-q", "--rootdir", str(tree), str(img))
        disk = base / "btrfs-disk.img"   # the filesystem as partition 1 of a disk
        with open(disk, "wb") as f:
            f.seek(PAD)
            with open(img, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 20)
        out["btrfs"] = (img, disk)
    if shutil.which("mkfs.xfs") and ROOT:
        img = base / "xfs.img"
        with open(img, "wb") as f:
            f.truncate(300 << 20)    # mkfs.xfs's minimum
        run("mkfs.xfs", "-q", str(img))
        mnt = base / "xfs.fill"
        mnt.mkdir()
        try:
            run("mount", "-o", "loop", str(img), str(mnt))
        except RuntimeError:
            pass
        else:
            try:
                run("cp", "-a", f"{tree}/.", str(mnt))
            finally:
                run("umount", str(mnt))
            out["xfs"] = img
    return out


@pytest.fixture(scope="session")
def filesystems(images):
    """kind -> GuestfsFileSystem, all from one appliance (open_volumes)."""
    reason = guestfs_reason()
    if reason:
        pytest.skip(f"libguestfs unavailable: {reason}")
    from rescue.errors import FilesystemError
    from rescue.fs.guestfs import open_volumes
    from rescue.volume.base import Volume

    volumes, kinds = [], []
    if "xfs" in images:
        src = FileSource(images["xfs"])   # a bare filesystem file: attached by path
        volumes.append(Volume(id="xfs", start=0, size=src.size, source=Window(src, 0, src.size)))
        kinds.append("xfs")
    if "btrfs" in images:
        _, disk = images["btrfs"]         # partition 1 of a disk: through the NBD export
        volumes.append(Volume(id="1", start=PAD, size=120 << 20,
                              source=Window(FileSource(disk), PAD, 120 << 20, name="btrfs-part1")))
        kinds.append("btrfs")
    if not volumes:
        pytest.skip("neither mkfs.xfs (with root) nor mkfs.btrfs is available")
    try:
        opened = open_volumes(volumes, names=kinds)
    except FilesystemError as exc:
        pytest.skip(f"libguestfs appliance does not start here: {exc}")
    app = opened[0].appliance
    print(f"\nlibguestfs appliance: {app.launch_seconds:.1f} s ({app.accelerator})", file=sys.stderr)
    yield dict(zip(kinds, opened))
    for fs in opened:
        fs.close()
    assert app.g is None      # the last close closed the appliance


def reference_dir(images, kind: str, tmp_path_factory):
    """A read-only loop mount of the image (root), else the source tree."""
    if not ROOT:
        return images["tree"], None
    img = images[kind] if kind == "xfs" else images[kind][0]
    mnt = tmp_path_factory.mktemp(f"{kind}-ro")
    opts = "ro,loop,norecovery" if kind == "xfs" else "ro,loop"
    try:
        run("mount", "-o", opts, str(img), str(mnt))
    except subprocess.CalledProcessError:
        return images["tree"], None
    return mnt, mnt


def xattrs_of(path: Path) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in names}


@pytest.mark.parametrize("kind", ["xfs", "btrfs"])
def test_every_entry_matches_the_kernel_view(kind, images, filesystems, tmp_path_factory):
    if kind not in filesystems:
        pytest.skip(f"no {kind} image (mkfs.{kind} missing, or XFS without root)")
    fs = filesystems[kind]
    assert fs.info.type == kind and fs.launch_seconds > 0
    # every drive is a throwaway qcow2 overlay of ours, deleted once qemu holds it
    # open (no signal can leave it behind); a partition window's backing is the NBD export
    drive = fs.appliance.drives[fs.appliance.devices.index(fs.device)]
    assert drive[0].endswith(".qcow2") and not os.path.exists(drive[0])
    assert len(fs.appliance._exports) == (1 if "btrfs" in filesystems else 0)
    ref, mnt = reference_dir(images, kind, tmp_path_factory)
    try:
        seen = set()
        by_inode: dict[int, set[str]] = {}
        for entry in fs.walk("/"):
            seen.add(entry.path)
            path = ref / entry.path.lstrip("/") if entry.path != "/" else ref
            st = os.lstat(path)
            if entry.path != "/" or mnt is not None:
                assert entry.st_mode == st.st_mode, entry.path
                assert (entry.uid, entry.gid) == (st.st_uid, st.st_gid), entry.path
                assert entry.mtime_ns == st.st_mtime_ns, entry.path
            if entry.kind == FILE:
                assert entry.size == st.st_size, entry.path
                h = hashlib.sha256()
                for chunk in fs.read_chunks(entry):
                    h.update(chunk)
                assert h.hexdigest() == sha256_file(path), entry.path
                by_inode.setdefault(entry.inode, set()).add(entry.path)
            if entry.kind == SYMLINK:
                assert entry.link_target == os.readlink(path), entry.path
            if entry.rdev is not None:
                assert entry.rdev == (os.major(st.st_rdev), os.minor(st.st_rdev)), entry.path
            if entry.path != "/" or mnt is not None:
                assert fs.xattrs(entry) == xattrs_of(path), entry.path
        expected = {"/"} | {"/" + str(p.relative_to(ref)) for p in ref.rglob("*")}
        expected = {p for p in expected if not p.startswith("/lost+found")}
        # names that are not UTF-8 cannot cross the bindings: reported, not lost silently
        assert fs.skipped == ["/latin1-\\xe9"]
        assert "latin1-\\xe9" in fs.listing_damage("/") and fs.listing_damage("/etc") is None
        from rescue.extract.run import ExtractOptions, plan   # so extract counts it as skipped (exit 1)
        assert [(s.path, "not UTF-8" in s.reason) for s in plan(fs, ExtractOptions(paths=["/"])).skipped] \
            == [("/", True)]
        assert seen == {p for p in expected if p != "/latin1-\udce9"}
        assert {"/etc/hostname", "/hardlink"} in by_inode.values()
        assert fs.read_range(fs.stat("/var/lib/db/data.bin"), (2 << 20) - 5, 10) == \
            (ref / "var/lib/db/data.bin").read_bytes()[(2 << 20) - 5:(2 << 20) + 5]
        assert fs.resolve("/link").path == "/etc/hostname"
    finally:
        if mnt is not None:
            subprocess.run(["umount", str(mnt)], capture_output=True)


def test_missing_path_is_a_guest_path_error(filesystems):
    from rescue.errors import GuestPathError

    fs = next(iter(filesystems.values()))
    with pytest.raises(GuestPathError):
        fs.stat("/no/such/file")
    assert fs.stat("/..").path == "/"      # cannot climb above the guest root


def test_nbd_export_serves_a_window_byte_for_byte(tmp_path):
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img not installed")
    data = os.urandom(3 << 20) + b"tail-not-sector-aligned"
    src = tmp_path / "disk.raw"
    src.write_bytes(data)
    before = sha256_file(src)
    window = Window(FileSource(src), 4096 + 7, len(data) - 4096 - 7)
    out = tmp_path / "out.raw"
    with NbdExport(window) as export:
        url = f"nbd+unix:///?socket={export.socket_path}"
        subprocess.run(["qemu-img", "convert", "-f", "raw", url, "-O", "raw", str(out)],
                       check=True, capture_output=True, timeout=60)
        # writes are refused: the export is read-only
        res = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 512", url],
                             capture_output=True, text=True, timeout=60) if shutil.which("qemu-io") else None
    got = out.read_bytes()
    assert got[:window.size] == window.read(0, window.size)
    assert got[window.size:] == bytes(len(got) - window.size) and len(got) % 512 == 0
    if res is not None:
        assert "failed" in (res.stdout + res.stderr).lower() or res.returncode != 0
    assert sha256_file(src) == before


def test_nbd_export_reports_damaged_ranges_as_io_errors(tmp_path):
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img not installed")
    from rescue.errors import DamagedRange

    class Damaged(BytesSource):
        def read(self, offset, length):
            if offset < 8192 + 512 and offset + length > 8192:
                raise DamagedRange("bad cluster")
            return super().read(offset, length)

    with NbdExport(Damaged(bytes(1 << 20), "damaged")) as export:
        res = subprocess.run(["qemu-img", "convert", "-f", "raw",
                              f"nbd+unix:///?socket={export.socket_path}", "-O", "raw",
                              str(tmp_path / "x.raw")], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "error" in res.stderr.lower()


@pytest.mark.skipif(os.environ.get("CI") != "true" or not ROOT,
                    reason="runs scripts/provision-guestfs.sh (installs packages): CI=true and root only")
def test_provisioning_script_installs_a_working_guestfs_backend(tmp_path):
    venv = tmp_path / "venv"
    res = subprocess.run(["bash", str(REPO / "scripts" / "provision-guestfs.sh"), "--venv", str(venv),
                          "--repo", str(REPO), "--no-appliance-check", "--no-link"],
                         capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    check = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import guestfs; from rescue.fs.guestfs import import_guestfs; import_guestfs()"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert subprocess.run([str(venv / "bin" / "rescue"), "--help"], capture_output=True).returncode == 0


def test_vagrantfile_validates(tmp_path):
    if shutil.which("vagrant") is None:
        pytest.skip("vagrant not installed (apt install vagrant)")
    work = tmp_path / "repo"
    (work / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "Vagrantfile", work)
    shutil.copy(REPO / "scripts" / "provision-guestfs.sh", work / "scripts")
    env = dict(os.environ, VAGRANT_HOME=str(tmp_path / "vagrant.d"), VAGRANT_CHECKPOINT_DISABLE="1")
    # no provider (VirtualBox, ...) on a CI machine: validate all but the provider blocks
    res = subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "validated successfully" in res.stdout
    # and it does check: a provisioner script that is not there fails
    (work / "scripts" / "provision-guestfs.sh").unlink()
    res = subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0


# -- the launch: bounded, retried under TCG, one line when it cannot start, clean on signals --

HANGING_QEMU = """#!/bin/bash
# A qemu that never boots the appliance (as seen with KVM: SeaBIOS "Booting from
# ROM..." and then nothing) when HANG says so; libguestfs's probes (-help,
# -version, QMP) and other launches go to the real qemu.
for a in "$@"; do
  case "$a" in
    -kernel) launch=1 ;;
    *accel=kvm*) kvm=1 ;;
  esac
done
if [ -n "$launch" ] && { [ "$HANG" = all ] || { [ "$HANG" = kvm ] && [ -n "$kvm" ]; }; }; then
  echo $$ >> "$HANG_PIDS"
  exec -a qemu-system-x86_64 sleep 100000
fi
exec %s "$@"
"""


@pytest.fixture
def hanging(tmp_path):
    """(env for `rescue`, small ext4 image, file the hung qemu pids go to)."""
    if guestfs_reason():
        pytest.skip(f"libguestfs unavailable: {guestfs_reason()}")
    real = shutil.which("qemu-system-x86_64")
    if real is None or shutil.which("mkfs.ext4") is None:
        pytest.skip("qemu-system-x86_64 and mkfs.ext4 are needed")
    hv = tmp_path / "qemu-hang"
    hv.write_text(HANGING_QEMU % real)
    hv.chmod(0o755)
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("vps\n")
    img = tmp_path / "fs.img"
    with open(img, "wb") as f:
        f.truncate(32 << 20)
    run("mkfs.ext4", "-q", "-d", str(tree), str(img))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    pids = tmp_path / "pids"
    # TMPDIR: where leftovers would show; the appliance cache stays where it is (no rebuild)
    env = dict(os.environ, LIBGUESTFS_HV=str(hv), HANG_PIDS=str(pids), TMPDIR=str(tmp), PYTHONPATH=str(REPO),
               LIBGUESTFS_CACHEDIR=os.environ.get("LIBGUESTFS_CACHEDIR", "/var/tmp"))
    env.pop("LIBGUESTFS_BACKEND_SETTINGS", None)
    return env, img, pids


def _alive(pids: Path) -> list[int]:
    if not pids.exists():
        return []
    return [int(p) for p in pids.read_text().split() if os.path.exists(f"/proc/{p}")]


def _leftovers(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith(("rescue-", "libguestfs")))


def test_a_launch_that_never_completes_ends_in_one_clear_line(hanging):
    env, img, pids = hanging
    env.update(HANG="all", RESCUE_GUESTFS_TIMEOUT="3,3")
    res = subprocess.run([sys.executable, "-m", "rescue", "ls", "--backend", "guestfs", str(img), "/"],
                         capture_output=True, text=True, timeout=300, env=env)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("rescue:")]
    assert res.returncode == 2 and "Traceback" not in res.stderr and "libguestfs: error" not in res.stderr, res.stderr
    assert len(errors) == 1 and "did not start" in errors[0] and "not started after 3 s" in errors[0], res.stderr
    assert any("starting the libguestfs appliance" in line for line in lines), res.stderr   # said what it did
    assert _alive(pids) == [] and pids.exists()     # the hung qemu was killed, not left behind
    assert _leftovers(Path(env["TMPDIR"])) == []


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_signal_during_the_launch_leaves_no_overlay_and_no_qemu(hanging, signame):
    import signal
    import time

    env, img, pids = hanging
    env.update(HANG="all", RESCUE_GUESTFS_TIMEOUT="600,600")
    proc = subprocess.Popen([sys.executable, "-m", "rescue", "ls", "--backend", "guestfs", str(img), "/"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while not _alive(pids) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)   # until the (hung) qemu runs: the overlay is in place
        assert _alive(pids), "the launch never got to qemu"
        assert _leftovers(Path(env["TMPDIR"]))   # the overlay exists while qemu boots
        proc.send_signal(getattr(signal, signame))
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + getattr(signal, signame), err
    assert "Traceback" not in err and "interrupted" in err, err
    assert _alive(pids) == []
    assert _leftovers(Path(env["TMPDIR"])) == []


def test_a_kvm_launch_that_hangs_is_retried_under_tcg(hanging):
    """One real appliance start under qemu's emulator (15-60 s)."""
    from rescue.fs.guestfs import _kvm_usable

    if not _kvm_usable():
        pytest.skip("no usable /dev/kvm: the first launch is under TCG already")
    env, img, pids = hanging
    env.update(HANG="kvm", RESCUE_GUESTFS_TIMEOUT="5,900")
    res = subprocess.run([sys.executable, "-m", "rescue", "ls", "--backend", "guestfs", str(img), "/etc"],
                         capture_output=True, text=True, timeout=1200, env=env)
    assert res.returncode == 0 and res.stdout.split() == ["hostname"], res.stderr
    assert "did not start with KVM (not started after 5 s); retrying with qemu's emulator" in res.stderr
    assert "libguestfs appliance ready after" in res.stderr and "(tcg)" in res.stderr
    assert _alive(pids) == [] and _leftovers(Path(env["TMPDIR"])) == []
