"""The Sleuth Kit's view of a byte source: a pytsk3 `Img_Info` that reads
through our layers, so TSK sees whatever they produce (a partition of a qcow2
inside a tar.gz). Used for partition tables here and for filesystems in fs/tsk.py.
"""

from __future__ import annotations

import pytsk3

from ..source.base import ByteSource


class TskImage(pytsk3.Img_Info):
    """Hands TSK the bytes of any byte source (partition tables and filesystems)."""

    def __init__(self, source: ByteSource) -> None:
        self._source = source
        super().__init__(url="", type=pytsk3.TSK_IMG_TYPE_EXTERNAL)

    def read(self, offset: int, length: int) -> bytes:
        try:
            data = self._source.read(offset, length)
        except OSError:
            return b""   # TSK turns a short read into an error for that block only
        return data

    def get_size(self) -> int:
        return self._source.size

    def close(self) -> None:
        pass
