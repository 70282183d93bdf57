"""The libguestfs appliance starts only for the volumes the requested paths
need: a server whose root is read natively and whose /var (named in fstab)
needs the appliance extracts /etc without starting it; reading /var starts it
once and reads the real bytes.

Which kinds need the appliance is a list in the guest layer (stack.GUESTFS_ONLY:
f2fs, reiserfs, jfs, ... no fixture tool makes those small and everywhere);
here it names ext2 for this test, and the disk is the real thing: GPT by
sgdisk, an ext4 root and an ext2 /var made by mkfs -d."""

from __future__ import annotations

import shutil
import subprocess
import tarfile
import uuid

import pytest

from rescue.fs.guestfs import guestfs_unavailable

MiB = 1 << 20
pytestmark = pytest.mark.skipif(any(shutil.which(t) is None for t in ("sgdisk", "mkfs.ext4", "mkfs.ext2")),
                                reason="sgdisk, mkfs.ext4 and mkfs.ext2 are needed")


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("lazy")
    var_uuid = str(uuid.uuid4())
    root, var = base / "root", base / "var"
    (root / "etc").mkdir(parents=True)
    (root / "var").mkdir()
    (root / "home" / "ann").mkdir(parents=True)
    (root / "home" / "ann" / "notes.txt").write_text("keep me\n")
    (root / "etc" / "os-release").write_text('ID=almalinux\nPRETTY_NAME="AlmaLinux 9.4"\n')
    (root / "etc" / "fstab").write_text(f"UUID={var_uuid} /var ext2 defaults 0 0\n")
    (var / "lib" / "app").mkdir(parents=True)
    (var / "lib" / "app" / "data.bin").write_bytes(bytes(range(256)) * 4096)
    images = {}
    for name, tree, mkfs in (("root", root, ["mkfs.ext4"]), ("var", var, ["mkfs.ext2", "-U", var_uuid])):
        img = base / f"{name}.img"
        with open(img, "wb") as f:
            f.truncate(16 * MiB)
        _run(*mkfs, "-q", "-F", "-d", str(tree), str(img))
        images[name] = img
    disk = base / "server.img"
    with open(disk, "wb") as f:
        f.truncate(40 * MiB)
    _run("sgdisk", "-o", "-n", "1:2048:+16M", "-t", "1:8300", "-n", "2:0:+16M", "-t", "2:8300", str(disk))
    for img, seek in ((images["root"], 1), (images["var"], 17)):
        _run("dd", f"if={img}", f"of={disk}", "bs=1M", f"seek={seek}", "conv=notrunc,sparse", "status=none")
    return disk


@pytest.fixture
def var_needs_the_appliance(monkeypatch):
    import rescue.fs.guestfs as guestfs_backend
    import rescue.guest.stack as stack

    monkeypatch.setattr(stack, "GUESTFS_ONLY", stack.GUESTFS_ONLY | {"ext2"})
    starts: list[int] = []
    real_init = guestfs_backend.GuestfsAppliance.__init__

    def counting_init(self, sources, **kwargs):
        starts.append(len(sources))
        real_init(self, sources, **kwargs)

    monkeypatch.setattr(guestfs_backend.GuestfsAppliance, "__init__", counting_init)
    monkeypatch.setattr(guestfs_backend, "guestfs_unavailable", lambda: None)   # chosen even if not installed
    return starts


def test_paths_on_the_root_never_start_the_appliance(server, var_needs_the_appliance, tmp_path):
    from rescue.extract.run import ExtractOptions, extract
    from rescue.extract.targets import TargetOptions, open_sink
    from rescue.guest import Snapshot, SnapshotOptions

    starts = var_needs_the_appliance
    notes: list[str] = []
    with Snapshot(str(server), SnapshotOptions(status=notes.append)) as snap:
        fs = snap.filesystem()
        assert snap.root_volume().id == "1"
        assert [(m["mountpoint"], m["volume"], m["status"]) for m in snap.mounts] == [("/var", "2", "mounted")]
        out = tmp_path / "etc-home.tar"
        report = extract(fs, open_sink(str(out), TargetOptions()), ExtractOptions(paths=["/etc", "/home"]),
                         users=snap.user_names(), groups=snap.group_names())
        assert report.skipped == [] and report.files == 3
    assert starts == [] and not any("libguestfs" in n for n in notes), notes
    with tarfile.open(out) as tf:
        assert tf.extractfile("home/ann/notes.txt").read() == b"keep me\n"


def test_a_path_on_the_mounted_volume_starts_it_once(server, var_needs_the_appliance):
    if guestfs_unavailable():
        pytest.skip(f"libguestfs unavailable: {guestfs_unavailable()}")
    from rescue.guest import Snapshot, SnapshotOptions

    starts = var_needs_the_appliance
    notes: list[str] = []
    with Snapshot(str(server), SnapshotOptions(status=notes.append)) as snap:
        fs = snap.filesystem()
        assert starts == []
        entry = fs.stat("/var/lib/app/data.bin")
        assert starts == [1]   # one appliance, for /var's volume only
        assert b"".join(fs.read_chunks(entry)) == bytes(range(256)) * 4096
        assert fs.stat("/etc/os-release").dev == 0 and entry.dev == 1
        fs.listdir("/var/lib")
    assert starts == [1]
    assert any("starting the libguestfs appliance" in n for n in notes) and \
        any("appliance ready after" in n for n in notes), notes


def test_without_libguestfs_the_volume_is_named_as_unreadable(server, monkeypatch):
    import rescue.fs.guestfs as guestfs_backend
    import rescue.guest.stack as stack
    from rescue.errors import FilesystemError
    from rescue.extract.run import ExtractOptions, plan
    from rescue.guest import Snapshot

    monkeypatch.setattr(stack, "GUESTFS_ONLY", stack.GUESTFS_ONLY | {"ext2"})
    monkeypatch.setattr(guestfs_backend, "guestfs_unavailable", lambda: "the libguestfs Python bindings are "
                                                                        "not installed")
    with Snapshot(str(server)) as snap:
        fs = snap.filesystem()
        assert plan(fs, ExtractOptions(paths=["/etc"])).skipped == []
        with pytest.raises(FilesystemError, match="volume 2 holds ext2, which no reader here can open: only "
                                                  "libguestfs reads it, and here the libguestfs Python bindings"):
            plan(fs, ExtractOptions(paths=["/var/lib"]))
        whole = plan(fs, ExtractOptions(paths=["/"]))
        assert [(s.path, "no reader here can open" in s.reason) for s in whole.skipped] == [("/var", True)]
