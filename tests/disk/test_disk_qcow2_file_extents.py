"""qcow2's per-file shortcut for `file_extents` (a range inside one decoded
data extent, answered from the table) gives exactly what the generic piece
walk gives, on every qemu-img variant, for random ranges of every size."""

from __future__ import annotations

import random

import pytest

from disk_support import LARGE, OWN_EXPECTED, SAME_AS_BASE, open_path
from disk_support import images, no_big_leftovers  # noqa: F401 (fixtures)
from rescue.disk.mapping import MappedDisk

pytestmark = pytest.mark.usefixtures("no_big_leftovers")


@pytest.mark.parametrize("name", SAME_AS_BASE + OWN_EXPECTED + LARGE)
def test_shortcut_equals_the_generic_walk(images, name):
    disk = open_path(images.path(name))
    rnd = random.Random(len(name))
    cs = disk.info.cluster_size
    answered = 0
    try:
        for _ in range(3000):
            length = rnd.choice([1, 100, 4096, cs - 1, cs, cs + 1, 3 * cs, rnd.randrange(1, 8 * cs)])
            offset = rnd.choice([rnd.randrange(disk.size), rnd.randrange(disk.size // cs) * cs,
                                 disk.size - length, disk.size - length + 1])
            if offset < 0:
                continue
            fast = disk.file_extents(offset, length)
            assert fast == MappedDisk.file_extents(disk, offset, length), (name, offset, length)
            answered += fast is not None
    finally:
        disk.close()
    if name.startswith(("v2", "v3", "cs", "extl2.")):
        assert answered > 0   # images with data clusters: the shortcut was taken
