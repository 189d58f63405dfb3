"""Memory units: libvirt's scaled integers, KiB/MiB/page conversions and page-size labels.

Conversions that charge a guest round up: a guest with 1 KiB more than a MiB takes two MiB, and
memory that does not fill its last page still takes the page.
"""

from __future__ import annotations

__all__ = ["SMALL_PAGE_KB", "is_page_size", "mib_from_kib", "page_label", "pages_for", "scale_to_kib"]

#: The small (base) page size of x86-64 and most aarch64 kernels, in KiB.
SMALL_PAGE_KB = 4

_UNIT_POWERS = {"k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}


def scale_to_kib(value: int, unit: str | None) -> int:
    """libvirt's scaled integers (virScaleInteger; formatdomain "memory" unit attribute) in KiB:
    b/bytes; k, KiB (1024) vs KB (1000); M, MiB, MB; ... up to E; no unit = KiB. Rounded up to
    whole KiB, as libvirt does. Shared by capabilities and domain XML parsing. ValueError on an
    unknown unit."""
    low = (unit if unit is not None else "KiB").strip().lower()
    if low in ("b", "bytes"):
        factor = 1
    elif low and low[0] in _UNIT_POWERS and low[1:] in ("", "ib", "b"):
        factor = (1000 if low[1:] == "b" else 1024) ** _UNIT_POWERS[low[0]]
    else:
        raise ValueError(f"unknown unit {unit!r}")
    return -(-(value * factor) // 1024)


def is_page_size(size_kb: int) -> bool:
    """A size a page can have: a power of two of at least 4 KiB (every MMU's pages are; 3 KiB is not)."""
    return size_kb >= SMALL_PAGE_KB and size_kb & (size_kb - 1) == 0


def mib_from_kib(kib: int) -> int:
    """KiB -> MiB rounded up: what host state charges a guest (1025 KiB -> 2 MiB)."""
    return -(-kib // 1024)


def pages_for(memory_kib: int, size_kb: int) -> int:
    """Pages of `size_kb` KiB that `memory_kib` takes, the last one partly used (4097 KiB, 4 -> 1025)."""
    return -(-memory_kib // size_kb)


def page_label(size_kb: int) -> str:
    """A page size for people: 4 -> "4K", 2048 -> "2M", 1048576 -> "1G"."""
    if size_kb >= 1048576:
        return f"{size_kb // 1048576}G"
    if size_kb >= 1024:
        return f"{size_kb // 1024}M"
    return f"{size_kb}K"
