"""LVM2 physical volumes, volume groups and logical volumes, read from the bytes.

References (read to understand, then written from scratch):
- lvm2 `lib/format_text/layout.h`: label_header, pv_header, disk_locn,
  mda_header, raw_locn; `lib/label/label.c` (the label is in one of sectors 0-3);
  `lib/format_text/format-text.c` (`_read_metadata_location_vg`: the committed
  metadata is the text the mda header's first raw_locn points at, wrapping
  round the circular buffer; `_vg_read_raw_area` checks its crc).
- lvm2 `lib/format_text/import_vsn1.c` and `lib/config/config.c`: the text
  metadata format (nested sections, strings, numbers, lists).
- dm-stripe (`drivers/md/dm-stripe.c`): striped LVs interleave `stripe_size`
  sector chunks across the stripes in order.

The metadata area is a ring: old copies of the text stay in it after every
change, some with a *higher* seqno than the committed one (an aborted
`vgcfgrestore`, a copy written and then reverted). Only the copy raw_locn[0]
points at is the truth, which is what LVM itself reads.
"""

from __future__ import annotations

import bisect
import re
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator

from construct import Bytes, Const, Int32ul, Int64ul, Struct

from ..errors import DamagedRange, UnsupportedFeature, VolumeError
from ..source.base import ByteSource, Run, runs as source_runs
from ..units import human_size
from .base import Volume

SECTOR = 512
LABEL_SCAN_SECTORS = 4
MDA_HEADER_SIZE = 512
MDA_MAGIC = b" LVM2 x[5A%r0N*>"
INITIAL_CRC = 0xF597A6CF
MAX_METADATA = 64 << 20        # refuse to buffer absurd metadata texts
MAX_AREAS = 64                 # disk_locn lists are tiny in practice

# label_header: one per PV, in one of the first four sectors.
LabelHeader = Struct(
    "id" / Const(b"LABELONE"),
    "sector_xl" / Int64ul,     # the sector this label is in
    "crc_xl" / Int32ul,        # crc of the sector from offset 20 on
    "offset_xl" / Int32ul,     # pv_header offset from the label start
    "type" / Bytes(8),         # b"LVM2 001"
)

# pv_header (follows the label at offset_xl); then two zero-terminated
# disk_locn lists: data areas, then metadata areas.
PvHeader = Struct(
    "pv_uuid" / Bytes(32),
    "device_size_xl" / Int64ul,
)
DiskLocn = Struct("offset" / Int64ul, "size" / Int64ul)

# mda_header at the start of each metadata area; raw_locn list follows.
MdaHeader = Struct(
    "checksum_xl" / Int32ul,   # crc of the 508 bytes after this field
    "magic" / Const(MDA_MAGIC),
    "version" / Int32ul,
    "start" / Int64ul,         # absolute offset of this area on the PV
    "size" / Int64ul,
)
RawLocn = Struct("offset" / Int64ul, "size" / Int64ul, "checksum" / Int32ul, "flags" / Int32ul)
RAW_LOCN_IGNORED = 0x1


def lvm_crc(data: bytes, initial: int = INITIAL_CRC) -> int:
    """LVM's crc32: zlib's polynomial, LVM's seed, no final inversion."""
    return zlib.crc32(data, initial ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


def format_uuid(raw: str) -> str:
    """32 characters -> LVM's 6-4-4-4-4-4-6 dashed form."""
    raw = raw.replace("-", "")
    if len(raw) != 32:
        return raw
    cuts = [0, 6, 10, 14, 18, 22, 26, 32]
    return "-".join(raw[a:b] for a, b in zip(cuts, cuts[1:]))


def _uuid_key(uuid: str) -> str:
    return uuid.replace("-", "")


# ---------------------------------------------------------------- text metadata

_TOKEN = re.compile(r"""
    (?P<ws>[ \t\r\n]+|\#[^\n]*)
  | (?P<str>"(?:[^"\\]|\\.)*")
  | (?P<num>-?\d+(?:\.\d+)?)(?![\w.+-])
  | (?P<word>[A-Za-z0-9_.+\-]+)
  | (?P<punct>[{}\[\]=,])
""", re.X | re.S)


class MetadataSyntaxError(VolumeError):
    pass


def _tokens(text: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            if text[pos] == "\0":      # the text is NUL-terminated on disk
                break
            raise MetadataSyntaxError(f"LVM metadata: unexpected character {text[pos]!r} at offset {pos}")
        pos = m.end()
        kind = m.lastgroup
        if kind == "ws":
            continue
        value = m.group(kind)
        if kind == "str":
            value = re.sub(r"\\(.)", r"\1", value[1:-1], flags=re.S)
        elif kind == "num":
            value = float(value) if "." in value else int(value)
        out.append((kind, value))
    return out


def parse_metadata(text: str) -> dict[str, Any]:
    """LVM's config text -> nested dicts (sections), str/int/float, lists."""
    toks = _tokens(text)
    pos = 0

    def expect(punct: str) -> None:
        nonlocal pos
        if pos >= len(toks) or toks[pos] != ("punct", punct):
            got = toks[pos][1] if pos < len(toks) else "end of text"
            raise MetadataSyntaxError(f"LVM metadata: expected {punct!r}, got {got!r}")
        pos += 1

    def value(depth: int = 0) -> Any:
        nonlocal pos
        if depth > 16:
            raise MetadataSyntaxError("LVM metadata: lists nested deeper than 16")
        if pos >= len(toks):
            raise MetadataSyntaxError("LVM metadata: value missing at end of text")
        kind, val = toks[pos]
        if (kind, val) == ("punct", "["):
            pos += 1
            items: list[Any] = []
            while pos < len(toks) and toks[pos] != ("punct", "]"):
                items.append(value(depth + 1))
                if pos < len(toks) and toks[pos] == ("punct", ","):
                    pos += 1
            expect("]")
            return items
        if kind in ("str", "num"):
            pos += 1
            return val
        raise MetadataSyntaxError(f"LVM metadata: unexpected {val!r} where a value belongs")

    def section(depth: int) -> dict[str, Any]:
        nonlocal pos
        if depth > 16:
            raise MetadataSyntaxError("LVM metadata: sections nested deeper than 16")
        out: dict[str, Any] = {}
        while pos < len(toks):
            kind, key = toks[pos]
            if (kind, key) == ("punct", "}"):
                return out
            if kind not in ("word", "num", "str"):
                raise MetadataSyntaxError(f"LVM metadata: unexpected {key!r} where a name belongs")
            pos += 1
            key = str(key)
            if pos < len(toks) and toks[pos] == ("punct", "{"):
                pos += 1
                out[key] = section(depth + 1)
                expect("}")
            else:
                expect("=")
                out[key] = value()
        return out

    result = section(0)
    if pos != len(toks):
        raise MetadataSyntaxError("LVM metadata: unbalanced '}'")
    return result


# ---------------------------------------------------------------- physical volumes

@dataclass
class PhysicalVolume:
    """What the label and the committed metadata of one PV say."""

    source: ByteSource
    uuid: str                                   # dashed form
    device_size: int
    data_areas: list[tuple[int, int]]
    metadata_areas: list[tuple[int, int]]
    label_sector: int
    metadata_text: str | None = None
    metadata: dict[str, Any] | None = None      # parsed text, None if the PV has no mda
    warnings: list[str] = field(default_factory=list)

    @property
    def vg_name(self) -> str | None:
        return _vg_name(self.metadata) if self.metadata else None


def _vg_name(meta: dict[str, Any]) -> str | None:
    for key, val in meta.items():
        if isinstance(val, dict):
            return key
    return None


def _find_label(source: ByteSource) -> tuple[int, Any] | None:
    head = source.read(0, LABEL_SCAN_SECTORS * SECTOR)
    for sector in range(LABEL_SCAN_SECTORS):
        raw = head[sector * SECTOR:(sector + 1) * SECTOR]
        if raw[:8] != b"LABELONE" or len(raw) < SECTOR:
            continue
        label = LabelHeader.parse(raw)
        if label.type == b"LVM2 001" and label.sector_xl == sector:
            return sector, label
    return None


def is_pv(source: ByteSource) -> bool:
    """True when `source` starts with an LVM2 physical-volume label."""
    try:
        return _find_label(source) is not None
    except Exception:
        return False


def read_pv(source: ByteSource) -> PhysicalVolume:
    """The PV label, header and committed metadata of one source."""
    found = _find_label(source)
    if found is None:
        raise VolumeError("no LVM2 label (LABELONE) in sectors 0-3", file=source.name)
    sector, label = found
    raw = source.read(sector * SECTOR, SECTOR)
    warnings: list[str] = []
    if lvm_crc(raw[20:]) != label.crc_xl:
        warnings.append(f"label crc mismatch in sector {sector} (stored {label.crc_xl:#x})")
    if not 32 <= label.offset_xl <= SECTOR - 40:
        raise VolumeError(f"LVM2 label: pv_header offset_xl={label.offset_xl} is outside the label sector",
                          file=source.name)
    hdr = PvHeader.parse(raw[label.offset_xl:])
    pos = label.offset_xl + PvHeader.sizeof()
    lists: list[list[tuple[int, int]]] = []
    for _ in range(2):
        areas: list[tuple[int, int]] = []
        while True:
            if pos + 16 > SECTOR or len(areas) > MAX_AREAS:
                raise VolumeError("LVM2 pv_header: disk area list is not terminated", file=source.name)
            loc = DiskLocn.parse(raw[pos:pos + 16])
            pos += 16
            if loc.offset == 0:
                break
            areas.append((loc.offset, loc.size))
        lists.append(areas)
    try:
        uuid = format_uuid(hdr.pv_uuid.decode("ascii"))
    except UnicodeDecodeError:
        raise VolumeError(f"LVM2 pv_header: pv_uuid {hdr.pv_uuid!r} is not text", file=source.name) from None
    pv = PhysicalVolume(source=source, uuid=uuid, device_size=hdr.device_size_xl,
                        data_areas=lists[0], metadata_areas=lists[1], label_sector=sector,
                        warnings=warnings)
    errors: list[str] = []
    for start, size in pv.metadata_areas:
        try:
            text = _read_committed_text(source, start, size)
            if text is None:
                continue
            meta = parse_metadata(text)
        except VolumeError as exc:
            errors.append(exc.problem)
            continue
        pv.metadata_text, pv.metadata = text, meta
        break
    if pv.metadata is None and errors:
        # Still useful: another PV of the VG may hold a good copy of the metadata.
        pv.warnings.append(f"PV {uuid} ({source.name}): no readable metadata area ({'; '.join(errors)})")
    else:
        pv.warnings.extend(errors)
    return pv


def _read_committed_text(source: ByteSource, start: int, size: int) -> str | None:
    """The text raw_locn[0] of the mda at `start` points at; None if the area is ignored/empty."""
    raw = source.read(start, MDA_HEADER_SIZE)
    if len(raw) < MDA_HEADER_SIZE or raw[4:20] != MDA_MAGIC:
        raise VolumeError(f"metadata area at {start}: no mda_header magic")
    mda = MdaHeader.parse(raw)
    if lvm_crc(raw[4:]) != mda.checksum_xl:
        raise VolumeError(f"metadata area at {start}: mda_header checksum_xl={mda.checksum_xl:#x} does not match")
    if mda.start != start:
        raise VolumeError(f"metadata area at {start}: mda_header says start={mda.start}")
    area_size = mda.size or size
    loc = RawLocn.parse(raw[MdaHeader.sizeof():MdaHeader.sizeof() + RawLocn.sizeof()])
    if loc.offset == 0 or loc.size == 0 or loc.flags & RAW_LOCN_IGNORED:
        return None
    if loc.size > min(MAX_METADATA, area_size - MDA_HEADER_SIZE) or not MDA_HEADER_SIZE <= loc.offset < area_size:
        raise VolumeError(f"metadata area at {start}: raw_locn offset={loc.offset} size={loc.size} "
                          f"does not fit the {area_size}-byte area")
    first = min(loc.size, area_size - loc.offset)
    text = source.read(start + loc.offset, first)
    if first < loc.size:   # the ring wrapped: the rest follows the header
        text += source.read(start + MDA_HEADER_SIZE, loc.size - first)
    if len(text) != loc.size:
        raise VolumeError(f"metadata area at {start}: text truncated ({len(text)} of {loc.size} bytes)")
    if lvm_crc(text) != loc.checksum:
        raise VolumeError(f"metadata area at {start}: metadata text checksum does not match raw_locn "
                          f"({lvm_crc(text):#x} != {loc.checksum:#x})")
    return text.rstrip(b"\0").decode("utf-8", "surrogateescape")


# ---------------------------------------------------------------- logical volumes

READABLE_TYPES = {"striped", "linear", "zero", "error"}


def _unsupported_text(segtype: str) -> str:
    if segtype.startswith("thin"):
        kind = "thin pool" if segtype == "thin-pool" else "thin LV"
    elif segtype.startswith("raid") or segtype == "mirror":
        kind = f"{segtype} LV"
    elif segtype.startswith("cache") or segtype == "writecache":
        kind = f"{segtype} LV"
    else:
        kind = f"{segtype} LV"
    return f"{kind}: not supported yet"


@dataclass
class _Piece:
    """One contiguous range of an LV (bytes) and where it lives."""

    start: int
    length: int
    kind: str                       # "linear", "striped", "zero", "error", "missing"
    areas: list[tuple[ByteSource | None, int, str]]  # (pv source, byte offset of area, pv name)
    chunk: int = 0                  # stripe size in bytes


class LvSource:
    """A logical volume as a byte source: segments mapped onto PV data areas."""

    def __init__(self, name: str, size: int, pieces: list[_Piece], unsupported: str | None = None) -> None:
        self.name = name
        self.size = size
        self._pieces = pieces
        self._starts = [p.start for p in pieces]
        self.unsupported = unsupported

    def _check(self) -> None:
        if self.unsupported:
            if self.unsupported.startswith("metadata damaged"):
                raise VolumeError(f"logical volume {self.name}: {self.unsupported}")
            raise UnsupportedFeature(f"logical volume {self.name}: {self.unsupported}", layer="volume",
                                     hint="activate the VG with the LVM tools on a Linux machine "
                                          "(vgchange -ay) and copy the data from /dev/VG/LV")

    def _pieces_for(self, offset: int, length: int) -> Iterator[tuple[_Piece, int, int]]:
        """(piece, offset inside piece, length) covering [offset, offset+length)."""
        i = max(0, bisect.bisect_right(self._starts, offset) - 1)
        end = offset + length
        while offset < end and i < len(self._pieces):
            p = self._pieces[i]
            if p.start + p.length <= offset:
                i += 1
                continue
            n = min(end, p.start + p.length) - offset
            yield p, offset - p.start, n
            offset += n
            i += 1

    def read(self, offset: int, length: int) -> bytes:
        self._check()
        if offset >= self.size or length <= 0:
            return b""
        length = min(length, self.size - offset)
        parts = [self._read_piece(piece, inner, n) for piece, inner, n in self._pieces_for(offset, length)]
        return parts[0] if len(parts) == 1 else b"".join(parts)   # the common case: no copy

    def _read_piece(self, p: _Piece, inner: int, n: int) -> bytes:
        if p.kind == "zero":
            return bytes(n)
        if p.kind in ("error", "missing"):
            what = "an error segment" if p.kind == "error" else f"PV {p.areas[0][2]} which is missing"
            raise DamagedRange(f"{self.name}: bytes {p.start + inner}-{p.start + inner + n - 1} are on {what}")
        if p.kind == "linear":
            src, base, _ = p.areas[0]
            data = src.read(base + inner, n)
            if len(data) < n:                      # a PV image cut short reads as zeros
                data += bytes(n - len(data))
            return data
        return self._read_striped(p, inner, n)

    def _read_striped(self, p: _Piece, inner: int, n: int) -> bytes:
        # Read each stripe's share in one request, then interleave chunks.
        chunk, width = p.chunk, len(p.areas)
        first, last = inner // chunk, (inner + n - 1) // chunk
        row0, row1 = first // width, last // width
        stripes: list[memoryview | None] = []
        for s, (src, base, pvname) in enumerate(p.areas):
            # chunks of stripe s within [first, last]
            c0 = first + ((s - first) % width)
            if c0 > last:
                stripes.append(None)
                continue
            if src is None:
                raise DamagedRange(f"{self.name}: bytes {p.start + inner}-{p.start + inner + n - 1} "
                                   f"need stripe {s} on PV {pvname} which is missing")
            data = src.read(base + row0 * chunk, (row1 - row0 + 1) * chunk)
            if len(data) < (row1 - row0 + 1) * chunk:
                data += bytes((row1 - row0 + 1) * chunk - len(data))
            stripes.append(memoryview(data))
        parts = []
        for c in range(first, last + 1):
            row, s = divmod(c, width)
            lo = inner - c * chunk if c == first else 0
            hi = min(chunk, inner + n - c * chunk)
            src_off = (row - row0) * chunk
            data = stripes[s]
            assert data is not None
            parts.append(data[src_off + lo:src_off + hi])
        return b"".join(parts)      # one copy of the views into the result

    def runs(self, offset: int, length: int) -> Iterator[Run]:
        self._check()
        length = min(length, self.size - offset)
        for p, inner, n in self._pieces_for(offset, length):
            lv_off = p.start + inner
            if p.kind == "zero":
                yield Run(lv_off, n, "zero")
            elif p.kind == "linear":
                src, base, _ = p.areas[0]
                for r in source_runs(src, base + inner, n):
                    yield Run(r.offset - base + p.start, r.length, r.kind)
            else:
                yield Run(lv_off, n, "data")

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"LvSource({self.name!r}, size={self.size})"


def _as_int(val: Any, what: str, vg: str) -> int:
    if isinstance(val, bool) or not isinstance(val, int) or val < 0:
        raise VolumeError(f"VG {vg}: {what}={val!r} is not a non-negative integer")
    if val > 1 << 48:   # sectors or extents: beyond any real disk
        raise VolumeError(f"VG {vg}: {what}={val} is absurdly large")
    return val


def _section(body: dict[str, Any], key: str, vg: str) -> dict[str, Any]:
    val = body.get(key, {})
    if not isinstance(val, dict):
        raise VolumeError(f"VG {vg}: {key} is {type(val).__name__}, not a section")
    return val


def _build_lv(vg_name: str, lv_name: str, lv: dict[str, Any], extent_bytes: int,
              pvs: dict[str, dict[str, Any]], lv_names: set[str]) -> tuple[dict[str, Any], LvSource]:
    segments: list[dict[str, Any]] = []
    pieces: list[_Piece] = []
    unsupported: str | None = None
    missing: list[str] = []
    seg_list = sorted(((_as_int(v.get("start_extent", 0), f"{lv_name} start_extent", vg_name), k)
                       for k, v in lv.items() if isinstance(v, dict) and k.startswith("segment")))
    next_extent = 0
    for start, key in seg_list:
        seg = lv[key]
        count = _as_int(seg.get("extent_count", 0), f"{lv_name} extent_count", vg_name)
        if start != next_extent:
            raise VolumeError(f"VG {vg_name}: LV {lv_name} segment starts at extent {start}, "
                              f"expected {next_extent} (segments overlap or leave a gap)")
        next_extent = start + count
        segtype = str(seg.get("type", "striped"))
        info: dict[str, Any] = {"start_extent": start, "extent_count": count, "type": segtype}
        lv_start, lv_len = start * extent_bytes, count * extent_bytes
        if segtype in ("striped", "linear"):
            raw = seg.get("stripes", [])
            if not isinstance(raw, list) or len(raw) % 2 or not raw:
                raise VolumeError(f"VG {vg_name}: LV {lv_name} has a malformed stripes list {raw!r}")
            pairs = [(str(raw[i]), _as_int(raw[i + 1], f"{lv_name} stripe extent", vg_name))
                     for i in range(0, len(raw), 2)]
            info["stripes"] = [list(p) for p in pairs]
            per = count // len(pairs)
            # as `lvs -o seg_pe_ranges` prints them, and "linear" like lvs says
            info["pe_ranges"] = " ".join(f"{pv}:{pe}-{pe + per - 1}" for pv, pe in pairs)
            info["type"] = "linear" if len(pairs) == 1 else "striped"
            areas: list[tuple[ByteSource | None, int, str]] = []
            for pvname, pe in pairs:
                if pvname in lv_names:
                    unsupported = unsupported or f"LV being moved (its data is in {pvname}): not supported yet"
                    areas.append((None, 0, pvname))
                    continue
                pv = pvs.get(pvname)
                if pv is None:
                    raise VolumeError(f"VG {vg_name}: LV {lv_name} uses unknown PV {pvname!r}")
                if pv["source"] is None and pvname not in missing:
                    missing.append(pvname)
                areas.append((pv["source"], pv["pe_start"] * SECTOR + pe * extent_bytes, pvname))
            if len(pairs) == 1:
                kind = "missing" if areas[0][0] is None else "linear"
                pieces.append(_Piece(lv_start, lv_len, kind, areas))
            else:
                stripe_size = _as_int(seg.get("stripe_size", 0), f"{lv_name} stripe_size", vg_name)
                if stripe_size == 0 or count % len(pairs):
                    raise VolumeError(f"VG {vg_name}: LV {lv_name} stripe_size={stripe_size} with "
                                      f"{len(pairs)} stripes over {count} extents")
                info["stripe_size"] = stripe_size * SECTOR
                pieces.append(_Piece(lv_start, lv_len, "striped", areas, chunk=stripe_size * SECTOR))
        elif segtype in ("zero", "error"):
            pieces.append(_Piece(lv_start, lv_len, segtype, []))
        else:
            unsupported = unsupported or _unsupported_text(segtype)
            for key in ("thin_pool", "pool", "metadata", "origin", "cow_store", "cache_pool"):
                if key in seg:
                    info[key] = seg[key]
        segments.append(info)
    size = sum(s["extent_count"] for s in segments) * extent_bytes
    status = lv.get("status", [])
    record = {
        "name": lv_name, "uuid": lv.get("id"), "size": size, "segments": segments,
        "visible": "VISIBLE" in status if isinstance(status, list) else True,
        "missing_pvs": [pvs[m]["uuid"] for m in missing], "unsupported": unsupported,
    }
    src = LvSource(f"{vg_name}/{lv_name}", size, pieces, unsupported)
    return record, src


def _describe(record: dict[str, Any]) -> str:
    if record["unsupported"]:
        return "LVM2 " + record["unsupported"].split(":")[0]
    kinds = {s["type"] for s in record["segments"]}
    stripes = max((len(s.get("stripes", [])) for s in record["segments"]), default=1)
    if stripes > 1:
        return f"LVM2 striped LV ({stripes} stripes)"
    if kinds <= {"linear"}:
        return "LVM2 linear LV"
    return "LVM2 LV (" + ", ".join(sorted(kinds)) + ")"




def vg_summary(vg: dict[str, Any]) -> str:
    """One line per VG for `inspect`: name, PVs (missing ones named), LVs."""
    if vg.get("name") is None:
        return "; ".join(vg.get("warnings", [])) or "PV without metadata"
    pvs = vg["pvs"]
    missing = [p["uuid"] for p in pvs if not p["present"]]
    pv_text = f"{len(pvs)} PV" + ("s" if len(pvs) != 1 else "")
    if missing:
        pv_text += f" ({len(missing)} missing: {', '.join(missing)})"
    lvs = []
    for lv in vg["lvs"]:
        if not lv["visible"]:
            continue
        kinds = sorted({s["type"] for s in lv["segments"]}) or ["?"]
        text = f"{lv['name']} {human_size(lv['size'])} {'/'.join(kinds)}"
        if len(lv["segments"]) > 1:
            text += f" ({len(lv['segments'])} segments)"
        if lv["unsupported"]:
            text += " [not supported yet]"
        lvs.append(text)
    return (f"volume group {vg['name']}: {pv_text}, extent {human_size(vg['extent_size'])}, seqno {vg['seqno']}; "
            f"LVs: {', '.join(lvs) or 'none'}")


def assemble(pvs: list[ByteSource]) -> tuple[list[dict[str, Any]], list[Volume]]:
    """Group PVs into VGs by uuid and build every visible LV as a Volume.

    Returns (volume groups, volumes). VGs whose PVs are not all present still
    list every LV; reading a range on a missing PV raises DamagedRange.
    """
    read: list[PhysicalVolume] = []
    for source in pvs:
        read.append(read_pv(source))
    by_uuid: dict[str, PhysicalVolume] = {}
    dup_warnings: list[str] = []
    for pv in read:
        key = _uuid_key(pv.uuid)
        if key in by_uuid:
            dup_warnings.append(f"PV {pv.uuid} seen twice ({by_uuid[key].source.name}, {pv.source.name}); "
                                "using the first")
            continue
        by_uuid[key] = pv
    # The newest committed metadata per VG (several PVs each hold a copy).
    vg_meta: dict[str, tuple[int, dict[str, Any], str]] = {}
    for pv in by_uuid.values():
        if not pv.metadata:
            continue
        name = pv.vg_name
        if name is None:
            continue
        body = pv.metadata[name]
        vg_uuid = str(body.get("id", name))
        seqno = body.get("seqno", 0)
        if not isinstance(seqno, int):
            pv.warnings.append(f"VG {name}: seqno={seqno!r} is not a number")
            seqno = -1
        if vg_uuid not in vg_meta or seqno > vg_meta[vg_uuid][0]:
            vg_meta[vg_uuid] = (seqno, pv.metadata, name)

    groups: list[dict[str, Any]] = []
    volumes: list[Volume] = []
    claimed: set[str] = set()
    for vg_uuid, (seqno, meta, vg_name) in vg_meta.items():
        body = meta[vg_name]
        extent_size = _as_int(body.get("extent_size", 0), "extent_size", vg_name)
        if extent_size == 0:
            raise VolumeError(f"VG {vg_name}: extent_size is 0")
        extent_bytes = extent_size * SECTOR
        pv_table: dict[str, dict[str, Any]] = {}
        pv_rows: list[dict[str, Any]] = []
        for pvname, pvd in _section(body, "physical_volumes", vg_name).items():
            if not isinstance(pvd, dict):
                continue
            uuid = str(pvd.get("id", ""))
            found = by_uuid.get(_uuid_key(uuid))
            claimed.add(_uuid_key(uuid))
            row = {"name": pvname, "uuid": uuid, "device": pvd.get("device"),
                   "pe_start": _as_int(pvd.get("pe_start", 0), f"{pvname} pe_start", vg_name),
                   "pe_count": pvd.get("pe_count"), "dev_size": pvd.get("dev_size"),
                   "source": found.source if found else None}
            pv_table[pvname] = row
            pv_rows.append({k: v for k, v in row.items() if k != "source"}
                           | {"present": found is not None,
                              "file": found.source.name if found else None})
        lv_sections = _section(body, "logical_volumes", vg_name)
        lv_names = set(lv_sections)
        lv_rows: list[dict[str, Any]] = []
        sources: dict[str, LvSource] = {}
        for lv_name, lvd in lv_sections.items():
            if not isinstance(lvd, dict):
                continue
            try:
                record, src = _build_lv(vg_name, lv_name, lvd, extent_bytes, pv_table, lv_names)
            except VolumeError as exc:
                problem = f"metadata damaged: {exc.problem}"
                status = lvd.get("status", [])
                record = {"name": lv_name, "uuid": lvd.get("id"), "size": 0, "segments": [],
                          "visible": "VISIBLE" in status if isinstance(status, list) else True,
                          "missing_pvs": [], "unsupported": problem}
                src = LvSource(f"{vg_name}/{lv_name}", 0, [], problem)
            lv_rows.append(record)
            sources[lv_name] = src
        # A snapshot's visible LV holds the copy-on-write store, not a filesystem.
        for record in lv_rows:
            for seg in record["segments"]:
                if seg["type"] == "snapshot" and seg.get("cow_store") in sources:
                    cow = next(r for r in lv_rows if r["name"] == seg["cow_store"])
                    cow["unsupported"] = "snapshot LV (copy-on-write store): not supported yet"
                    sources[cow["name"]].unsupported = cow["unsupported"]
        missing = [r["uuid"] for r in pv_rows if not r["present"]]
        warnings = [w for pv in by_uuid.values() if pv.vg_name == vg_name for w in pv.warnings]
        if missing:
            warnings.append(f"VG {vg_name}: PV {', '.join(missing)} missing")
        groups.append({"name": vg_name, "uuid": vg_uuid, "extent_size": extent_bytes, "seqno": seqno,
                       "pvs": pv_rows, "lvs": lv_rows, "warnings": warnings + dup_warnings})
        for record in lv_rows:
            if not record["visible"]:
                continue
            details: dict[str, Any] = {"vg": vg_name, "lv_uuid": record["uuid"],
                                       "segments": record["segments"]}
            if record["unsupported"]:
                details["unsupported"] = record["unsupported"]
            if record["missing_pvs"]:
                details["missing"] = f"PV {', '.join(record['missing_pvs'])} missing"
            volumes.append(Volume(id=f"{vg_name}/{record['name']}", start=0, size=record["size"],
                                  source=sources[record["name"]], description=_describe(record),
                                  details=details))
    # PVs whose VG metadata we never saw (metadatacopies=0 or a damaged
    # metadata area, and no other PV of the VG present).
    orphans = [pv for key, pv in by_uuid.items() if key not in claimed]
    if orphans and not groups and any(pv.warnings for pv in orphans):
        problems = "; ".join(w for pv in orphans for w in pv.warnings)
        raise VolumeError(f"LVM metadata unreadable: {problems}", file=orphans[0].source.name)
    for pv in orphans:
        groups.append({"name": None, "uuid": None, "extent_size": None, "seqno": None,
                       "pvs": [{"name": None, "uuid": pv.uuid, "present": True, "file": pv.source.name}],
                       "lvs": [], "warnings": pv.warnings or [f"PV {pv.uuid} carries no metadata; its VG is unknown"]})
    return groups, volumes
