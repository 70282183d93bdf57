"""The user's story on the sample snapshot and the per-filesystem fixtures:
inspect what is inside, look around with ls and cat, then extract exactly what is
needed (paths, excludes, strip-components, stdout, compressed tarballs, dry run).
References: sfdisk -J and blkid -p for inspect, the kernel's read-only mount for
ls -l, the described tree (scripts/fixture_trees.py) for content."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from common_support import (FS_DIR, IS_ROOT, MANIFEST, SAMPLE, T, assert_one_line_error, blkid, dir_view,
                                explain, mounted, partition, rescue, sfdisk_partitions, tar_view,
                                zstd_decompress)

UP = T.UP.lstrip("/")
VOLS = T.V.lstrip("/")


def inspect_json(image: Path) -> dict:
    res = rescue("inspect", "--json", str(image))
    assert res.returncode == 0, explain(res)
    return json.loads(res.stdout)


def need(*tools: str) -> None:
    for tool in tools:
        if not shutil.which(tool):
            pytest.skip(f"{tool} not installed")


# ------------------------------------------------------------------ inspect
def _check_volume_against_blkid(image: Path, vol: dict, offset: int, size: int | None) -> list[str]:
    ref = blkid(image, offset, size)
    bad = []
    if ref.get("TYPE") != vol.get("filesystem"):
        bad.append(f"volume {vol['id']}: filesystem {vol.get('filesystem')!r}, blkid TYPE {ref.get('TYPE')!r}")
    for key, field in (("LABEL", "label"), ("UUID", "uuid")):
        if (ref.get(key) or None) != (vol.get(field) or None):
            bad.append(f"volume {vol['id']}: {field} {vol.get(field)!r}, blkid {key} {ref.get(key)!r}")
    return bad


def test_inspect_json_describes_the_sample_vps_disk():
    need("sfdisk", "blkid")
    info = inspect_json(SAMPLE)
    assert info["format"] == "raw"
    assert info["virtual_size"] == SAMPLE.stat().st_size
    assert info["partition_table"] == "gpt"
    parts = sfdisk_partitions(SAMPLE)
    vols = {v["id"]: v for v in info["volumes"]}
    assert sorted(vols) == sorted(p["number"] for p in parts)
    bad = []
    for p in parts:
        v = vols[p["number"]]
        if (v["start"], v["size"]) != (p["start"] * 512, p["size"] * 512):
            bad.append(f"volume {v['id']}: start/size {v['start']}/{v['size']}, sfdisk {p['start'] * 512}/{p['size'] * 512}")
        if p["number"] != "1":          # the BIOS boot partition holds no filesystem
            bad += _check_volume_against_blkid(SAMPLE, v, p["start"] * 512, p["size"] * 512)
    assert not bad, "\n".join(bad)
    assert vols["1"]["filesystem"] in (None, "", "none")
    assert info["os"]["id"] == T.OS_ID
    assert info["os"]["pretty_name"] == T.OS_PRETTY_NAME


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_inspect_json_agrees_with_sfdisk_and_blkid(name, tmp_path):
    need("sfdisk", "blkid")
    image = FS_DIR / name
    if name.endswith(".zst"):
        image = zstd_decompress(image, tmp_path / name[:-4])
    info = inspect_json(image)
    m = MANIFEST[name]
    assert info["virtual_size"] == image.stat().st_size
    if "volumes" not in m:                      # a bare filesystem
        assert info["partition_table"] in (None, "none"), info["partition_table"]
        assert [v["id"] for v in info["volumes"]] == ["whole"]
        v = info["volumes"][0]
        assert (v["start"], v["size"]) == (0, image.stat().st_size)
        bad = _check_volume_against_blkid(image, v, 0, None)
        assert not bad, "\n".join(bad)
        assert "os" not in info or not info["os"]
        return
    assert {"dos": "mbr"}.get(m["table"], m["table"]) == info["partition_table"]
    vols = {v["id"]: v for v in info["volumes"]}
    bad = []
    for p in sfdisk_partitions(image):
        if p["type"] in ("5", "f", "85"):      # the extended container holds no filesystem
            continue
        v = vols.get(p["number"])
        if v is None:
            bad.append(f"partition {p['number']} missing from inspect")
            continue
        if (v["start"], v["size"]) != (p["start"] * 512, p["size"] * 512):
            bad.append(f"volume {v['id']}: start/size {v['start']}/{v['size']}, sfdisk {p['start'] * 512}/{p['size'] * 512}")
        bad += _check_volume_against_blkid(image, v, p["start"] * 512, p["size"] * 512)
    assert not bad, "\n".join(bad)


def test_inspect_table_names_each_volume_and_the_guest_os():
    res = rescue("inspect", str(SAMPLE))
    assert res.returncode == 0, explain(res)
    out = res.stdout.decode()
    for text in (T.ROOT_LABEL, T.EFI_LABEL, T.ROOT_UUID, "ext4", "vfat", T.OS_PRETTY_NAME):
        assert text in out, f"{text!r} missing from:\n{out}"


# ------------------------------------------------------------------ ls and cat
def _children(directory: str) -> dict[str, T.Node]:
    nodes = T.resolved(T.SAMPLE_TREE)
    return {p.rsplit("/", 1)[1]: n for p, n in nodes.items() if p.rsplit("/", 1)[0] == directory}


def test_ls_lists_the_docker_volumes():
    res = rescue("ls", str(SAMPLE), T.V)
    assert res.returncode == 0, explain(res)
    names = [n.rstrip("/") for n in res.stdout.decode().split()]   # directories shown as 'name/'
    assert sorted(names) == sorted(_children(T.V)), names


def test_ls_json_gives_each_entrys_metadata():
    res = rescue("ls", "--json", str(SAMPLE), T.UP)
    assert res.returncode == 0, explain(res)
    entries = {e["name"]: e for e in json.loads(res.stdout)["entries"]}
    want = _children(T.UP)
    assert sorted(entries) == sorted(want)
    bad = []
    for name, n in want.items():
        e = entries[name]
        got = (e["type"], int(e["mode"], 8), e["uid"], e["gid"], e["mtime_ns"], e.get("link_target") or "")
        exp = (n.kind, n.mode, n.uid, n.gid, n.mtime_ns_exact, n.target if n.kind == "symlink" else "")
        if got != exp:
            bad.append(f"{name}: {got} != {exp}")
        if n.kind == "file" and e["size"] != n.apparent_size:
            bad.append(f"{name}: size {e['size']} != {n.apparent_size}")
    assert not bad, "\n".join(bad)


def test_ls_long_lists_what_the_kernel_mount_lists(tmp_path):
    offset, size = partition(SAMPLE, "3")
    res = rescue("ls", "-l", str(SAMPLE), T.UP)
    assert res.returncode == 0, explain(res)
    lines = [line for line in res.stdout.decode().splitlines() if line.strip()]
    with mounted(SAMPLE, "ext4", tmp_path / "mnt", offset, size) as mnt:
        directory = mnt / UP
        ref = {e.name: os.lstat(e.path) for e in os.scandir(directory)}
        targets = {name: os.readlink(directory / name) for name, st in ref.items() if stat.S_ISLNK(st.st_mode)}
    assert len(lines) == len(ref), "\n".join(lines)
    bad = []
    for name, st in ref.items():
        shown = f"{name} -> {targets[name]}" if name in targets else name
        line = next((line for line in lines if line.endswith(" " + shown)), None)
        if line is None:
            bad.append(f"{shown!r} not listed")
        elif not line.startswith(stat.filemode(st.st_mode)):
            bad.append(f"{name}: {line.split()[0]} != {stat.filemode(st.st_mode)}")
        elif stat.S_ISREG(st.st_mode) and str(st.st_size) not in line.split():
            bad.append(f"{name}: size {st.st_size} not in {line!r}")
    assert not bad, "\n".join(bad)


def test_cat_prints_fstab_byte_for_byte():
    res = rescue("cat", str(SAMPLE), "/etc/fstab")
    assert res.returncode == 0, explain(res)
    assert res.stdout == T.FSTAB


def test_cat_streams_a_big_file_exactly():
    path = f"{T.PG}/pg_wal/000000010000000000000001"
    res = rescue("cat", str(SAMPLE), path)
    assert res.returncode == 0, explain(res)
    assert res.stdout == T.all_nodes(T.SAMPLE_TREE)[path].data


def test_cat_follows_symlinks_inside_the_guest_not_the_host():
    res = rescue("cat", str(SAMPLE), f"{T.UP}/latest.jpg")
    assert res.returncode == 0, explain(res)
    assert res.stdout == T.all_nodes(T.SAMPLE_TREE)[f"{T.UP}/images/photo 1.jpg"].data
    res = rescue("cat", str(SAMPLE), f"{T.UP}/site/index.html")   # site -> /var/www/html (guest root)
    assert res.returncode == 0, explain(res)
    assert res.stdout == T.all_nodes(T.SAMPLE_TREE)["/var/www/html/index.html"].data


@pytest.mark.parametrize("path", ["/etc/nonexistent.conf", "/etc"])
def test_cat_of_a_missing_file_or_a_directory_is_one_clear_error(path):
    res = rescue("cat", str(SAMPLE), path)
    assert_one_line_error(res)
    assert path.encode() in res.stderr


# ------------------------------------------------------------------ extract options
def _tree_names(prefix: str, *, exclude_suffix: str | None = None) -> set[str]:
    names = set()
    for p in T.all_nodes(T.SAMPLE_TREE):
        rel = p.lstrip("/")
        if rel == prefix or rel.startswith(prefix + "/"):
            if exclude_suffix and rel.endswith(exclude_suffix):
                continue
            names.add(rel)
    return names


def test_extracts_docker_volumes_from_the_sample_vps(tmp_path):
    out = tmp_path / "volumes.tar"
    res = rescue("extract", str(SAMPLE), "--path", T.V, "-o", str(out))
    assert res.returncode == 0, explain(res)
    assert set(tar_view(out).recs) == _tree_names(VOLS)


def test_exclude_leaves_out_log_files(tmp_path):
    out = tmp_path / "x.tar"
    res = rescue("extract", str(SAMPLE), "--path", "/var", "--exclude", "*.log", "-o", str(out))
    assert res.returncode == 0, explain(res)
    names = set(tar_view(out).recs)
    assert not [n for n in names if n.endswith(".log")]
    assert names == _tree_names("var", exclude_suffix=".log")


def test_several_paths_in_one_tarball(tmp_path):
    out = tmp_path / "x.tar"
    res = rescue("extract", str(SAMPLE), "--path", "/etc", "--path", "/home/alice", "-o", str(out))
    assert res.returncode == 0, explain(res)
    assert set(tar_view(out).recs) == _tree_names("etc") | _tree_names("home/alice")


def test_strip_components_works_as_in_tar(tmp_path):
    out = tmp_path / "x.tar"
    res = rescue("extract", str(SAMPLE), "--path", T.V, "--strip-components", "4", "-o", str(out))
    assert res.returncode == 0, explain(res)
    view = tar_view(out)      # also checks hard links point at stripped names that exist
    want = {n.split("/", 4)[4] for n in _tree_names(VOLS) if n.count("/") >= 4}
    assert set(view.recs) == want


def test_strip_components_into_a_directory(tmp_path):
    out = tmp_path / "restore"
    res = rescue("extract", str(SAMPLE), "--path", T.PG, "--strip-components", "6", "-o", f"{out}/")
    assert res.returncode == 0, explain(res)
    assert (out / "PG_VERSION").read_bytes() == b"15\n"
    assert (out / "base" / "1" / "1259").is_file()
    assert sorted(os.listdir(tmp_path)) == ["restore"]


def test_tar_on_stdout_equals_the_tar_file(tmp_path):
    out = tmp_path / "x.tar"
    res_file = rescue("extract", str(SAMPLE), "--path", T.UP, "-o", str(out))
    res_pipe = rescue("extract", str(SAMPLE), "--path", T.UP, "-o", "-")
    assert res_file.returncode == 0 and res_pipe.returncode == 0, explain(res_pipe)
    assert tar_view(res_pipe.stdout).recs == tar_view(out).recs
    assert os.listdir(tmp_path) == ["x.tar"]


@pytest.mark.parametrize("suffix, decompress", [(".tar.gz", ["gzip", "-dc"]), (".tar.zst", ["zstd", "-dc"])])
def test_compressed_tarballs_are_readable_by_the_standard_tools(tmp_path, suffix, decompress):
    need("tar", decompress[0])
    out = tmp_path / ("volumes" + suffix)
    res = rescue("extract", str(SAMPLE), "--path", T.V, "-o", str(out))
    assert res.returncode == 0, explain(res)
    raw = subprocess.run([*decompress, str(out)], capture_output=True, check=True).stdout
    listed = subprocess.run(["tar", "-tf", "-"], input=raw, capture_output=True, check=True).stdout
    names = {n.rstrip("/") for n in listed.decode().splitlines()}
    assert names == {n for n in _tree_names(VOLS) if "\n" not in n}
    assert tar_view(raw).recs == tar_view(tmp_path.joinpath("plain.tar") if False else raw).recs


def test_gnu_tar_restores_the_same_tree(tmp_path):
    """GNU tar (the tool users will run) extracts our PAX archive to the described tree:
    owners, modes, ns mtimes, xattrs, links, sparse content."""
    need("tar")
    if not IS_ROOT:
        pytest.skip("restoring owners and device nodes with GNU tar needs root")
    out = tmp_path / "all.tar"
    res = rescue("extract", str(SAMPLE), "--path", "/", "-o", str(out))
    assert res.returncode == 0, explain(res)
    dest = tmp_path / "gnu"
    dest.mkdir()
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--same-owner", "--numeric-owner", "-xpf", str(out),
                    "-C", str(dest)], check=True, capture_output=True)
    from common_support import caps_for, compare, tree_view
    got = dir_view(dest)
    for p in [p for p in got.recs if p.startswith("boot/efi/")]:   # the stitched EFI fs: FAT, compared elsewhere
        del got.recs[p]
    want = tree_view(T.SAMPLE_TREE)
    got.recs.pop("boot/efi"), want.recs.pop("boot/efi")            # mount point: the FAT root's metadata
    diffs = compare(got, want, caps_for("ext4"), what="GNU tar -x vs described", ignore={"lost+found"})
    # GNU tar sets a directory's mtime after filling it, as we do; all must match.
    assert not diffs, "\n".join(diffs)


def test_dry_run_list_writes_nothing_and_lists_sizes(tmp_path):
    out = tmp_path / "never.tar"
    res = rescue("extract", str(SAMPLE), "--path", T.PG, "--dry-run", "--list", "-o", str(out))
    assert res.returncode == 0, explain(res)
    assert os.listdir(tmp_path) == []
    text = res.stdout.decode() + res.stderr.decode()
    bad = []
    for p, n in T.all_nodes(T.SAMPLE_TREE).items():
        if p.startswith(T.PG + "/") and n.kind == "file":
            line = next((line for line in text.splitlines() if line.rstrip().endswith(p.lstrip("/"))), None)
            if line is None or str(n.apparent_size) not in line.split():
                bad.append(f"{p} ({n.apparent_size} bytes): {line!r}")
    assert not bad, "\n".join(bad)


def test_dry_run_into_a_directory_creates_nothing(tmp_path):
    res = rescue("extract", str(SAMPLE), "--path", T.V, "--dry-run", "--list", "-o", f"{tmp_path}/restore/")
    assert res.returncode == 0, explain(res)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------ volumes and errors
def test_ambiguous_volumes_give_one_line_naming_the_volume_option(tmp_path):
    image = FS_DIR / "mbr.img"
    res = rescue("extract", str(image), "--path", "/", "-o", str(tmp_path / "x.tar"))
    assert_one_line_error(res)
    assert b"--volume" in res.stderr
    assert not (tmp_path / "x.tar").exists()


@pytest.mark.parametrize("volume, marker", [("1", "mbr-p1-ext4"), ("5", "mbr-p5-ext2"), ("6", "mbr-p6-fat12")])
def test_volume_picks_primary_and_logical_partitions(volume, marker):
    res = rescue("cat", "--volume", volume, str(FS_DIR / "mbr.img"), "/volume.txt")
    if res.returncode == 2 and b"no such option" in res.stderr.lower():
        res = rescue("cat", str(FS_DIR / "mbr.img"), "/volume.txt", "--volume", volume)
    assert res.returncode == 0, explain(res)
    assert res.stdout == f"{marker}\n".encode()


def test_unknown_volume_is_one_clear_error(tmp_path):
    res = rescue("extract", str(FS_DIR / "mbr.img"), "--volume", "9", "-o", str(tmp_path / "x.tar"))
    assert_one_line_error(res)


def test_missing_path_is_one_clear_error(tmp_path):
    res = rescue("extract", str(SAMPLE), "--path", "/var/lib/mysql", "-o", str(tmp_path / "x.tar"))
    assert_one_line_error(res)
    assert b"/var/lib/mysql" in res.stderr


def test_not_a_disk_image_is_one_clear_error(tmp_path):
    junk = tmp_path / "junk.disk"
    junk.write_bytes(b"\x55" * 100_000)
    res = rescue("extract", str(junk), "-o", str(tmp_path / "x.tar"))
    assert_one_line_error(res)
    assert not (tmp_path / "x.tar").exists()
    res = rescue("inspect", str(junk))   # inspect still shows what it found: no filesystem
    assert res.returncode in (0, 2) and b"Traceback" not in res.stderr, explain(res)


# ------------------------------------------------------------------ directory target safety defaults
def test_directory_target_skips_device_nodes_and_setuid_by_default(tmp_path):
    out = tmp_path / "restore"
    res = rescue("extract", str(SAMPLE), "--path", "/dev", "--path", "/usr/local/bin", "-o", f"{out}/")
    assert res.returncode in (0, 1), explain(res)
    assert b"Traceback" not in res.stderr
    view = dir_view(out)
    assert not [p for p, r in view.recs.items() if r.kind in ("char", "block")], view.recs
    assert b"device" in res.stderr.lower(), "skipped device nodes must be reported"
    # root would hand out a setuid-root program, a user one running as that user
    assert view.recs["usr/local/bin/suidtool"].mode & 0o6000 == 0
    assert b"setuid" in res.stderr.lower(), "dropped setuid bits must be reported"
    assert view.recs["usr/local/bin/suidtool"].sha == T.all_nodes(T.SAMPLE_TREE)["/usr/local/bin/suidtool"].sha256
