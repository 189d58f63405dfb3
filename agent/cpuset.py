"""CPU sets in Nova/libvirt syntax ("0-3,^2,8") and the kernel's list syntax ("0-3,8"): one parser
and one formatter for the configuration, the host (sysfs, capabilities), requests and domain XML.

Hardened against hostile text: numbers are plain ASCII digits (at most MAX_CPU_SET_DIGITS), every
id is bounded before any range is expanded, and the element and id counts are bounded, so any input
costs a few ms at most. Callers wrap ValueError in their own typed error naming the input.
"""

from __future__ import annotations

from typing import Iterable

from agent.limits import MAX_CPU_SET_DIGITS, MAX_CPU_SET_IDS, MAX_CPU_SET_TOKENS, MAX_HOST_CPU_ID, MAX_ID
from agent.numbers import ASCII_SPACE, uint_or_none

__all__ = ["MAX_CPU_SET_ID", "format_cpu_set", "format_id_list", "parse_cpu_set", "parse_kernel_cpu_list"]

#: Largest CPU / node id parse_cpu_set accepts by default (far above any kernel's NR_CPUS).
MAX_CPU_SET_ID = MAX_ID


def _cpu_id(text: str, raw: str) -> int:
    # ASCII digits only: int() would also take "1_0", "+3", Unicode digits and 5000-digit strings
    value = uint_or_none(text, max_digits=MAX_CPU_SET_DIGITS)
    if value is None:
        raise ValueError(f"bad element {raw.strip(ASCII_SPACE)[:40]!r}")
    return value


def _range(part: str, raw: str, max_id: int, excluded: bool, clip_excluded: bool) -> range:
    """The ids of one element ("3" or "2-5", without its "^"), checked against `max_id`."""
    lo_s, dash, hi_s = part.partition("-")
    lo = _cpu_id(lo_s, raw)
    hi = _cpu_id(hi_s, raw) if dash else lo
    if lo > hi:
        raise ValueError(f"descending range {raw.strip(ASCII_SPACE)[:40]!r}")
    if excluded and clip_excluded:
        return range(lo, min(hi, max_id) + 1)
    if hi > max_id:
        raise ValueError(f"id {hi} above {max_id}")
    return range(lo, hi + 1)


def parse_cpu_set(
    text: str,
    *,
    max_id: int = MAX_CPU_SET_ID,
    allow_exclude: bool = True,
    allow_empty_elements: bool = True,
    clip_excluded: bool = False,
    max_ids: int = MAX_CPU_SET_IDS,
) -> frozenset[int]:
    """Parse a CPU set like "0-3,^2,8" (Nova/libvirt syntax) into ids; ValueError on garbage.

    Numbers are plain ASCII digits (at most 7); every id (range ends included) must be <= `max_id`,
    checked before anything is expanded; at most MAX_CPU_SET_TOKENS elements and MAX_CPU_SET_IDS
    ids in all. `allow_exclude=False` refuses "^N" (the kernel's list syntax has none);
    `allow_empty_elements=False` refuses "1,,2"; `clip_excluded=True` ignores excluded ids above
    `max_id` instead of refusing them (Nova's masks: "^50" on a 4-vCPU flavor excludes nothing).
    `max_ids` lowers the id budget where a list is known to be short (an SMT sibling list).
    """
    if not isinstance(text, str):
        raise ValueError(f"a CPU set must be text, not {type(text).__name__}")
    if not text.strip(ASCII_SPACE):
        return frozenset()
    tokens = text.split(",")
    if len(tokens) > MAX_CPU_SET_TOKENS:
        raise ValueError(f"more than {MAX_CPU_SET_TOKENS} elements")
    include: set[int] = set()
    exclude: set[int] = set()
    budget = max_ids
    for raw in tokens:
        part = raw.strip(ASCII_SPACE)
        if not part:
            if allow_empty_elements:
                continue
            raise ValueError("empty element")
        excluded = part.startswith("^")
        if excluded and not allow_exclude:
            raise ValueError(f"bad element {part[:40]!r}")
        ids = _range(part[1:].strip(ASCII_SPACE) if excluded else part, raw, max_id, excluded, clip_excluded)
        budget -= len(ids)
        if budget < 0:
            raise ValueError(f"selects more than {max_ids} ids")
        (exclude if excluded else include).update(ids)
    return frozenset(include - exclude)


def parse_kernel_cpu_list(text: str, *, max_ids: int = MAX_CPU_SET_IDS) -> frozenset[int]:
    """The kernel's list syntax ("0-3,8,10-11"; empty means none): no "^" exclusions, no empty
    elements, ids up to MAX_HOST_CPU_ID, at most `max_ids` of them. ValueError on garbage."""
    return parse_cpu_set(text, max_id=MAX_HOST_CPU_ID, allow_exclude=False, allow_empty_elements=False, max_ids=max_ids)


def format_cpu_set(cpus: Iterable[int]) -> str:
    """Render CPU ids as a compact range string ("0-3,8"), the inverse of parse_cpu_set."""
    ids = sorted(set(cpus))
    out: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(out)


def format_id_list(ids: Iterable[int], *, at_most: int | None = 16) -> str:
    """Ids one by one ("1,2,5"), cut after `at_most` (None: never) with ",..." (for messages)."""
    ordered = sorted(ids)
    if at_most is None or len(ordered) <= at_most:
        return ",".join(map(str, ordered))
    return ",".join(map(str, ordered[:at_most])) + ",..."
