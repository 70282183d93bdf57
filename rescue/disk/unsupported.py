"""Containers we recognise but do not read: say what the file is and how to
get a readable copy, instead of treating it as a raw disk and reporting "not a
disk image".

Magics: ASIF (Apple Sparse Image Format, macOS 26) "shdw" at 0 (dissect.hypervisor
asif.py); QED "QED\\0" at 0 (qemu docs/interop/qed_spec.txt); EWF/E01 (EnCase
forensic images) "EVF\\x09\\x0d\\x0a\\xff\\x00" at 0 (libewf documentation).
"""

from __future__ import annotations

from ..errors import UnsupportedFeature
from ..source.base import ByteSource
from .base import DiskOptions

# (magic at offset 0, what the file is, how to get a format rescue reads)
KNOWN = (
    (b"shdw", "an Apple sparse image (ASIF, macOS 26)",
     "on the Mac, convert it to a read/write DMG or raw image (Disk Utility: Image > Convert), "
     "which rescue reads"),
    (b"QED\0", "a QEMU Enhanced Disk (QED) image",
     "convert it to raw or qcow2 first: qemu-img convert -O raw IMAGE.qed OUT.img"),
    (b"EVF\x09\x0d\x0a\xff\x00", "an EnCase/EWF forensic image (E01)",
     "export it to raw first: ewfexport -t OUT IMAGE.E01 (libewf-tools), or mount it with ewfmount"),
)


def _match(source: ByteSource):
    head = source.read(0, 8)
    return next((k for k in KNOWN if head.startswith(k[0])), None)


def detect(source: ByteSource) -> bool:
    return _match(source) is not None


def open(source: ByteSource, options: DiskOptions):  # noqa: A001 (reader interface)
    _magic, what, hint = _match(source)
    raise UnsupportedFeature(f"this is {what}: a format rescue does not read", file=source.name, hint=hint)
