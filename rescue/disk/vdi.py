"""VirtualBox VDI, static (fixed), dynamic (normal) and differencing images, header 1.1.

References:
- VirtualBox src/VBox/Storage/VDICore.h (VDIPREHEADER, VDIHEADER1PLUS,
  VDI_IMAGE_BLOCK_FREE / VDI_IMAGE_BLOCK_ZERO).
- qemu block/vdi.c (the same layout, as qemu-img writes it).

A block map of one little-endian u32 per block gives the block's index in
the data area; 0xFFFFFFFF is a free block (zeros, or the parent's block in a
differencing image) and 0xFFFFFFFE a zeroed one. A differencing image names
its parent only by UUID: we look for it among the .vdi files next to it and
one folder up (VirtualBox keeps snapshots in <VM>/Snapshots/), or take
--backing.
"""

from __future__ import annotations

import os
import uuid
from functools import partial

from construct import Bytes, Const, Int32ul, Int64ul, Struct

from ..errors import DiskFormatError, RescueError, UnsupportedFeature
from ..source.base import ByteSource, FileSource
from .base import DiskInfo, DiskOptions, header_error, parse_header
from .chain import open_as_parent, open_in_chain
from .mapping import BACKING, DATA, ZERO, ExtentBuilder, MappedDisk, read_u32le_table

SIGNATURE = 0xBEDA107F
VERSION_1_1 = 0x00010001

PreHeader = Struct(
    "text" / Bytes(64),
    "signature" / Const(SIGNATURE, Int32ul),
    "version" / Int32ul,
)

# VDIHEADER1PLUS, right after the pre-header.
Header = Struct(
    "header_size" / Int32ul,
    "image_type" / Int32ul,
    "image_flags" / Int32ul,
    "description" / Bytes(256),
    "offset_bmap" / Int32ul,
    "offset_data" / Int32ul,
    "cylinders" / Int32ul,
    "heads" / Int32ul,
    "sectors" / Int32ul,
    "sector_size" / Int32ul,
    "unused" / Int32ul,
    "disk_size" / Int64ul,
    "block_size" / Int32ul,
    "block_extra" / Int32ul,
    "blocks_in_image" / Int32ul,
    "blocks_allocated" / Int32ul,
    "uuid_image" / Bytes(16),
    "uuid_last_snap" / Bytes(16),
    "uuid_link" / Bytes(16),
    "uuid_parent" / Bytes(16),
)

TYPE_NAMES = {1: "dynamic", 2: "static", 3: "undo", 4: "differencing"}
BLOCK_FREE = 0xFFFFFFFF
BLOCK_ZERO = 0xFFFFFFFE
MAX_BLOCKS = 1 << 28                 # 1 GiB of block map: far beyond any real disk
MAX_BLOCK_SIZE = 1 << 30
TABLE_BLOCKS = 4096                  # block-map entries decoded per table


def detect(source: ByteSource) -> bool:
    head = source.read(64, 4)
    return len(head) == 4 and int.from_bytes(head, "little") == SIGNATURE


def open(source: ByteSource, options: DiskOptions) -> "VdiDisk":  # noqa: A001 (reader interface)
    if options.internal_snapshot is not None:
        raise DiskFormatError(f"--internal-snapshot {options.internal_snapshot}: VDI files hold no internal snapshots "
                              "(VirtualBox keeps each snapshot in its own differencing VDI)",
                              file=source.name)
    return open_in_chain(source, options, lambda: VdiDisk(source, options))


_bad = partial(header_error, what="VDI header")


class VdiDisk(MappedDisk):
    """The virtual disk of a static, dynamic or differencing VDI image."""

    def __init__(self, source: ByteSource, options: DiskOptions | None = None) -> None:
        options = options or DiskOptions()
        super().__init__(source)
        pre = parse_header(source, PreHeader, "VDI header")
        h = parse_header(source, Header, "VDI header", offset=PreHeader.sizeof())
        if pre.version != VERSION_1_1:
            raise UnsupportedFeature(f"VDI header version {pre.version >> 16}.{pre.version & 0xFFFF}: "
                                     "only 1.1 is read", file=source.name)
        kind = TYPE_NAMES.get(h.image_type)
        if kind is None:
            raise _bad(source, "image_type", h.image_type, "unknown")
        if kind == "undo":
            raise UnsupportedFeature("VDI undo image: not supported", file=source.name,
                                     hint="merge it in VirtualBox or use VBoxManage clonemedium")
        if any(h.uuid_link):
            kind = "differencing"
        bs = h.block_size
        if bs < 512 or bs > MAX_BLOCK_SIZE or bs & (bs - 1):
            raise _bad(source, "block_size", bs, "must be a power of two, 512 B .. 1 GiB")
        if h.block_extra > MAX_BLOCK_SIZE:
            raise _bad(source, "block_extra", h.block_extra, "absurd")
        if h.blocks_in_image > MAX_BLOCKS:
            raise _bad(source, "blocks_in_image", h.blocks_in_image, f"more than {MAX_BLOCKS}")
        if h.disk_size > h.blocks_in_image * bs:
            raise _bad(source, "disk_size", h.disk_size,
                       f"larger than blocks_in_image*block_size ({h.blocks_in_image}*{bs})")
        if h.offset_bmap + h.blocks_in_image * 4 > source.size:
            raise _bad(source, "offset_bmap", h.offset_bmap,
                       f"block map ({h.blocks_in_image} entries) is past the end of the file "
                       f"({source.size} bytes)")
        if h.offset_data > source.size and h.blocks_allocated:
            raise _bad(source, "offset_data", h.offset_data, "past the end of the file")
        self.header = h
        self.block_size = bs
        self.size = h.disk_size
        self.span = TABLE_BLOCKS * bs
        self._init_table_cache(TABLE_BLOCKS)
        details = {"blocks": h.blocks_in_image, "blocks_allocated": h.blocks_allocated,
                   "uuid": str(uuid.UUID(bytes_le=h.uuid_image)),
                   "creator": pre.text.split(b"\0")[0].decode("ascii", "replace").strip()}
        warnings: list[str] = []
        if kind == "differencing":
            details["parent_uuid"] = str(uuid.UUID(bytes_le=h.uuid_link))
            self.backing = _open_parent(self, h.uuid_link, options, warnings)
        elif options.backing:
            warnings.append(f"--backing {options.backing} ignored: a {kind} VDI has no parent")
        parent_info = getattr(self.backing, "info", None)
        self.info = DiskInfo(
            format="vdi", subformat=kind, virtual_size=self.size, allocated_size=source.size,
            cluster_size=bs, details=details,
            backing_chain=self.backing_chain(),
            warnings=warnings + (list(parent_info.warnings) if parent_info else []),
        )

    def _decode_table(self, index: int):
        h, bs = self.header, self.block_size
        first = index * TABLE_BLOCKS
        count = max(0, min(TABLE_BLOCKS, h.blocks_in_image - first))
        entries = read_u32le_table(self.source, h.offset_bmap + first * 4, count, "VDI block map")
        b = ExtentBuilder()
        add, stride, base = b.add, bs + h.block_extra, h.offset_data + h.block_extra
        for i, e in enumerate(entries):
            if e == BLOCK_FREE:  # the parent's block in a differencing image, else zeros
                add(i * bs, bs, BACKING)
            elif e == BLOCK_ZERO:
                add(i * bs, bs, ZERO)
            else:
                add(i * bs, bs, DATA, base + e * stride)
        if count < TABLE_BLOCKS:  # past the last block: nothing is stored
            add(count * bs, (TABLE_BLOCKS - count) * bs, ZERO)
        return b.done()



MAX_PARENT_CANDIDATES = 1000


def _open_parent(child: VdiDisk, want: bytes, options: DiskOptions, warnings: list[str]):
    """Open the parent of a differencing VDI: --backing, else found by UUID."""
    from . import open_disk
    from ..source.open import open_source

    shown = str(uuid.UUID(bytes_le=want))
    if options.backing:
        try:
            src = open_source(options.backing)
        except RescueError as exc:
            raise DiskFormatError(f"parent VDI {options.backing!r} not found ({exc.one_line()})",
                                  file=child.name) from None
        if _uuid_of(src) not in (want, None):
            warnings.append(f"--backing {options.backing} is not the parent this image names "
                            f"(UUID {shown}); reading it anyway")
    else:
        src = _find_by_uuid(child.source, want)
        if src is None:
            raise DiskFormatError(
                f"differencing VDI: parent image with UUID {shown} not found next to it",
                file=child.name, hint="pass the parent .vdi with --backing PATH (VirtualBox keeps it "
                "in the VM folder, snapshots in its Snapshots/ folder)")
    return open_as_parent(src, options, open_disk)


def _uuid_of(src: ByteSource) -> bytes | None:
    head = src.read(0, 72 + Header.sizeof())
    if len(head) < 72 + Header.sizeof() or int.from_bytes(head[64:68], "little") != SIGNATURE:
        return None
    return Header.parse(head[72:]).uuid_image


def _find_by_uuid(source: ByteSource, want: bytes) -> ByteSource | None:
    path = getattr(source, "path", None)
    if not path:  # an archive member or URL: no folder to look through
        return None
    here = os.path.dirname(os.path.abspath(path))
    seen = 0
    for folder in (here, os.path.dirname(here)):
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            if not entry.name.lower().endswith(".vdi") or not entry.is_file():
                continue
            seen += 1
            if seen > MAX_PARENT_CANDIDATES:
                return None
            try:
                candidate = FileSource(entry.path)
            except RescueError:
                continue
            if candidate.identity != getattr(source, "identity", None) and _uuid_of(candidate) == want:
                return candidate
            candidate.close()
    return None
