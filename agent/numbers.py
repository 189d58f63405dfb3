"""Numbers read from input: plain ASCII digits, everywhere (the one parser for every file, message,
XML attribute, metadata value and JSON key that carries a number).

``int()`` and ``str.isdigit()`` are too generous for input: ``int("２０４８") == 2048``,
``int("2_048") == 2048``, ``int(" +3 ") == 3``, ``"²".isdigit()`` is True (and ``int("²")`` then
fails), and ``str.strip()`` removes the control characters ``\\x1c``-``\\x1f`` that ``int()`` then
refuses. Here only ASCII whitespace around the digits is ignored:

    >>> parse_uint(" 2048\\n"), uint_or_none("２０４８"), uint_or_none("2_048"), uint_or_none("5\\x1c")
    (2048, None, None, None)
"""

from __future__ import annotations

import re

__all__ = ["ASCII_SPACE", "parse_uint", "uint_or_none"]

#: The whitespace allowed around a number: ASCII only (str.strip() would also take \x1c-\x1f, \x85, ...).
ASCII_SPACE = " \t\n\r\v\f"
#: Most digits by default: a u64 has 20; int() of thousands of digits is slow (and refused past 4300).
DEFAULT_MAX_DIGITS = 20

_DIGITS_RE = re.compile(r"[0-9]+", re.ASCII)


def uint_or_none(text: str, *, max_digits: int = DEFAULT_MAX_DIGITS) -> int | None:
    """The non-negative integer `text` spells in ASCII digits (ASCII whitespace around it), else None."""
    if not isinstance(text, str):
        return None
    t = text.strip(ASCII_SPACE)
    if len(t) > max_digits or not _DIGITS_RE.fullmatch(t):
        return None
    return int(t)


def parse_uint(text: str, *, max_digits: int = DEFAULT_MAX_DIGITS, lo: int = 0, hi: int | None = None) -> int:
    """`uint_or_none`, checked against [lo, hi]; ValueError (with a short reason) otherwise. Callers
    wrap the ValueError in their own typed error naming the input."""
    value = uint_or_none(text, max_digits=max_digits)
    if value is None:
        raise ValueError(f"{str(text)[:40]!r} is not a number (ASCII digits, at most {max_digits})")
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"{value} is out of range [{lo}, {hi if hi is not None else 'inf'}]")
    return value
