"""The one CRC-32C every reader uses."""

from rescue import crc32c as crc


def test_crc32c_check_value_and_the_fallback_agree():
    """The one CRC-32C (VHDX, XFS, btrfs): the standard check value, and the
    table fallback equal to the C library on the same bytes."""
    assert crc.crc32c(b"123456789") == 0xE3069283
    data = bytes(range(256)) * 17
    assert crc.crc32c(data) == ~crc._register_py(0xFFFFFFFF, data) & 0xFFFFFFFF
    assert crc.crc32c_register(0xFFFFFFFE, b"name") == crc._register_py(0xFFFFFFFE, b"name")
