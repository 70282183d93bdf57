"""Parallels expandable images (ploop, Parallels Desktop .hds, Virtuozzo) and
Parallels Desktop `.hdd` bundles.

References: qemu docs/interop/parallels.txt (header, BAT, format extension),
qemu block/parallels.c (v1 vs v2 BAT units, the 32-bit v1 size, checks),
fox-it dissect.hypervisor `disk/hdd.py` for the bundle's DiskDescriptor.xml.

Image layout: a 64-byte header, the BAT (one little-endian u32 per cluster),
then data clusters. "WithoutFreeSpace" (v1) BAT entries count sectors,
"WithouFreSpacExt" (v2) entries count clusters; 0 is an unallocated cluster
(zeros, or the parent snapshot's data inside a bundle). The format extension
(dirty bitmaps) is listed in info.details and otherwise ignored.

A bundle is a folder `NAME.hdd` holding DiskDescriptor.xml, an empty `NAME.hdd`
stub and the `.hds` storages: the descriptor's <StorageData> lists storages by
start/end sector (a disk split into several files), each with one <Image> per
snapshot (type Plain = raw, Compressed = expandable image as above).
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any
from xml.etree import ElementTree

from construct import Bytes, Const, ConstructError, Int32ul, Int64ul, Struct

from ..errors import DiskFormatError, UnsupportedFeature
from ..source.base import ByteSource
from ..source.split import ConcatSource
from .base import DiskImage, DiskInfo, DiskOptions, RawDisk, header_error, parse_header
from .chain import close_quietly, open_in_chain, open_sibling
from .choices import no_choices
from .mapping import BACKING, DATA, ExtentBuilder, MappedDisk, read_u32le_table

MAGIC_V1 = b"WithoutFreeSpace"   # BAT entries in sectors
MAGIC_V2 = b"WithouFreSpacExt"   # BAT entries in clusters
INUSE_MAGIC = 0x746F6E59         # "Ynot": the image was not closed cleanly

Header = Struct(
    "magic" / Bytes(16),
    "version" / Int32ul,         # 2
    "heads" / Int32ul,
    "cylinders" / Int32ul,
    "tracks" / Int32ul,          # sectors per cluster
    "bat_entries" / Int32ul,
    "nb_sectors" / Int64ul,      # v1: only the low 32 bits count
    "inuse" / Int32ul,
    "data_off" / Int32ul,        # first data sector
    "flags" / Int32ul,
    "ext_off" / Int64ul,         # format extension cluster offset, in sectors
)

ExtHeader = Struct(
    "magic" / Const(0xAB234CEF23DCEA87, Int64ul),
    "checksum" / Bytes(16),
)

ExtFeature = Struct(
    "magic" / Int64ul,           # 0 ends the list
    "flags" / Int64ul,
    "data_size" / Int32ul,
    "unused" / Int32ul,
)

FEATURE_NAMES = {0x20385FAE252CB34A: "dirty-bitmap"}
SECTOR = 512
TABLE_ENTRIES = 4096
MAX_CLUSTER = 1 << 30
MAX_BAT = 1 << 28
MAX_DESCRIPTOR = 1 << 20
MAX_STORAGES = 4096              # each is an open file
NO_PARENT = "{00000000-0000-0000-0000-000000000000}"


def detect(source: ByteSource) -> bool:
    head = source.read(0, 512)
    if head[:16] in (MAGIC_V1, MAGIC_V2):
        return True
    return _is_descriptor(head)


def _is_descriptor(head: bytes) -> bool:
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    return text.startswith(b"<") and b"<Parallels_disk_image" in head


def open(source: ByteSource, options: DiskOptions) -> DiskImage:  # noqa: A001 (reader interface)
    if options.internal_snapshot is not None:
        raise DiskFormatError(f"--internal-snapshot {options.internal_snapshot}: choosing a Parallels snapshot "
                              "is not supported; the newest state is read", file=source.name,
                              hint="drop --internal-snapshot")
    if _is_descriptor(source.read(0, 512)):
        disk: DiskImage = open_in_chain(source, options, lambda: ParallelsBundle(source, options))
    else:
        disk = open_in_chain(source, options, lambda: ParallelsDisk(source))
    return no_choices(disk, options, "Parallels")



_bad = partial(header_error, what="Parallels header")


class ParallelsDisk(MappedDisk):
    """The virtual disk of one expandable Parallels image (optionally over a
    parent: the previous snapshot's storage inside a bundle)."""

    def __init__(self, source: ByteSource, backing: DiskImage | None = None,
                 expect_size: int | None = None) -> None:
        super().__init__(source)
        self.backing = backing
        h = parse_header(source, Header, "Parallels header")
        if h.magic not in (MAGIC_V1, MAGIC_V2):
            raise _bad(source, "magic", h.magic, "not a Parallels expandable image")
        if h.version != 2:
            raise UnsupportedFeature(f"Parallels header version {h.version}: only 2 is read",
                                     file=source.name)
        cluster = h.tracks * SECTOR
        if not 0 < cluster <= MAX_CLUSTER:
            raise _bad(source, "tracks", h.tracks, "cluster size must be 1 sector .. 1 GiB")
        if h.bat_entries > MAX_BAT:
            raise _bad(source, "bat_entries", h.bat_entries, f"more than {MAX_BAT}")
        if Header.sizeof() + h.bat_entries * 4 > source.size:
            raise _bad(source, "bat_entries", h.bat_entries,
                       f"the BAT ({h.bat_entries * 4} bytes) runs past the end of the file "
                       f"({source.size} bytes)")
        sectors = h.nb_sectors & 0xFFFFFFFF if h.magic == MAGIC_V1 else h.nb_sectors
        if sectors * SECTOR > h.bat_entries * cluster:
            raise _bad(source, "bat_entries", h.bat_entries,
                       f"the BAT maps {h.bat_entries * cluster} bytes but nb_sectors={sectors} says "
                       f"the disk is {sectors * SECTOR} bytes (catalog too small: a hand-crafted or "
                       "damaged header)")
        self.header = h
        self.cluster = cluster
        self.unit = SECTOR if h.magic == MAGIC_V1 else cluster
        self.size = sectors * SECTOR if expect_size is None else expect_size
        self.span = TABLE_ENTRIES * cluster
        self._init_table_cache(TABLE_ENTRIES)
        warnings: list[str] = []
        if h.inuse == INUSE_MAGIC:
            warnings.append("the image was not closed cleanly (inuse flag set); reading it as it is")
        details: dict[str, Any] = {"version": "v1 (WithoutFreeSpace)" if h.magic == MAGIC_V1
                                   else "v2 (WithouFreSpacExt)",
                                   "bat_entries": h.bat_entries, "data_off": h.data_off}
        if h.magic == MAGIC_V2 and h.ext_off:
            details["format_extension"] = self._extensions(h.ext_off)
        self.info = DiskInfo(format="parallels", subformat="expanding", virtual_size=self.size,
                             allocated_size=source.size, cluster_size=cluster, details=details,
                             warnings=warnings)

    def _extensions(self, ext_off: int) -> dict[str, Any]:
        """Names of the format extension's features: reported, never applied."""
        where = ext_off * SECTOR
        out: dict[str, Any] = {"offset": where, "features": [], "note": "ignored (dirty bitmaps "
                               "describe changes for incremental backup, not disk content)"}
        blob = self.source.read(where, min(self.cluster, 1 << 20))
        try:
            ExtHeader.parse(blob)
        except ConstructError:
            out["features"].append("unreadable extension header")
            return out
        pos = ExtHeader.sizeof()
        while pos + ExtFeature.sizeof() <= len(blob) and len(out["features"]) < 64:
            f = ExtFeature.parse(blob[pos:])
            if f.magic == 0:
                break
            out["features"].append(FEATURE_NAMES.get(f.magic, f"0x{f.magic:016x}"))
            pos += ExtFeature.sizeof() + ((f.data_size + 7) & ~7)
        return out

    def _decode_table(self, index: int):
        h, cluster = self.header, self.cluster
        first = index * TABLE_ENTRIES
        count = max(0, min(TABLE_ENTRIES, h.bat_entries - first))
        entries = read_u32le_table(self.source, Header.sizeof() + first * 4, count, "Parallels BAT")
        b = ExtentBuilder()
        add, unit = b.add, self.unit
        for i, e in enumerate(entries):
            if e == 0:   # unallocated: the parent's data, else zeros
                add(i * cluster, cluster, BACKING)
            else:
                add(i * cluster, cluster, DATA, e * unit)
        if count < TABLE_ENTRIES:
            add(count * cluster, (TABLE_ENTRIES - count) * cluster, BACKING)
        return b.done()



# -- Parallels Desktop bundles ------------------------------------------------

def _text(elem: ElementTree.Element | None, tag: str, default: str = "") -> str:
    found = elem.find(tag) if elem is not None else None
    return (found.text or "").strip() if found is not None else default


def _int(source: ByteSource, elem: ElementTree.Element, tag: str) -> int:
    value = _text(elem, tag)
    if not re.fullmatch(r"\d{1,20}", value):
        raise DiskFormatError(f"DiskDescriptor.xml: <{tag}> is {value!r}, not a number",
                              file=source.name)
    return int(value)


def parse_descriptor(source: ByteSource) -> ElementTree.Element:
    if source.size > MAX_DESCRIPTOR:
        raise DiskFormatError(f"DiskDescriptor.xml is {source.size} bytes: too large for a descriptor",
                              file=source.name)
    data = source.read(0, source.size)
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:   # no entities: nothing to expand or fetch
        raise DiskFormatError("DiskDescriptor.xml declares a DOCTYPE/ENTITY: refused",
                              file=source.name)
    try:
        return ElementTree.fromstring(data)
    except ElementTree.ParseError as exc:
        raise DiskFormatError(f"DiskDescriptor.xml is not valid XML ({exc})", file=source.name) from None


class ParallelsBundle(DiskImage):
    """A Parallels Desktop .hdd bundle, read through its DiskDescriptor.xml."""

    def __init__(self, source: ByteSource, options: DiskOptions) -> None:
        self.source = source
        self.name = source.name
        root = parse_descriptor(source)
        params = root.find("Disk_Parameters")
        if params is None:
            raise DiskFormatError("DiskDescriptor.xml has no <Disk_Parameters>", file=source.name)
        self.size = _int(source, params, "Disk_size") * SECTOR
        engine = _text(params.find("Encryption"), "Engine", NO_PARENT)
        if engine and engine != NO_PARENT:
            raise UnsupportedFeature(f"encrypted Parallels disk (engine {engine})", file=source.name)
        chain = self._snapshot_chain(root)
        storages = root.findall("StorageData/Storage")
        if not storages:
            raise DiskFormatError("DiskDescriptor.xml lists no <Storage>", file=source.name)
        if len(storages) > MAX_STORAGES:
            raise DiskFormatError(f"DiskDescriptor.xml lists {len(storages)} storages (more than "
                                  f"{MAX_STORAGES})", file=source.name)
        self._open: list[ByteSource] = []
        parts: list[tuple[int, ByteSource]] = []
        pos = 0
        files: list[str] = []
        types: set[str] = set()
        try:
            for st in sorted(storages, key=lambda s: _int(source, s, "Start")):
                start, end = _int(source, st, "Start"), _int(source, st, "End")
                if start * SECTOR != pos or end <= start:
                    raise DiskFormatError(f"DiskDescriptor.xml: storage {start}..{end} (sectors) does "
                                          f"not follow the previous one (ends at {pos // SECTOR})",
                                          file=source.name)
                length = (end - start) * SECTOR
                disk = self._open_storage(st, chain, length, files, types)
                parts.append((length, disk))
                pos = end * SECTOR
        except BaseException:
            self.close()
            raise
        if pos < self.size:
            parts.append((self.size - pos, RawDisk(_Empty(source.name))))
        self.disk = ConcatSource(parts, name=source.name)
        self.info = DiskInfo(
            format="parallels", subformat="bundle (" + "/".join(sorted(types)) + ")",
            virtual_size=self.size, allocated_size=sum(s.size for s in self._open), backing_chain=[],
            details={"storages": files, "snapshots": len(chain), "descriptor": source.name},
        )

    def _snapshot_chain(self, root: ElementTree.Element) -> list[str]:
        """GUIDs from the newest snapshot down to the base image."""
        parent_of = {_text(s, "GUID"): _text(s, "ParentGUID", NO_PARENT)
                     for s in root.findall("Snapshots/Shot")}
        if not parent_of:
            return []
        leaves = [g for g in parent_of if g not in parent_of.values()]
        chain = [leaves[0] if leaves else next(iter(parent_of))]
        while parent_of.get(chain[-1], NO_PARENT) not in (NO_PARENT, "") and len(chain) < 64:
            nxt = parent_of[chain[-1]]
            if nxt in chain:
                raise DiskFormatError("DiskDescriptor.xml: snapshot parents loop", file=self.name)
            chain.append(nxt)
        return chain

    def _open_storage(self, st: ElementTree.Element, chain: list[str], length: int,
                      files: list[str], types: set[str]) -> DiskImage:
        images = {_text(im, "GUID"): im for im in st.findall("Image")}
        if not images:
            raise DiskFormatError("DiskDescriptor.xml: a <Storage> has no <Image>", file=self.name)
        order = [g for g in reversed(chain) if g in images] or [next(iter(images))]
        disk: DiskImage | None = None
        for guid in order:   # base first, each snapshot over its parent
            im = images[guid]
            kind, fname = _text(im, "Type"), _text(im, "File")
            if not fname or "/" in fname or "\\" in fname or fname in (".", ".."):
                raise DiskFormatError(f"DiskDescriptor.xml: storage file name {fname!r} refused",
                                      file=self.name)
            src = open_sibling(self.source, fname, "Parallels storage",
                               hint="the .hds files must stay inside the .hdd folder, uncompressed")
            self._open.append(src)
            files.append(fname)
            types.add(kind or "?")
            if kind == "Plain":
                close_quietly(disk)
                disk = RawDisk(src)
            elif kind == "Compressed":
                if src.read(0, 16) not in (MAGIC_V1, MAGIC_V2):
                    raise DiskFormatError(f"storage {fname} is type Compressed but has no Parallels "
                                          "header", file=self.name)
                disk = ParallelsDisk(src, backing=disk, expect_size=length)
            else:
                raise UnsupportedFeature(f"DiskDescriptor.xml: storage type {kind!r} of {fname}",
                                         file=self.name)
        assert disk is not None
        return disk

    def read(self, offset: int, length: int) -> bytes:
        return self.disk.read(offset, length)

    def runs(self, offset: int, length: int):
        return self.disk.runs(offset, length)

    def close(self) -> None:
        for src in getattr(self, "_open", []):
            close_quietly(src)
        self._open = []


class _Empty:
    """Zero bytes, for a descriptor whose storages end before Disk_size."""

    def __init__(self, name: str) -> None:
        self.name, self.size = name, 0

    def read(self, offset: int, length: int) -> bytes:
        return b""

    def close(self) -> None:
        pass
