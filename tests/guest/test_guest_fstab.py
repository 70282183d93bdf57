"""fstab parsing, volume matching, and the merged guest tree (unit level).

The end-to-end tests over real disk images are in test_guest_merged_images.py;
here a tiny in-memory FileSystem stands in for a backend to check routing."""

from __future__ import annotations

import posixpath

import pytest

from rescue.errors import GuestPathError
from rescue.fs.base import DIR, FILE, SYMLINK, Entry, FileSystem, FsInfo, normalize
from rescue.guest.fstab import match_volume, parse_fstab, parse_spec
from rescue.guest.merged import MergedFileSystem, build_mount_table
from rescue.source import BytesSource
from rescue.volume.base import Volume

FSTAB = r"""
# /etc/fstab: static file system information.
UUID=0a3407de-014b-458b-b5c1-848e92a327a3 /               ext4    errors=remount-ro 0 1
UUID="E3A1-9C2B"  /boot/efi       vfat    umask=0077      0       1
LABEL=data        /srv/data       xfs     defaults        0 2
PARTUUID=6a2c1f3e-02 /home         ext4    defaults        0 2
PARTLABEL=logs    /var/log        ext4    defaults        0 2
/dev/mapper/my--vg-var--lib /var/lib  xfs  defaults 0 2
/dev/vg0/opt      /opt            ext4    defaults        0 2
/dev/disk/by-uuid/11111111-2222-3333-4444-555555555555 /mnt/by\040uuid ext4 defaults 0 2
/dev/sda3         /tmp            ext4    defaults        0 2
/dev/nvme0n1p4    /media/n        ext4    defaults        0 2
/dev/xvdb1        /mnt/second     ext4    defaults        0 2
/dev/mapper/vg0-swap none         swap    sw              0 0
/swapfile         none            swap    sw              0 0
proc              /proc           proc    defaults        0 0
tmpfs             /run/shm        tmpfs   defaults        0 0
/srv/data/www     /var/www        none    bind            0 0
nas:/export       /mnt/nas        nfs     defaults        0 0
//server/share    /mnt/smb        cifs    credentials=/x  0 0
/dev/sdb1         /mnt/usb        ext4    noauto,user     0 0
"""


def test_parses_every_kind_of_source():
    entries = {e.mountpoint: e for e in parse_fstab(FSTAB)}
    assert entries["/"].source.kind == "uuid" and entries["/"].source.value == "0a3407de-014b-458b-b5c1-848e92a327a3"
    assert entries["/boot/efi"].source.value == "E3A1-9C2B"      # quotes stripped
    assert (entries["/srv/data"].source.kind, entries["/srv/data"].source.value) == ("label", "data")
    assert entries["/home"].source.kind == "partuuid"
    assert entries["/var/log"].source.kind == "partlabel"
    assert (entries["/var/lib"].source.kind, entries["/var/lib"].source.value) == ("lv", "my-vg/var-lib")
    assert entries["/opt"].source.value == "vg0/opt"
    assert entries["/mnt/by uuid"].source.kind == "uuid"          # \040 is a space
    tmp = entries["/tmp"].source
    assert (tmp.kind, tmp.disk, tmp.partition) == ("device", 0, 3)
    assert (entries["/media/n"].source.disk, entries["/media/n"].source.partition) == (0, 4)
    assert (entries["/mnt/second"].source.disk, entries["/mnt/second"].source.partition) == (1, 1)
    assert all(e.skipped is None for mp, e in entries.items() if mp.startswith(("/", )) and mp in (
        "/", "/boot/efi", "/srv/data", "/home", "/var/log", "/var/lib", "/opt", "/tmp"))


def test_lists_what_it_skips_with_the_reason():
    skipped = {(e.spec, e.skipped) for e in parse_fstab(FSTAB) if e.skipped}
    assert ("/dev/mapper/vg0-swap", "swap") in skipped
    assert ("/swapfile", "swap") in skipped
    assert ("proc", "virtual filesystem (proc)") in skipped
    assert ("tmpfs", "virtual filesystem (tmpfs)") in skipped
    assert ("/srv/data/www", "bind mount") in skipped
    assert ("nas:/export", "network filesystem (nfs)") in skipped
    assert ("//server/share", "network filesystem (cifs)") in skipped
    assert ("/dev/sdb1", "noauto") in skipped
    assert len(skipped) == 8


@pytest.mark.parametrize("spec,kind,value", [
    ("/dev/mapper/vg-root", "lv", "vg/root"),
    ("/dev/mapper/a--b--c-d--e", "lv", "a-b-c/d-e"),
    ("/dev/mapper/cryptroot", "mapper", "cryptroot"),
    ("/dev/disk/by-label/my\\x2flabel", "label", "my/label"),
    ("/dev/disk/by-partuuid/abc", "partuuid", "abc"),
    ("/dev/centos/root", "lv", "centos/root"),
    ("/dev/md0", "path", "/dev/md0"),
    ("/dev/vda", "device", "/dev/vda"),
])
def test_spec_forms(spec, kind, value):
    got = parse_spec(spec)
    assert (got.kind, got.value) == (kind, value)


def _vol(id: str, **kw) -> Volume:
    return Volume(id=id, start=0, size=1, source=BytesSource(b"x"), **kw)


def test_matches_volumes_by_every_key():
    vols = [_vol("1", uuid="e3a1-9c2b", filesystem="vfat"),
            _vol("2", uuid="0a3407de-014b-458b-b5c1-848e92a327a3", part_uuid="6A2C1F3E-02"),
            _vol("3", label="data", part_label="logs"),
            _vol("my-vg/var-lib"), _vol("vg0/opt")]
    by = {e.mountpoint: match_volume(e, vols) for e in parse_fstab(FSTAB)}
    assert by["/boot/efi"].id == "1"           # vfat uuid, any case
    assert by["/"].id == "2"
    assert by["/home"].id == "2"               # PARTUUID, any case
    assert by["/srv/data"].id == "3"
    assert by["/var/log"].id == "3"
    assert by["/var/lib"].id == "my-vg/var-lib"
    assert by["/opt"].id == "vg0/opt"
    assert by["/tmp"].id == "3"                # /dev/sda3 -> partition 3
    assert by["/mnt/second"] is None           # a second disk is not in this snapshot
    assert match_volume("UUID=ffff", vols) is None
    assert match_volume("/dev/vda", [_vol("whole")]).id == "whole"


# ----------------------------------------------------------------- merged tree

class MemFS(FileSystem):
    """A test double of the FileSystem interface: a dict of path -> Entry/content."""

    backend = "mem"

    def __init__(self, files: dict[str, bytes | str | None], name: str = "mem") -> None:
        self.info = FsInfo(type=name)
        self.entries: dict[str, Entry] = {"/": Entry("/", DIR, 0o755, inode=2)}
        self.data: dict[int, bytes] = {}
        ino = 10
        for path, content in files.items():
            parts = path.strip("/").split("/")
            for i in range(1, len(parts)):
                d = "/" + "/".join(parts[:i])
                if d not in self.entries:
                    ino += 1
                    self.entries[d] = Entry(d, DIR, 0o755, inode=ino)
            ino += 1
            if content is None:
                self.entries[path] = Entry(path, DIR, 0o755, inode=ino)
            elif isinstance(content, str):          # a symlink target
                self.entries[path] = Entry(path, SYMLINK, 0o777, inode=ino, link_target=content)
            else:
                self.entries[path] = Entry(path, FILE, 0o644, size=len(content), inode=ino)
                self.data[ino] = content

    def stat(self, path):
        path = normalize(path)
        if path not in self.entries:
            raise GuestPathError(f"no such file: {path}")
        return self.entries[path]

    def listdir(self, path):
        path = normalize(path)
        self.stat(path)
        return [e for p, e in self.entries.items() if p != "/" and posixpath.dirname(p) == path]

    def read_chunks(self, entry, chunk_size=1 << 20):
        # Reads by inode like the TSK backend: a wrong inode would show.
        assert self.entries[entry.path].inode == entry.inode
        yield self.data[entry.inode]


def _tree():
    root = MemFS({"/etc/fstab": b"", "/var": None, "/var/lib/docker": None, "/home/u/link": "/var/lib/docker/volumes/db/f",
                  "/srv/hidden-under-mount/x": b"root's copy"}, "root")
    var = MemFS({"/log/syslog": b"var's log", "/lib/docker": None}, "var")
    docker = MemFS({"/volumes/db/f": b"volume data"}, "docker")
    srv = MemFS({"/www/index.html": b"<html>"}, "srv")
    return root, var, docker, srv


def test_routes_paths_to_the_longest_mountpoint():
    root, var, docker, srv = _tree()
    tree = MergedFileSystem(root, {"/var": var, "/var/lib/docker": docker, "/srv": srv})
    assert tree.read_file("/var/log/syslog") == b"var's log"
    assert tree.read_file("/var/lib/docker/volumes/db/f") == b"volume data"
    e = tree.stat("/var/lib/docker/volumes/db/f")
    assert e.path == "/var/lib/docker/volumes/db/f"
    assert e.dev != tree.stat("/var/log/syslog").dev
    # A symlink on the root pointing into a mounted fs resolves through the tree.
    assert tree.read_file("/home/u/link") == b"volume data"
    # The root's files under a mountpoint are hidden, as the kernel would.
    with pytest.raises(GuestPathError):
        tree.stat("/srv/hidden-under-mount/x")


def test_listdir_shows_the_mounted_root_in_place_of_the_directory():
    root, var, docker, srv = _tree()
    tree = MergedFileSystem(root, {"/var": var, "/var/lib/docker": docker, "/srv": srv})
    top = {e.name: e for e in tree.listdir("/")}
    assert top["var"].dev == tree.stat("/var/log").dev      # var's root, not root's /var
    assert top["var"].inode == var.entries["/"].inode
    assert {e.path for e in tree.listdir("/var/lib")} == {"/var/lib/docker"}
    walked = [e.path for e in tree.walk("/var")]
    assert "/var/lib/docker/volumes/db/f" in walked and "/var/log/syslog" in walked


def test_inodes_stay_unique_across_filesystems():
    root, var, docker, srv = _tree()
    tree = MergedFileSystem(root, {"/var": var, "/var/lib/docker": docker, "/srv": srv})
    keys = [(e.dev, e.inode) for e in tree.walk("/")]
    assert len(keys) == len(set(keys))
    assert len({e.inode for e in tree.walk("/")}) < len(keys)    # the raw inodes do collide


def test_mount_table_from_fstab():
    root, var, docker, srv = _tree()
    fstab = (b"UUID=aaaa / ext4 defaults 0 1\n/dev/mapper/vg0-var /var ext4 defaults 0 2\n"
             b"LABEL=docker /var/lib/docker xfs defaults 0 2\nPARTUUID=nope /srv ext4 defaults 0 2\n"
             b"/dev/vg0/swap none swap sw 0 0\n")
    root.data[root.entries["/etc/fstab"].inode] = fstab
    root.entries["/etc/fstab"].size = len(fstab)
    vols = [_vol("1", uuid="aaaa"), _vol("vg0/var"), _vol("vg0/docker", label="docker")]
    opened = {"vg0/var": var, "vg0/docker": docker}
    rows, tree = build_mount_table(root, vols, lambda v: opened[v.id])
    status = {r.mountpoint: (r.volume, r.status) for r in rows}
    assert status["/"] == ("1", "mounted")
    assert status["/var"] == ("vg0/var", "mounted")
    assert status["/var/lib/docker"] == ("vg0/docker", "mounted")
    assert status["/srv"] == (None, "not found: PARTUUID=nope")
    assert status["none"][1] == "skipped: swap"
    assert tree.read_file("/var/lib/docker/volumes/db/f") == b"volume data"


def test_without_fstab_the_tree_is_the_root():
    root = MemFS({"/etc/hostname": b"x"})
    rows, tree = build_mount_table(root, [], lambda v: None)
    assert rows == [] and tree.read_file("/etc/hostname") == b"x"


def _with_fstab(fs: MemFS, path: str, text: bytes) -> None:
    e = fs.entries[path]
    fs.data[e.inode] = text
    e.size = len(text)


def test_btrfs_subvolumes_of_a_top_level_view_become_the_tree():
    """Ubuntu on btrfs: '@' is /, '@home' is /home, both on one filesystem
    that a backend opened at its top level."""
    top = MemFS({"/@/etc/fstab": b"", "/@/etc/hostname": b"ubuntu\n", "/@/home": None,
                 "/@home/alice/notes.txt": b"alice's notes", "/@snapshots": None})
    _with_fstab(top, "/@/etc/fstab", b"UUID=b1 / btrfs defaults,subvol=@ 0 0\n"
                                     b"UUID=b1 /home btrfs defaults,subvol=/@home 0 0\n"
                                     b"UUID=b1 /.snapshots btrfs subvol=@nope 0 0\n")
    vols = [_vol("2", uuid="b1", filesystem="btrfs")]
    rows, tree = build_mount_table(top, vols, lambda v: pytest.fail("the root's volume is not reopened"))
    status = {r.mountpoint: r.status for r in rows}
    assert status["/"] == "mounted" and status["/home"] == "mounted"
    assert status["/.snapshots"].startswith("not found: btrfs subvolume /@nope")
    assert tree.read_file("/etc/hostname") == b"ubuntu\n"
    assert tree.read_file("/home/alice/notes.txt") == b"alice's notes"
    assert {e.path for e in tree.listdir("/home")} == {"/home/alice"}
    assert tree.stat("/home").dev != tree.stat("/etc").dev       # subvolumes: own inode spaces
    with pytest.raises(GuestPathError):
        tree.stat("/@home")                                       # the top level is not the guest's /


def test_a_top_level_directory_without_a_matching_fstab_is_not_the_root():
    top = MemFS({"/backup/etc/fstab": b"", "/data/x": b"x"})
    _with_fstab(top, "/backup/etc/fstab", b"UUID=zz / ext4 defaults 0 1\n")
    rows, tree = build_mount_table(top, [], lambda v: None)
    assert rows == [] and tree.read_file("/data/x") == b"x"


def test_device_mapper_ids_name_lvs():
    lv = _vol("rhel/root", details={"lv_uuid": "Aa2YjE-wc1r-h3Nz-sYrn-qEgn-TW9x-1CebjV"})
    vols = [_vol("1"), lv]
    assert match_volume("/dev/disk/by-id/dm-name-rhel-root", vols) is lv
    vg_uuid = "8HfEjs9DNH0dy1U5u8EYBFVce48BcSWU"
    assert match_volume(f"/dev/disk/by-id/dm-uuid-LVM-{vg_uuid}Aa2YjEwc1rh3NzsYrnqEgnTW9x1CebjV", vols) is lv


def test_fstab_parser_never_raises_on_junk():
    import random

    rng = random.Random(5)
    alphabet = "UUID=LABEL/dev/mapper-- \t\n#\\040xyz0123,=\"'"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 120)))
        for e in parse_fstab(text):
            match_volume(e, [_vol("1", uuid="x", label="y"), _vol("a/b")])
