"""The btrfs volume below the files: superblocks, the chunk map (logical to
physical), and checksummed tree blocks searched by key.

References:
- btrfs docs, On-disk Format (superblock, header, leaf/node, chunk item) and
  "Trees" (https://btrfs.readthedocs.io/en/latest/dev/dev-btrees.html).
- Linux fs/btrfs/disk-io.c (btrfs_read_dev_super: the valid copy with the
  highest generation; btrfs_validate_super; btree_read_extent_buffer_pages:
  try the next mirror on a bad block), fs/btrfs/volumes.c
  (btrfs_read_sys_array, read_one_chunk, btrfs_map_block: SINGLE, DUP, RAID0,
  RAID1/1C3/1C4, RAID10, RAID5/6 data stripes), fs/btrfs/ctree.c (btrfs_search_slot).
"""

from __future__ import annotations

import uuid as uuid_mod
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

from ...errors import FilesystemError
from ...source.base import ByteSource
from . import structs as S
from .checksum import CSUM_SIZES, checksummer


MAX_KEY = ((1 << 64) - 1, 255, (1 << 64) - 1)
NODE_CACHE = 4096               # tree blocks kept parsed (16 KiB each: 64 MiB at most)
PROFILE_MASK = (S.BG_RAID0 | S.BG_RAID1 | S.BG_DUP | S.BG_RAID10 | S.BG_RAID5 | S.BG_RAID6
                | S.BG_RAID1C3 | S.BG_RAID1C4)
PROFILE_NAMES = {0: "single", S.BG_RAID0: "raid0", S.BG_RAID1: "raid1", S.BG_DUP: "dup", S.BG_RAID10: "raid10",
                 S.BG_RAID5: "raid5", S.BG_RAID6: "raid6", S.BG_RAID1C3: "raid1c3", S.BG_RAID1C4: "raid1c4"}


class TreeBlockError(Exception):
    """A tree block that no copy holds intact (checksum, address, level)."""


class MappingError(Exception):
    """A logical address no chunk maps, or whose device is missing."""


Key = tuple  # (objectid, type, offset)


class Chunk(NamedTuple):
    logical: int
    length: int
    type: int
    stripe_len: int
    sub_stripes: int
    stripes: tuple            # ((devid, physical offset), ...)

    @property
    def profile(self) -> int:
        return self.type & PROFILE_MASK


@dataclass
class Node:
    """One parsed tree block."""

    bytenr: int
    level: int
    owner: int
    generation: int
    keys: list                # [(objectid, type, offset), ...]
    ptrs: list = field(default_factory=list)    # internal: [(blockptr, generation), ...]
    spans: list = field(default_factory=list)   # leaf: [(start, end) in raw], item data
    raw: bytes = b""

    def item(self, i: int) -> bytes:
        start, end = self.spans[i]
        return self.raw[start:end]


def parse_chunk(raw: bytes, pos: int, logical: int) -> tuple[Chunk, int]:
    """A chunk item at `pos` of `raw` (its stripes after it); returns it and its end."""
    if pos + S.CHUNK.size > len(raw):
        raise ValueError("chunk item truncated")
    length, _owner, stripe_len, ctype, _a, _w, _s, num_stripes, sub_stripes = S.CHUNK.unpack_from(raw, pos)
    end = pos + S.CHUNK.size + num_stripes * S.STRIPE.size
    if num_stripes == 0 or end > len(raw):
        raise ValueError(f"chunk at logical {logical} has {num_stripes} stripes in a {len(raw) - pos}-byte item")
    if length == 0 or stripe_len == 0 or stripe_len & (stripe_len - 1) or stripe_len > (1 << 30):
        raise ValueError(f"chunk at logical {logical}: length {length}, stripe_len {stripe_len}")
    profile = ctype & PROFILE_MASK
    if profile & (profile - 1):
        raise ValueError(f"chunk at logical {logical} has several profiles (type {ctype:#x})")
    if profile == S.BG_RAID10 and (sub_stripes < 2 or num_stripes % sub_stripes):
        raise ValueError(f"raid10 chunk at logical {logical}: {num_stripes} stripes, sub_stripes {sub_stripes}")
    if profile in (S.BG_RAID5, S.BG_RAID6) and num_stripes <= (1 if profile == S.BG_RAID5 else 2):
        raise ValueError(f"raid5/6 chunk at logical {logical} with {num_stripes} stripes")
    stripes = tuple((devid, off) for devid, off, _uuid in S.STRIPE.iter_unpack(raw[pos + S.CHUNK.size:end]))
    return Chunk(logical, length, ctype, stripe_len, sub_stripes, stripes), end


class BtrfsVolume:
    """Superblock, chunk map and tree blocks of one btrfs filesystem.

    `devices` are more byte sources of the same filesystem (multi-device);
    each is matched by the devid in its own superblock."""

    def __init__(self, source: ByteSource, name: str, devices: list[ByteSource] | None = None) -> None:
        self.source = source
        self.name = name
        self.notes: list[str] = []
        self.sb = self._pick_super(source)
        sb = self.sb
        unknown = sb.incompat_flags & ~S.INCOMPAT_SUPPORTED
        if unknown:
            names = ", ".join(S.INCOMPAT_NAMES.get(1 << b, f"bit {b}") for b in range(64) if unknown >> b & 1)
            raise FilesystemError(f"btrfs uses incompat feature {names} (flags {unknown:#x}), which this "
                                  "reader does not read", file=name)
        self.nodesize = sb.nodesize
        self.sectorsize = sb.sectorsize
        self.csum_type = sb.csum_type
        self._csum = checksummer(sb.csum_type)
        self._csum_size = CSUM_SIZES[sb.csum_type]
        self.meta_fsid = sb.metadata_uuid if sb.incompat_flags & S.INCOMPAT_METADATA_UUID else sb.fsid
        self.devices: dict[int, ByteSource] = {sb.dev_item.devid: source}
        self.device_uuids: dict[int, bytes] = {sb.dev_item.devid: sb.dev_item.uuid}
        for extra in devices or []:
            self._add_device(extra)
        self.chunks: list[Chunk] = []
        self._starts: list[int] = []
        self._cache: OrderedDict[int, Node] = OrderedDict()
        self._load_sys_chunks()
        self._load_chunk_tree()

    # -- superblock ------------------------------------------------------------

    def _read_super(self, source: ByteSource, offset: int) -> tuple[object | None, str | None]:
        raw = source.read(offset, S.SUPER_INFO_SIZE)
        if len(raw) < S.SUPER_INFO_SIZE:
            return None, f"superblock at {offset} is past the end"
        if raw[0x40:0x48] != S.MAGIC:
            return None, f"no superblock magic at {offset}"
        sb = S.Superblock.parse(raw)
        summer = checksummer(sb.csum_type)
        if sb.csum_type not in CSUM_SIZES:
            return None, f"superblock at {offset}: unknown checksum type {sb.csum_type}"
        if summer is None:
            return None, (f"superblock at {offset}: checksum type {S.CSUM_NAMES[sb.csum_type]} needs the "
                          "'xxhash' package")
        size = CSUM_SIZES[sb.csum_type]
        if summer(raw[0x20:])[:size] != sb.csum[:size]:
            return None, f"superblock at {offset}: checksum mismatch"
        if sb.bytenr != offset:
            return None, f"superblock at {offset} says it lives at {sb.bytenr}"
        for what, value in (("nodesize", sb.nodesize), ("sectorsize", sb.sectorsize)):
            if value < 512 or value > 65536 or value & (value - 1):
                return None, f"superblock at {offset}: {what} {value}"
        if sb.nodesize < sb.sectorsize or sb.sys_chunk_array_size > 2048 or sb.root_level > 7 \
                or sb.chunk_root_level > 7:
            return None, (f"superblock at {offset}: nodesize {sb.nodesize}, sectorsize {sb.sectorsize}, "
                          f"sys_chunk_array_size {sb.sys_chunk_array_size}, levels {sb.root_level}/{sb.chunk_root_level}")
        return sb, None

    def _pick_super(self, source: ByteSource):
        best = None
        problems = []
        for offset in S.SUPER_MIRRORS:
            if offset + S.SUPER_INFO_SIZE > source.size:
                break
            try:
                sb, why = self._read_super(source, offset)
            except OSError as exc:
                sb, why = None, f"superblock at {offset} unreadable: {exc}"
            if sb is None:
                problems.append(why)
                continue
            if best is None or sb.generation > best.generation:
                best = sb
        if best is None:
            why = "; ".join(problems) or (f"the volume is {source.size} bytes, too small to hold one "
                                          f"(the first lies at {S.SUPER_INFO_OFFSET})")
            raise FilesystemError(f"no valid btrfs superblock ({why})", file=self.name)
        for why in problems:
            if "no superblock magic" not in why and "past the end" not in why:
                self.notes.append(why)
        return best

    def _add_device(self, source: ByteSource) -> None:
        sb, why = self._read_super(source, S.SUPER_INFO_OFFSET)
        if sb is None:
            raise FilesystemError(f"extra device {source.name}: {why}", file=self.name)
        if sb.fsid != self.sb.fsid:
            raise FilesystemError(f"extra device {source.name} belongs to another btrfs "
                                  f"({uuid_mod.UUID(bytes=sb.fsid)})", file=self.name)
        self.devices[sb.dev_item.devid] = source
        self.device_uuids[sb.dev_item.devid] = sb.dev_item.uuid

    # -- chunk map -------------------------------------------------------------

    def _add_chunk(self, chunk: Chunk) -> None:
        i = bisect_right(self._starts, chunk.logical)
        if i and self.chunks[i - 1].logical == chunk.logical:
            return
        self.chunks.insert(i, chunk)
        self._starts.insert(i, chunk.logical)

    def _load_sys_chunks(self) -> None:
        raw = self.sb.sys_chunk_array[:self.sb.sys_chunk_array_size]
        pos = 0
        while pos + 17 <= len(raw):
            objectid, ktype, offset = S.DISK_KEY.unpack_from(raw, pos)
            pos += 17
            if ktype != S.CHUNK_ITEM_KEY:
                raise FilesystemError(f"sys_chunk_array holds an item of type {ktype}, not a chunk", file=self.name)
            try:
                chunk, pos = parse_chunk(raw, pos, offset)
            except ValueError as exc:
                raise FilesystemError(f"sys_chunk_array: {exc}", file=self.name) from None
            self._add_chunk(chunk)
        if not self.chunks:
            raise FilesystemError("sys_chunk_array is empty: the chunk tree cannot be found", file=self.name)

    def _load_chunk_tree(self) -> None:
        damage: list[str] = []
        root = (self.sb.chunk_root, self.sb.chunk_root_level, self.sb.chunk_root_generation)
        try:
            for key, data in self.items(root, (0, 0, 0), MAX_KEY, damage):
                if key[1] == S.CHUNK_ITEM_KEY:
                    try:
                        chunk, _ = parse_chunk(data, 0, key[2])
                    except ValueError as exc:
                        damage.append(str(exc))
                        continue
                    self._add_chunk(chunk)
                elif key[1] == S.DEV_ITEM_KEY and len(data) >= S.DevItem.sizeof():
                    dev = S.DevItem.parse(data)
                    self.device_uuids.setdefault(dev.devid, dev.uuid)
        except TreeBlockError as exc:
            raise FilesystemError(f"the chunk tree is unreadable: {exc}", file=self.name) from None
        for why in damage:
            self.notes.append(f"chunk tree damaged: {why}")

    def _chunk(self, logical: int) -> Chunk:
        i = bisect_right(self._starts, logical) - 1
        if i >= 0:
            chunk = self.chunks[i]
            if logical < chunk.logical + chunk.length:
                return chunk
        raise MappingError(f"logical address {logical} is in no chunk")

    def map(self, logical: int, length: int) -> list[tuple[int, list[tuple[int, int]]]]:
        """[(piece length, [(devid, physical), ...copies]), ...] covering the range."""
        out = []
        while length > 0:
            c = self._chunk(logical)
            off = logical - c.logical
            n = min(length, c.length - off)
            profile = c.profile
            if profile in (0, S.BG_DUP, S.BG_RAID1, S.BG_RAID1C3, S.BG_RAID1C4):
                copies = [(devid, phys + off) for devid, phys in c.stripes]
            else:
                stripe_nr, within = divmod(off, c.stripe_len)
                n = min(n, c.stripe_len - within)
                count = len(c.stripes)
                if profile == S.BG_RAID0:
                    idx, row = stripe_nr % count, stripe_nr // count
                    copies = [c.stripes[idx]]
                elif profile == S.BG_RAID10:
                    factor = count // c.sub_stripes
                    idx, row = (stripe_nr % factor) * c.sub_stripes, stripe_nr // factor
                    copies = list(c.stripes[idx:idx + c.sub_stripes])
                else:   # RAID5/6: the data stripe (parity rotates with the row)
                    data_stripes = count - (1 if profile == S.BG_RAID5 else 2)
                    idx, row = stripe_nr % data_stripes, stripe_nr // data_stripes
                    copies = [c.stripes[(idx + row) % count]]
                copies = [(devid, phys + row * c.stripe_len + within) for devid, phys in copies]
            out.append((n, copies))
            logical += n
            length -= n
        return out

    def mirrors(self, logical: int) -> int:
        c = self._chunk(logical)
        if c.profile in (0, S.BG_DUP, S.BG_RAID1, S.BG_RAID1C3, S.BG_RAID1C4):
            return len(c.stripes)
        return c.sub_stripes if c.profile == S.BG_RAID10 else 1

    def missing(self, devid: int) -> str:
        uuid = self.device_uuids.get(devid)
        what = f"device {devid}" + (f" (uuid {uuid_mod.UUID(bytes=uuid)})" if uuid else "")
        return f"{what} of this multi-device btrfs is missing: add its disk with --disk"

    def read_logical(self, logical: int, length: int, mirror: int | None = None) -> bytes:
        """`length` bytes at a logical address: copy number `mirror` where
        there are copies, or (None) the first copy that reads, then the next
        one when a copy is cut off by a truncated image or unreadable."""
        parts = []
        for n, copies in self.map(logical, length):
            present = [c for c in copies if c[0] in self.devices]
            if not present:
                rebuilt = self._rebuild(logical, n)
                if rebuilt is None:
                    raise MappingError(self.missing(copies[0][0]))
                parts.append(rebuilt)
                logical += n
                continue
            order = [present[mirror % len(present)]] if mirror is not None else present
            problem = ""
            for devid, phys in order:
                try:
                    data = self.devices[devid].read(phys, n)
                except OSError as exc:   # DamagedRange from a container below
                    problem = f"logical {logical}: physical {phys} on device {devid}: {exc}"
                    continue
                if len(data) == n:
                    parts.append(data)
                    break
                problem = (f"logical {logical}: physical {phys} on device {devid} is past the end of the "
                           "image (truncated?)")
            else:
                raise MappingError(problem)
            logical += n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _rebuild(self, logical: int, n: int) -> bytes | None:
        """RAID5/6 data on a missing device, rebuilt from the other data
        stripes of its row and the P parity (their XOR); None when another
        device of the row is missing too (RAID6's Q syndrome is not used)."""
        c = self._chunk(logical)
        if c.profile not in (S.BG_RAID5, S.BG_RAID6):
            return None
        count = len(c.stripes)
        data_stripes = count - (1 if c.profile == S.BG_RAID5 else 2)
        stripe_nr, within = divmod(logical - c.logical, c.stripe_len)
        idx, row = stripe_nr % data_stripes, stripe_nr // data_stripes
        # the row's stripes rotate: data i on stripe (i + row) % count, P right after the data
        others = [(i + row) % count for i in range(data_stripes) if i != idx] + [(data_stripes + row) % count]
        acc = 0
        for k in others:
            devid, base = c.stripes[k]
            source = self.devices.get(devid)
            if source is None:
                return None
            data = source.read(base + row * c.stripe_len + within, n)
            if len(data) != n:
                return None
            acc ^= int.from_bytes(data, "little")
        return acc.to_bytes(n, "little")

    def physical_runs(self, logical: int, length: int) -> list[tuple[int, int | None]]:
        """[(length, offset on self.source or None)] for a data range: where the
        first present copy lies on the primary device (None elsewhere)."""
        out = []
        own = self.sb.dev_item.devid
        for n, copies in self.map(logical, length):
            where = next((phys for devid, phys in copies if devid == own), None)
            out.append((n, where))
        return out

    # -- tree blocks -----------------------------------------------------------

    def node(self, bytenr: int, level: int | None = None, generation: int | None = None) -> Node:
        cached = self._cache.get(bytenr)
        if cached is not None:
            self._cache.move_to_end(bytenr)
            if level is None or cached.level == level:
                return cached
        problems = []
        try:
            copies = self.mirrors(bytenr)
        except MappingError as exc:
            raise TreeBlockError(f"tree block {bytenr}: {exc}") from None
        for mirror in range(copies):
            try:
                raw = self.read_logical(bytenr, self.nodesize, mirror)
            except (MappingError, OSError) as exc:
                problems.append(str(exc))
                continue
            why = self._check_block(raw, bytenr, level, generation)
            if why is None:
                try:
                    node = self._parse_node(raw, bytenr)
                except ValueError as exc:
                    problems.append(str(exc))
                    continue
                if len(self._cache) >= NODE_CACHE:
                    self._cache.popitem(last=False)
                self._cache[bytenr] = node
                return node
            problems.append(why + (f" (copy {mirror + 1})" if copies > 1 else ""))
        raise TreeBlockError(f"tree block at logical {bytenr}: " + "; ".join(problems))

    def _check_block(self, raw: bytes, bytenr: int, level: int | None, generation: int | None) -> str | None:
        if self._csum(raw[32:])[:self._csum_size] != raw[:self._csum_size]:
            return "checksum mismatch"
        if raw[32:48] != self.meta_fsid:
            return "belongs to another filesystem (fsid)"
        hdr_bytenr, _flags, _ct, gen, _owner, nritems, lvl = S.HEADER.unpack_from(raw, 48)
        if hdr_bytenr != bytenr:
            return f"header says bytenr {hdr_bytenr}"
        if level is not None and lvl != level:
            return f"level {lvl}, expected {level}"
        if generation is not None and gen != generation:
            return f"generation {gen}, expected {generation} (stale block)"
        return None

    def _parse_node(self, raw: bytes, bytenr: int) -> Node:
        hdr_bytenr, _flags, _ct, gen, owner, nritems, level = S.HEADER.unpack_from(raw, 48)
        body = S.HEADER_SIZE
        if level == 0:
            if body + nritems * S.ITEM.size > len(raw):
                raise ValueError(f"leaf {bytenr} claims {nritems} items")
            items = list(S.ITEM.iter_unpack(raw[body:body + nritems * S.ITEM.size]))
            limit = len(raw)
            spans = []
            for it in items:
                start = body + it[3]
                end = start + it[4]
                if end > limit or start < body + nritems * S.ITEM.size:
                    raise ValueError(f"leaf {bytenr}: item data {it[3]}+{it[4]} outside the block")
                spans.append((start, end))
            keys = [it[:3] for it in items]
            return Node(bytenr, 0, owner, gen, keys, spans=spans, raw=raw)
        if level > 7 or nritems == 0 or body + nritems * S.KEY_PTR.size > len(raw):
            raise ValueError(f"node {bytenr}: level {level}, {nritems} pointers")
        ptrs = list(S.KEY_PTR.iter_unpack(raw[body:body + nritems * S.KEY_PTR.size]))
        return Node(bytenr, level, owner, gen, [p[:3] for p in ptrs], ptrs=[p[3:] for p in ptrs])

    def items(self, root: tuple, lo: Key, hi: Key, damage: list[str]) -> Iterator[tuple[Key, bytes]]:
        """Every (key, item data) with lo <= key <= hi in the tree whose root
        block is root = (bytenr, level, generation). A damaged block below
        the root is noted in `damage` and skipped; a damaged root raises."""
        bytenr, level, generation = root
        node = self.node(bytenr, level, generation)
        yield from self._walk(node, lo, hi, damage)

    def _walk(self, node: Node, lo: Key, hi: Key, damage: list[str]) -> Iterator[tuple[Key, bytes]]:
        keys = node.keys
        n = len(keys)
        if node.level == 0:
            i = bisect_left(keys, lo)
            while i < n and keys[i] <= hi:
                yield keys[i], node.item(i)
                i += 1
            return
        i = max(0, bisect_right(keys, lo) - 1)
        while i < n and keys[i] <= hi:
            blockptr, gen = node.ptrs[i]
            try:
                child = self.node(blockptr, node.level - 1, gen)
            except TreeBlockError as exc:
                damage.append(str(exc))
            else:
                yield from self._walk(child, lo, hi, damage)
            i += 1

    def get(self, root: tuple, key: Key, damage: list[str]) -> bytes | None:
        for _key, data in self.items(root, key, key, damage):
            return data
        return None
