"""Native ext2/3/4 directory reader: the names in a directory inode.

The Sleuth Kit checks every name it adds to a directory against all names
already added, so listing a directory of n names costs O(n^2) (65 000 names:
10 s), and it resolves each path from the root again. This reader parses the
linear directory entries straight from the directory's blocks, found through
`ExtInodeReader.block_runs` (extents or block map) or its inline data.

Hashed (htree) directories are read linearly, as the kernel's readdir does:
the index root hides inside the rec_len of "..", index nodes are one empty
entry spanning the block, and metadata_csum tails are empty 12-byte entries.
Anything the kernel would call corrupt (ext4_check_dir_entry) raises
`DirectoryDamaged` naming the block, offset, field and value; encrypted
directories raise `DirectoryUnsupported` (left to TSK). `entries(recover=True)`
instead scans each damaged block for plausible entries the way The Sleuth
Kit's ext2 directory scan does (`scan_block`), so a damaged directory's names
are recovered without TSK, whose listing costs a load of every entry's inode
(one absurd inode: tens of seconds).

References:
- Linux fs/ext4/ext4.h (struct ext4_dir_entry_2, EXT4_DIR_REC_LEN,
  ext4_rec_len_from_disk, EXT4_FT_*), fs/ext4/dir.c (__ext4_check_dir_entry,
  ext4_readdir: holes are skipped), fs/ext4/inline.c (ext4_read_inline_dir:
  parent inode in the first 4 bytes of i_block, entries in the rest of i_block
  and in the system.data attribute).
- https://www.kernel.org/doc/html/latest/filesystems/ext4/directory.html
- The Sleuth Kit tsk/fs/ext2fs_dent.cpp (ext2fs_dent_parse_block: the scan
  in 4-byte steps, "dellen" for the deleted entries in a rec_len's slack),
  tsk/fs/fs_dir.cpp (tsk_fs_dir_add: one name per (inode, name)),
  tsk/fs/ext2fs.cpp (last_inum = s_inodes_count + 1: its orphan directory).
"""

from __future__ import annotations

import functools
import struct
from typing import NamedTuple

from construct import Int8ul, Int16ul, Int32ul, Struct

from .base import BLOCK, CHAR, DIR, FIFO, FILE, SOCKET, SYMLINK, FileReadError
from .ext_inode import EXTENTS_FL, INLINE_DATA_FL, INLINE_DATA_SIZE, MAX_EXTENT_DEPTH, S_IFDIR, S_IFMT, \
    ExtInodeReader

# struct ext4_dir_entry_2 (with the filetype feature); without it name_len is 16 bits.
DirEntryHeader = Struct(
    "inode" / Int32ul,
    "rec_len" / Int16ul,
    "name_len" / Int8ul,
    "file_type" / Int8ul,
)                                        # 8 bytes, then the name, padded to 4
_HEADER = struct.Struct("<IHBB")         # the same, for the hot loop
HEADER_SIZE = 8
MIN_REC_LEN = 12                         # EXT4_DIR_REC_LEN(1)
INCOMPAT_FILETYPE = 0x2
ENCRYPT_FL = 0x800
READ_CHUNK = 4 << 20                     # directory blocks read this many bytes at a time
MAX_DIR_BYTES = 256 << 20                # larger directories are left to TSK (memory stays bounded)
MAX_NAME_LEN = 255                       # EXT2FS_MAXNAMLEN

FT_KIND = {1: FILE, 2: DIR, 3: CHAR, 4: BLOCK, 5: FIFO, 6: SOCKET, 7: SYMLINK}


class DirectoryDamaged(FileReadError):
    """A directory block breaks the on-disk rules (the kernel would call it corrupt)."""


class DirectoryUnsupported(FileReadError):
    """A directory this reader does not decode (encrypted names)."""


class DirEntry(NamedTuple):
    name: bytes
    inode: int
    file_type: int     # EXT4_FT_*; 0 when the filesystem has no filetype feature


_new_dir_entry = functools.partial(tuple.__new__, DirEntry)   # DirEntry(...) without its Python-level __new__


class ExtDirReader:
    """Lists ext directories by inode number, without The Sleuth Kit."""

    def __init__(self, inodes: ExtInodeReader) -> None:
        self.inodes = inodes
        self.name = inodes.name
        self.block_size = inodes.block_size
        self.filetype = bool(inodes.sb.s_feature_incompat & INCOMPAT_FILETYPE)
        self.crafted: dict[int, list[str]] = {}   # directory inode -> its extra "."/".." entries
        self._ino = 0

    def may_be_dir(self, ino: int) -> bool:
        """False when the inode's mode names another type; a mode without a type
        (a damaged inode a directory entry calls a directory) is given a try."""
        return self.inodes.inode(ino).i_mode & S_IFMT in (S_IFDIR, 0)

    def entries(self, ino: int, problems: list[str] | None = None, recover: bool = False) -> list[DirEntry]:
        """The live entries of directory `ino` in on-disk order ("." and ".."
        and unused entries left out). A damaged entry raises DirectoryDamaged;
        with a `problems` list it is described there instead and the rest of
        its block skipped, as the kernel's readdir does; with `recover` too,
        that block's names are those `scan_block` finds in it (and a name met
        twice with the same inode is listed once, as TSK lists it)."""
        inode = self.inodes.inode(ino)
        what = f"{self.name}: directory inode {ino}"
        self._ino = ino
        if inode.i_flags & ENCRYPT_FL:
            raise DirectoryUnsupported(f"{what} is encrypted (i_flags={inode.i_flags:#x})")
        out: list[DirEntry] = []
        if inode.i_flags & INLINE_DATA_FL:
            data = self.inodes.inline_data(ino)
            # the first 4 bytes are the parent's inode number (the "..")
            self._parse(data[4:INLINE_DATA_SIZE], f"{what} inline data", 4, out, problems, recover=recover)
            if len(data) > INLINE_DATA_SIZE:
                self._parse(data[INLINE_DATA_SIZE:], f"{what} system.data", INLINE_DATA_SIZE, out, problems,
                            recover=recover)
            return _once(out) if recover and problems else out
        bs = self.block_size
        # Bounded by the blocks mapped, not by i_size: a damaged i_size of
        # terabytes over a few blocks is a small directory (holes: no entries, as readdir).
        try:
            runs = [(lblk, pblk, count) for lblk, pblk, count, unwritten in
                    self.inodes.mapped_runs(ino, what=f"{what} blocks", metadata=False) if not unwritten]
        except FileReadError as exc:   # a damaged block map or extent tree
            if problems is None:
                raise DirectoryDamaged(str(exc)) from None
            problems.append(f"{exc}: only the blocks it maps soundly are read")
            runs = self._sound_runs(ino, inode, f"{what} blocks")
        mapped = sum(count for _, _, count in runs) * bs
        if mapped > MAX_DIR_BYTES:
            raise DirectoryUnsupported(f"{what}: {mapped} bytes of blocks are more than {MAX_DIR_BYTES}")
        for lblk, pblk, count in runs:
            done = 0
            while done < count:
                n = min(count - done, max(1, READ_CHUNK // bs))
                try:
                    data = self.inodes.read_blocks(pblk + done, n, f"{what} blocks")
                except FileReadError as exc:   # past the end of a cut image
                    if not recover or problems is None:
                        raise
                    problems.append(str(exc))
                    break
                for i in range(n):
                    self._parse(data[i * bs:(i + 1) * bs], f"{what} block {lblk + done + i}", 0, out, problems,
                                first_block=lblk + done + i == 0, recover=recover)
                done += n
        return _once(out) if recover and problems else out

    def _sound_runs(self, ino: int, inode, what: str) -> list[tuple[int, int, int]]:
        """The runs of a damaged map that point inside the filesystem: those
        met before the damage (the map is walked in order), as the kernel's
        readdir skips a block it cannot map and reads the next."""
        ext = self.inodes
        nblocks = -(-ext.size_of(inode) // self.block_size)
        runs: list[tuple[int, int, int, bool]] = []
        try:
            if inode.i_flags & EXTENTS_FL:
                ext._extent_runs(ext.parsed(ino)[0][0x28:0x28 + 60], MAX_EXTENT_DEPTH, nblocks, runs, what, [0])
            else:
                ext._map_runs(inode.i_block, nblocks, runs, what)
        except (FileReadError, ValueError, struct.error):
            pass   # the runs found so far stay in `runs`
        return sorted((lblk, pblk, count) for lblk, pblk, count, unwritten in runs
                      if not unwritten and 0 < pblk and pblk + count <= ext.blocks_count)

    def scan_block(self, block: bytes) -> list[DirEntry]:
        """The names The Sleuth Kit's ext2 scan (ext2fs_dent_parse_block) finds
        allocated in one damaged directory block: every 4-byte step that holds
        a plausible entry (inode up to s_inodes_count + 1, a name of 1..255
        bytes, a rec_len that is a multiple of 4, holds the name and stays in
        the block) is one, and the entry's slack past its name ("dellen") holds
        deleted entries, which are skipped. Names end at a NUL (TSK copies them
        as C strings); "." and ".." and inodes past s_inodes_count (TSK's own
        orphan directory) are not listed."""
        size = len(block) - len(block) % 4
        if size < MIN_REC_LEN:
            return []
        words = struct.unpack_from(f"<{size // 4}I", block)
        last = self.inodes.inodes_count + 1
        limit = self.inodes.inodes_count
        filetype = self.filetype
        big = self.block_size >= 65536
        out: list[DirEntry] = []
        idx, dellen, end = 0, 0, size - MIN_REC_LEN
        while idx <= end:
            ino = words[idx >> 2]
            second = words[(idx >> 2) + 1]
            rec_len = second & 0xFFFF
            if big:   # ext4_rec_len_from_disk, as for the strict parse
                rec_len = size if rec_len in (0, 65535) else (rec_len & 65532) | ((rec_len & 3) << 16)
            if filetype:
                name_len, file_type = (second >> 16) & 0xFF, second >> 24
            else:
                name_len, file_type = second >> 16, 0
            min_rec = (name_len + 11) & ~3
            if ino > last or name_len > MAX_NAME_LEN or not name_len or rec_len < min_rec or rec_len % 4 \
                    or idx + rec_len > size or (dellen and dellen < min_rec):
                idx += 4   # not an entry (or one running out of the deleted space): the next word
                if dellen > 0:
                    dellen -= 4
                continue
            if dellen > 0:   # inside an earlier entry's slack: a deleted entry
                dellen -= min_rec
            elif ino:
                name = block[idx + HEADER_SIZE:idx + HEADER_SIZE + name_len].split(b"\0", 1)[0]
                if name and name != b"." and name != b".." and ino <= limit:
                    out.append(_new_dir_entry((name, ino, file_type)))
            if dellen <= 0:
                if rec_len - min_rec >= MIN_REC_LEN:
                    dellen = rec_len - min_rec
                else:
                    min_rec = rec_len
            idx += min_rec
        return out

    def _parse(self, block: bytes, where: str, base: int, out: list[DirEntry], problems: list[str] | None,
               first_block: bool = False, recover: bool = False) -> None:
        """Append the live entries of one directory block (or inline region).
        "." and ".." are the first two entries of block 0; any other entry with
        such a name is crafted: not listed, and noted in `crafted` for the
        filesystem to report (issue 14: never dropped silently)."""
        size = len(block)
        entries = kept = 0
        limit = self.inodes.inodes_count
        filetype = self.filetype
        big = self.block_size >= 65536
        unpack = _HEADER.unpack_from
        pos = 0
        while pos < size:
            problem = None
            if pos + HEADER_SIZE > size:
                problem = f"only {size - pos} bytes left before the end of the block"
            else:
                ino, rec_len, name_len, file_type = unpack(block, pos)
                if big:   # ext4_rec_len_from_disk for 64 KiB blocks
                    rec_len = size if rec_len in (0, 65535) else (rec_len & 65532) | ((rec_len & 3) << 16)
                if not filetype:
                    name_len |= file_type << 8
                    file_type = 0
                if rec_len < MIN_REC_LEN:
                    problem = f"rec_len={rec_len} is smaller than {MIN_REC_LEN}"
                elif rec_len % 4:
                    problem = f"rec_len={rec_len} is not a multiple of 4"
                elif rec_len < HEADER_SIZE + name_len:
                    problem = f"name_len={name_len} runs past rec_len={rec_len}"
                elif pos + rec_len > size:
                    problem = f"rec_len={rec_len} runs past the end of the block ({size} bytes)"
                elif ino > limit:
                    problem = f"inode={ino} is out of range (1..{limit})"
                elif ino and not name_len:
                    problem = f"inode={ino} has name_len=0"
            if problem:
                text = f"{where}: entry at offset {base + pos}: {problem}"
                if problems is None:
                    raise DirectoryDamaged(text)
                problems.append(f"{text}; the names in that block found by scanning it for entries instead"
                                if recover else text)
                if recover:   # the whole block scanned instead, as TSK reads it
                    del out[len(out) - kept:]
                    out += self.scan_block(block)
                return   # the rest of the block cannot be trusted
            if ino:
                name = block[pos + HEADER_SIZE:pos + HEADER_SIZE + name_len]
                if name != b"." and name != b"..":
                    out.append(_new_dir_entry((name, ino, file_type)))
                    kept += 1
                elif not (first_block and entries < 2):
                    self.crafted.setdefault(self._ino, []).append(f"{where}: entry at offset {base + pos}: an extra entry named "
                                        f"{name.decode()!r} (inode {ino}) cannot be a file name; not listed")
                entries += 1
            pos += rec_len


def _once(entries: list[DirEntry]) -> list[DirEntry]:
    """Each (name, inode) once, where it first appears (tsk_fs_dir_add)."""
    seen: set[tuple[bytes, int]] = set()
    out = []
    for e in entries:
        if (e.name, e.inode) not in seen:
            seen.add((e.name, e.inode))
            out.append(e)
    return out
