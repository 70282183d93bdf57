"""Small writers for test images no tool on Debian can make: Proxmox VMA (the
`vma` tool ships only with Proxmox's pve-qemu) and Apple UDIF .dmg (hdiutil is
macOS-only).

Both follow the published layouts field by field with struct.pack at the
spec's byte offsets, independently of the readers' construct Structs, so a
misread field in a reader is not mirrored here:
- VMA: Proxmox pve-qemu vma_spec.txt (header bytes 0-59, config_names at 2044,
  config_data at 3068, dev_info at 4096, blob buffer at 12288 with 2-byte
  little-endian sizes and offset 0 unused as vma-writer.c does; extents of a
  512-byte header + up to 59 clusters' non-zero 4 KiB blocks, MD5 over each
  header with its md5 field zeroed).
- UDIF: koly trailer (512 bytes at the end), XML plist resource-fork/blkx
  with one 'mish' table (204-byte header + 40-byte chunk entries).
"""

from __future__ import annotations

import bz2
import hashlib
import lzma
import plistlib
import struct
import zlib

VMA_CLUSTER = 65536
VMA_BLOCK = 4096


def _md5_patch(buf: bytearray, at: int) -> None:
    buf[at:at + 16] = bytes(16)
    buf[at:at + 16] = hashlib.md5(bytes(buf)).digest()


def vma_bytes(devices: list[tuple[str, bytes]], configs: dict[str, bytes],
              uid: bytes = bytes(range(16)), ctime: int = 1700000000) -> bytes:
    """A complete VMA archive holding `devices` (dev_id 1, 2, ... in order);
    extents interleave the devices' clusters, like vzdump's writer does."""
    blob = bytearray(b"\0")   # offset 0 means "no blob"

    def add(data: bytes) -> int:
        ptr = len(blob)
        blob.extend(struct.pack("<H", len(data)) + data)
        return ptr

    names, datas = [], []
    for name, data in configs.items():
        names.append(add(name.encode() + b"\0"))
        datas.append(add(data))
    dev_ptrs = [add(name.encode() + b"\0") for name, _ in devices]
    blob.extend(bytes(-len(blob) % 512))
    header_size = 12288 + len(blob)
    head = bytearray(header_size)
    head[0:4] = b"VMA\0"
    struct.pack_into(">I", head, 4, 1)
    head[8:24] = uid
    struct.pack_into(">q", head, 24, ctime)
    struct.pack_into(">III", head, 48, 12288, len(blob), header_size)
    for i, (n, d) in enumerate(zip(names, datas)):
        struct.pack_into(">I", head, 2044 + 4 * i, n)
        struct.pack_into(">I", head, 3068 + 4 * i, d)
    for i, ((_, data), ptr) in enumerate(zip(devices, dev_ptrs)):
        struct.pack_into(">IIQ", head, 4096 + 32 * (i + 1), ptr, 0, len(data))
    head[12288:] = blob
    _md5_patch(head, 32)

    # Clusters in the order a backup job would meet them: round robin over devices.
    todo = []
    longest = max(-(-len(d) // VMA_CLUSTER) for _, d in devices)
    for c in range(longest):
        for dev_id, (_, data) in enumerate(devices, 1):
            if c * VMA_CLUSTER < len(data):
                todo.append((dev_id, c, data[c * VMA_CLUSTER:(c + 1) * VMA_CLUSTER].ljust(VMA_CLUSTER, b"\0")))
    out = [bytes(head)]
    for i in range(0, len(todo), 59):
        infos, payload = [], []
        for dev_id, c, chunk in todo[i:i + 59]:
            mask = 0
            for j in range(16):
                block = chunk[j * VMA_BLOCK:(j + 1) * VMA_BLOCK]
                if block.count(0) != VMA_BLOCK:
                    mask |= 1 << j
                    payload.append(block)
            infos.append(mask << 48 | dev_id << 32 | c)
        ext = bytearray(512)
        ext[0:4] = b"VMAE"
        struct.pack_into(">H", ext, 6, len(payload))
        ext[8:24] = uid
        for k, info in enumerate(infos):
            struct.pack_into(">Q", ext, 40 + 8 * k, info)
        _md5_patch(ext, 24)
        out.append(bytes(ext))
        out.extend(payload)
    return b"".join(out)


# -- UDIF ---------------------------------------------------------------------

DMG_ZERO, DMG_RAW, DMG_IGNORE = 0x00000000, 0x00000001, 0x00000002
DMG_ADC, DMG_ZLIB, DMG_BZIP2, DMG_LZFSE, DMG_LZMA = 0x80000004, 0x80000005, 0x80000006, 0x80000007, 0x80000008
DMG_TERM = 0xFFFFFFFF


def _compress(kind: int, data: bytes) -> bytes:
    if kind == DMG_RAW:
        return data
    if kind == DMG_ZLIB:
        return zlib.compress(data)
    if kind == DMG_BZIP2:
        return bz2.compress(data)
    if kind == DMG_LZMA:
        return lzma.compress(data)
    if kind == DMG_LZFSE:
        import lzfse
        return lzfse.compress(data)
    if kind == DMG_ADC:   # not a real ADC stream: readers must refuse the chunk type
        return b"\x80" + data[:127]
    return b""


def dmg_bytes(disk: bytes, layout: list[tuple[int, int, int]]) -> bytes:
    """A UDIF image of `disk` (a multiple of 512 bytes) whose chunks are
    (first sector, sector count, type); sectors outside every chunk are left
    out (a gap between chunks reads as zeros)."""
    fork = bytearray()
    entries = []
    for start, count, kind in layout:
        data = disk[start * 512:(start + count) * 512]
        comp = _compress(kind, data)
        entries.append(struct.pack(">IIQQQQ", kind, 0, start, count, len(fork), len(comp)))
        fork.extend(comp)
    end = max(s + c for s, c, _ in layout)
    entries.append(struct.pack(">IIQQQQ", DMG_TERM, 0, end, 0, len(fork), 0))
    mish = bytearray(b"mish" + struct.pack(">IQQQII", 1, 0, end, 0, 0x208, 0))
    mish += bytes(24)                                    # reserved
    mish += struct.pack(">II", 2, 32) + bytes(128)      # checksum (type CRC32, not checked)
    mish += struct.pack(">I", len(entries))
    assert len(mish) == 204
    mish += b"".join(entries)
    plist = plistlib.dumps({"resource-fork": {"blkx": [
        {"Attributes": "0x0050", "CFName": "whole disk (test)", "Data": bytes(mish), "ID": "0",
         "Name": "whole disk (test)"}]}}, fmt=plistlib.FMT_XML)
    xml_offset = len(fork)
    koly = bytearray(512)
    koly[0:4] = b"koly"
    struct.pack_into(">III", koly, 4, 4, 512, 1)
    struct.pack_into(">QQQQQ", koly, 16, 0, 0, len(fork), 0, 0)
    struct.pack_into(">II", koly, 56, 1, 1)
    struct.pack_into(">QQ", koly, 216, xml_offset, len(plist))
    struct.pack_into(">IQ", koly, 488, 1, len(disk) // 512)
    return bytes(fork) + plist + bytes(koly)
