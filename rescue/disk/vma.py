"""Proxmox VE backups (vzdump `.vma`, usually as .vma.zst/.vma.gz/.vma.lzo).

References: Proxmox pve-qemu `vma_spec.txt` (header, device table, blob
buffer, extents) and `vma-reader.c` (blob sizes are little-endian, blob
offsets count from the blob buffer, block mask bit j = 4 KiB block j).

Layout (big-endian): a header ("VMA\\0", uuid, MD5 over the header) holding
config blobs (qemu-server.conf, firewall) and up to 255 devices (name, size),
then extents: a 512-byte header ("VMAE", uuid, MD5, 59 blockinfo words of
mask:16, reserved:8, dev_id:8, cluster:32) followed by the non-zero 4 KiB
blocks of those 64 KiB clusters, in order. A VMA is written as a stream, so
there is no index: opening makes one sequential pass over the extent headers
and keeps, for the chosen device, one u64 per cluster ((file offset / 512) << 16
| mask): 8 bytes per 64 KiB.

A VMA holds every disk of the VM: the first device (by id) that is not
`vmstate` is read; all are listed in info.details, and `--internal-snapshot NAME`
(a VMA has no snapshots) picks another device by name, e.g. drive-scsi1.
"""

from __future__ import annotations

import hashlib
import sys
import uuid
from array import array
from functools import lru_cache

from construct import Array, Bytes, Const, ConstructError, Int32ub, Int64sb, Int64ub, Struct

from ..errors import DiskFormatError
from ..source.base import ByteSource
from .base import DiskInfo, DiskOptions, parse_header
from .bitmaps import bitmap_runs
from .mapping import DAMAGED, DATA, ZERO, ExtentBuilder, MappedDisk

BLOCK = 4096
CLUSTER = 65536
BLOCKS_PER_CLUSTER = CLUSTER // BLOCK
EXTENT_HEADER = 512
CLUSTERS_PER_EXTENT = 59

DeviceInfo = Struct(
    "devname_ptr" / Int32ub,     # offset into the blob buffer; 0 = no device
    "reserved0" / Int32ub,
    "size" / Int64ub,
    "reserved1" / Bytes(16),
)

Header = Struct(
    "magic" / Const(b"VMA\0"),
    "version" / Int32ub,         # 1
    "uuid" / Bytes(16),
    "ctime" / Int64sb,
    "md5sum" / Bytes(16),        # over header_size bytes, this field zeroed
    "blob_buffer_offset" / Int32ub,
    "blob_buffer_size" / Int32ub,
    "header_size" / Int32ub,
    "reserved" / Bytes(2044 - 60),
    "config_names" / Array(256, Int32ub),
    "config_data" / Array(256, Int32ub),
    "reserved2" / Bytes(4),
    "dev_info" / Array(256, DeviceInfo),
)

ExtentHeader = Struct(
    "magic" / Const(b"VMAE"),
    "reserved" / Bytes(2),
    "block_count" / Bytes(2),    # u16 big-endian: 4 KiB blocks stored after the header
    "uuid" / Bytes(16),
    "md5sum" / Bytes(16),        # over the 512 bytes, this field zeroed
    "blockinfo" / Bytes(8 * CLUSTERS_PER_EXTENT),
)

MAX_HEADER = 16 << 20
MAX_DEVICE = 1 << 50           # 1 PiB
MAX_CLUSTERS = 1 << 27         # 1 GiB of index (8 TiB device) at most
TABLE_CLUSTERS = 4096


def detect(source: ByteSource) -> bool:
    head = source.read(0, 8)
    return len(head) == 8 and head[:4] == b"VMA\0" and int.from_bytes(head[4:8], "big") == 1


def open(source: ByteSource, options: DiskOptions) -> "VmaDisk":  # noqa: A001 (reader interface)
    return VmaDisk(source, device=options.internal_snapshot)


@lru_cache(maxsize=4096)
def _mask_runs(mask: int) -> tuple[tuple[int, int, int], ...]:
    return tuple(bitmap_runs(mask.to_bytes(2, "little"), BLOCKS_PER_CLUSTER, lsb_first=True))


class VmaDisk(MappedDisk):
    def __init__(self, source: ByteSource, device: str | None = None) -> None:
        super().__init__(source)
        h, raw = self._header()
        blob = raw[h.blob_buffer_offset:h.blob_buffer_offset + h.blob_buffer_size]
        configs = []
        for n, d in zip(h.config_names, h.config_data):
            if n or d:
                configs.append(_blob_str(blob, n, source))
        devices = {}
        for dev_id, di in enumerate(h.dev_info):
            if dev_id == 0 or di.devname_ptr == 0:
                continue
            if di.size > MAX_DEVICE:
                raise DiskFormatError(f"VMA device {dev_id}: size={di.size} is absurd", file=source.name)
            devices[dev_id] = (_blob_str(blob, di.devname_ptr, source), di.size)
        if not devices:
            raise DiskFormatError("VMA header lists no devices", file=source.name)
        names = {name: i for i, (name, _) in devices.items()}
        if device is not None:
            if device not in names:
                raise DiskFormatError(f"VMA has no device {device!r}", file=source.name,
                                      hint="devices: " + ", ".join(names))
            self.dev_id = names[device]
        else:
            disks = [i for i, (name, _) in sorted(devices.items()) if name != "vmstate"]
            self.dev_id = disks[0] if disks else min(devices)
        self.device_name, self.size = devices[self.dev_id]
        self.uuid = h.uuid
        self.nclusters = -(-self.size // CLUSTER)
        if self.nclusters > MAX_CLUSTERS:
            raise DiskFormatError(f"VMA device {self.device_name}: {self.size} bytes is more than this "
                                  "reader indexes", file=source.name)
        # A .vma.zst made by one zstd call is one frame: say so, with the fix.
        warnings: list[str] = [f"{note} (for a VMA: `zstd -d` it once, then read the .vma)"
                               for note in getattr(source, "notes", [])]
        self.truncated = False
        self.index = self._scan(h.header_size, warnings)
        self.span = TABLE_CLUSTERS * CLUSTER
        self._init_table_cache(TABLE_CLUSTERS)
        self.info = DiskInfo(
            format="vma", subformat=f"device {self.dev_id} ({self.device_name})", virtual_size=self.size,
            allocated_size=source.size, cluster_size=CLUSTER, warnings=warnings,
            details={"uuid": str(uuid.UUID(bytes=h.uuid)), "ctime": h.ctime, "configs": configs,
                     "devices": [{"id": i, "name": n, "size": s} for i, (n, s) in sorted(devices.items())],
                     "selected": self.device_name,
                     "hint": "pick another device with --internal-snapshot NAME"},
        )

    def _header(self):
        src = self.source
        h = parse_header(src, Header, "VMA header")
        if not Header.sizeof() <= h.header_size <= MAX_HEADER or h.header_size % 512:
            raise DiskFormatError(f"VMA header: header_size={h.header_size}: must be a multiple of 512, "
                                  f"{Header.sizeof()} .. {MAX_HEADER}", file=src.name)
        if h.blob_buffer_offset + h.blob_buffer_size > h.header_size:
            raise DiskFormatError(f"VMA header: blob buffer {h.blob_buffer_offset}+{h.blob_buffer_size} "
                                  f"is outside the header ({h.header_size} bytes)", file=src.name)
        raw = src.read(0, h.header_size)
        if len(raw) < h.header_size:
            raise DiskFormatError(f"VMA header: header_size={h.header_size} but the file has "
                                  f"{src.size} bytes", file=src.name)
        if hashlib.md5(raw[:32] + bytes(16) + raw[48:]).digest() != h.md5sum:
            raise DiskFormatError("VMA header checksum (MD5) does not match: damaged header",
                                  file=src.name)
        return h, raw

    def _scan(self, offset: int, warnings: list[str]) -> array:
        """One pass over the extent headers: where each cluster of our device is."""
        index = array("Q", bytes(8 * self.nclusters))
        src, want, end = self.source, self.dev_id, self.source.size
        extents = 0
        while offset < end:
            raw = src.read(offset, EXTENT_HEADER)
            if len(raw) < EXTENT_HEADER:
                self._truncated(warnings, f"the archive ends inside the extent header at {offset}")
                break
            try:
                e = ExtentHeader.parse(raw)
            except ConstructError:
                self._truncated(warnings, f"no extent header at offset {offset} (damaged or "
                                f"truncated archive)")
                break
            if e.uuid != self.uuid or hashlib.md5(raw[:24] + bytes(16) + raw[40:]).digest() != e.md5sum:
                self._truncated(warnings, f"extent at offset {offset} has a bad checksum or uuid")
                break
            count = int.from_bytes(e.block_count, "big")
            info = array("Q", e.blockinfo)
            if sys.byteorder == "little":
                info.byteswap()
            host = offset + EXTENT_HEADER
            for bi in info:   # 59 words per extent: metadata, one pass
                if not bi:
                    continue
                mask, dev, cluster = bi >> 48, (bi >> 32) & 0xFF, bi & 0xFFFFFFFF
                if dev == want and cluster < self.nclusters:
                    index[cluster] = (host // 512) << 16 | mask
                host += bin(mask).count("1") * BLOCK
            if host != offset + EXTENT_HEADER + count * BLOCK:
                raise DiskFormatError(f"VMA extent at offset {offset}: block_count={count} does not match "
                                      "its block masks", file=self.name)
            offset = host
            extents += 1
        if offset > end:
            self._truncated(warnings, "the last extent's data runs past the end of the file")
        return index

    def _truncated(self, warnings: list[str], why: str) -> None:
        self.truncated = True
        warnings.append(f"{why}: clusters after it are missing and read as an I/O error")

    def _decode_table(self, index: int):
        first = index * TABLE_CLUSTERS
        entries = self.index[first:first + TABLE_CLUSTERS]
        b = ExtentBuilder()
        missing = "not in the archive (it ends early)" if self.truncated else None
        for i, e in enumerate(entries):
            pos = i * CLUSTER
            if e == 0:   # never written: zeros in a complete archive
                b.add(pos, CLUSTER, *((DAMAGED, missing) if missing else (ZERO,)))
                continue
            mask, host = e & 0xFFFF, (e >> 16) * 512
            if mask == 0xFFFF:
                b.add(pos, CLUSTER, DATA, host)
            elif mask == 0:
                b.add(pos, CLUSTER, ZERO)
            else:
                for first_block, n, one in _mask_runs(mask):
                    if one:
                        b.add(pos + first_block * BLOCK, n * BLOCK, DATA, host)
                        host += n * BLOCK
                    else:
                        b.add(pos + first_block * BLOCK, n * BLOCK, ZERO)
        done = len(entries) * CLUSTER
        if done < self.span:
            b.add(done, self.span - done, ZERO)
        return b.done()



def _blob_str(blob: bytes, ptr: int, source: ByteSource) -> str:
    """A NUL-terminated string blob: u16 little-endian size, then the bytes."""
    if ptr + 2 > len(blob):
        raise DiskFormatError(f"VMA header: blob offset {ptr} is outside the blob buffer", file=source.name)
    size = int.from_bytes(blob[ptr:ptr + 2], "little")
    data = blob[ptr + 2:ptr + 2 + size]
    if len(data) < size:
        raise DiskFormatError(f"VMA header: blob at {ptr} (+{size}) runs past the blob buffer",
                              file=source.name)
    return data.split(b"\0", 1)[0].decode("utf-8", "replace")



