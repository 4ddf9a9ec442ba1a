"""Byte counts written for people."""

from __future__ import annotations


def format_size(size: int) -> str:
    """Format a byte count with a decimal unit: 1.23 GB, 45.6 MB, 7.8 KB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}" if size < 100 * scale else f"{size / scale:.0f} {unit}"
    return f"{size} B"
