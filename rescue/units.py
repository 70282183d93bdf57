"""Sizes as people read them."""

from __future__ import annotations


def human_size(n: int | float) -> str:
    """1536 -> '1.5 KiB'; whole bytes below 1 KiB ('512 B')."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)
