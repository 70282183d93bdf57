"""MBR and GPT partitions, found by The Sleuth Kit.

TSK gives the layout (including MBR extended/logical chains); the GPT entry
array is read here too for what TSK does not report but /etc/fstab may use:
the partition GUID (PARTUUID=) and type GUID. Where TSK refuses a table (a
truncated disk head, GPT with 4 KiB sectors) the GPT or the MBR primaries are
read here, so a cut-short download is reported as truncated, not as no disk. References: UEFI spec 2.10,
chapter 5 (GPT); the MBR layout in sfdisk(8).
"""

from __future__ import annotations

import uuid as uuid_mod

import pytsk3
from construct import Bytes, Const, Int8ul, Int32ul, Int64ul, Struct

from ..source.base import ByteSource, Window
from .base import Volume
from .tsk_image import TskImage

GptHeader = Struct(
    "signature" / Const(b"EFI PART"),
    "revision" / Int32ul,
    "header_size" / Int32ul,
    "header_crc" / Int32ul,
    "reserved" / Int32ul,
    "current_lba" / Int64ul,
    "backup_lba" / Int64ul,
    "first_usable_lba" / Int64ul,
    "last_usable_lba" / Int64ul,
    "disk_guid" / Bytes(16),
    "entries_lba" / Int64ul,
    "entry_count" / Int32ul,
    "entry_size" / Int32ul,
    "entries_crc" / Int32ul,
)

GptEntry = Struct(
    "type_guid" / Bytes(16),
    "part_guid" / Bytes(16),
    "first_lba" / Int64ul,
    "last_lba" / Int64ul,
    "attributes" / Int64ul,
    "name" / Bytes(72),
)

GPT_TYPES = {
    "c12a7328-f81f-11d2-ba4b-00a0c93ec93b": "EFI System",
    "21686148-6449-6e6f-744e-656564454649": "BIOS boot",
    "0fc63daf-8483-4772-8e79-3d69d8477de4": "Linux filesystem",
    "e6d6d379-f507-44c2-a23c-238f2a3df928": "Linux LVM",
    "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f": "Linux swap",
    "a19d880f-05fc-4d3b-a006-743f0f84911e": "Linux RAID",
    "4f68bce3-e8cd-4db1-96e7-fbcaf984b709": "Linux root (x86-64)",
    "b921b045-1df0-41c3-af44-4c6f280d3fae": "Linux root (ARM64)",
    "933ac7e1-2eb4-4f13-b844-0e14e2aef915": "Linux /home",
    "3b8f8425-20e0-4f3b-907f-1a25a76f98e8": "Linux /srv",
    "4d21b016-b534-45c2-a9fb-5c16e091fd2d": "Linux /var",
    "bc13c2ff-59e6-4262-a352-b275fd6f7172": "Linux extended boot",
    "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7": "Microsoft basic data",
    "e3c9e316-0b5c-4db8-817d-f92df00215ae": "Microsoft reserved",
    "de94bba4-06d1-4d40-a16a-bfd50179d6ac": "Windows recovery",
    "6a898cc3-1dd2-11b2-99a6-080020736631": "Solaris /usr & Mac ZFS",
    "aa31e02a-400f-11db-9590-000c2911d1b8": "VMware VMFS",
    "9d275380-40ad-11db-bf97-000c2911d1b8": "VMware kcore crash",
}


def _gpt_table(disk: ByteSource, sector: int) -> list[tuple[int, object]]:
    """(entry index, parsed entry) of the used GPT entries; [] if the header is unreadable."""
    try:
        header = GptHeader.parse(disk.read(sector, 92))
        if header.entry_size < 128 or header.entry_size > 4096 or header.entry_count > 16384:
            return []
        raw = disk.read(header.entries_lba * sector, header.entry_count * header.entry_size)
    except Exception:   # no GPT, or a damaged range where it should be
        return []
    out = []
    for i in range(len(raw) // header.entry_size):
        e = GptEntry.parse(raw[i * header.entry_size:i * header.entry_size + 128])
        if e.type_guid != bytes(16):
            out.append((i, e))
    return out


def _gpt_info(e) -> dict:
    name = e.name.decode("utf-16-le", "replace").split("\0", 1)[0].rstrip("\uffff")
    return {
        "type_guid": str(uuid_mod.UUID(bytes_le=e.type_guid)),
        "part_uuid": str(uuid_mod.UUID(bytes_le=e.part_guid)),
        "name": name or None,
    }


def _gpt_entries(disk: ByteSource, sector: int) -> dict[int, dict]:
    """GPT entries keyed by first LBA (empty if the header is unreadable)."""
    return {e.first_lba: _gpt_info(e) for _, e in _gpt_table(disk, sector)}


MbrEntry = Struct(
    "status" / Int8ul,
    "chs_first" / Bytes(3),
    "type" / Int8ul,
    "chs_last" / Bytes(3),
    "first_lba" / Int32ul,
    "sectors" / Int32ul,
)


def _own_table(disk: ByteSource) -> tuple[str | None, list[Volume]]:
    """The partition table read here, for disks TSK refuses: truncated disk heads whose
    partitions end past the image (a download cut short), GPT with 4 KiB sectors.
    GPT entries, else the four MBR primaries; nothing when neither is plausible."""
    for sector in (512, 4096):
        entries = [(i, e) for i, e in _gpt_table(disk, sector) if 0 < e.first_lba <= e.last_lba]
        if entries:
            volumes = []
            for i, e in entries:
                info = _gpt_info(e)
                start, size = e.first_lba * sector, (e.last_lba - e.first_lba + 1) * sector
                vol = Volume(id=str(i + 1), start=start, size=size,
                             source=Window(disk, start, size, name=f"{disk.name} partition {i + 1}"),
                             description=GPT_TYPES.get(info["type_guid"], info["name"] or info["type_guid"]))
                vol.type_id, vol.part_uuid, vol.part_label = info["type_guid"], info["part_uuid"], info["name"]
                volumes.append(vol)
            return "gpt", volumes
    try:
        head = disk.read(0, 512)
    except OSError:
        return None, []
    if len(head) < 512 or head[510:512] != b"\x55\xaa":
        return None, []
    parts = [(n + 1, MbrEntry.parse(head[446 + 16 * n:462 + 16 * n])) for n in range(4)]
    parts = [(n, e) for n, e in parts if e.type and e.first_lba and e.sectors]
    if not parts or any(e.status not in (0, 0x80) or e.type == 0xEE for _, e in parts):
        return None, []
    spans = sorted((e.first_lba, e.first_lba + e.sectors) for _, e in parts)
    if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
        return None, []     # overlapping entries: not a table we can trust
    volumes = []
    for n, e in parts:
        start, size = e.first_lba * 512, e.sectors * 512
        vol = Volume(id=str(n), start=start, size=size,
                     source=Window(disk, start, size, name=f"{disk.name} partition {n}"),
                     description=f"MBR type 0x{e.type:02x}")
        vol.type_id = f"0x{e.type:02x}"
        volumes.append(vol)
    return "mbr", volumes


def find_partitions(disk: ByteSource) -> tuple[str | None, list[Volume]]:
    """(table type, partitions) or (None, []) when the disk has no partition table."""
    try:
        table = pytsk3.Volume_Info(TskImage(disk))
    except OSError:
        return _own_table(disk)
    vstype = int(table.info.vstype)
    kind = {int(pytsk3.TSK_VS_TYPE_DOS): "mbr", int(pytsk3.TSK_VS_TYPE_GPT): "gpt",
            int(pytsk3.TSK_VS_TYPE_BSD): "bsd", int(pytsk3.TSK_VS_TYPE_MAC): "apm",
            int(pytsk3.TSK_VS_TYPE_SUN): "sun"}.get(vstype, "unknown")
    sector = int(table.info.block_size) or 512
    gpt = _gpt_entries(disk, sector) if kind == "gpt" else {}
    signature = disk.read(440, 4) if kind == "mbr" else b""
    volumes = []
    for part in table:
        if not int(part.flags) & int(pytsk3.TSK_VS_PART_FLAG_ALLOC):
            continue   # unallocated gaps and the tables themselves
        start, length = int(part.start) * sector, int(part.len) * sector
        desc = part.desc.decode("utf-8", "replace") if isinstance(part.desc, bytes) else str(part.desc)
        slot, table_num = int(part.slot_num), int(part.table_num)
        if kind == "mbr":
            # sfdisk's numbering: primaries 1-4 by slot, logicals 5, 6, ... by chain position
            number = slot + 1 if table_num <= 0 else 4 + table_num
        else:
            number = slot + 1
        vol = Volume(id=str(number), start=start, size=length,
                     source=Window(disk, start, length, name=f"{disk.name} partition {number}"),
                     description=desc)
        if kind == "mbr" and "(0x" in desc:
            vol.type_id = desc[desc.rindex("(0x") + 1:-1]
            if signature != bytes(4):
                vol.part_uuid = f"{int.from_bytes(signature, 'little'):08x}-{number:02d}"
        entry = gpt.get(start // sector)
        if entry:
            vol.type_id = entry["type_guid"]
            vol.part_uuid = entry["part_uuid"]
            vol.part_label = entry["name"]
            vol.description = GPT_TYPES.get(entry["type_guid"], entry["name"] or entry["type_guid"])
        volumes.append(vol)
    if kind == "mbr" and volumes and all(v.type_id == "0xee" for v in volumes):
        # Only a protective MBR: a GPT TSK did not find (4 KiB logical sectors).
        own_kind, own = _own_table(disk)
        if own_kind == "gpt":
            return own_kind, own
    return kind, volumes
