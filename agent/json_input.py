"""JSON from outside, before it reaches a decoder: its nesting depth, bounded in one linear pass.

msgspec's decoder (and the stdlib's) recurses once per level and raises RecursionError somewhere
near Python's recursion limit (~1000 levels, fewer when the stack is already deep), so a 2 KiB
``[[[[...]]]]`` would escape as an untyped traceback. `check_json_depth` refuses it first, with the
caller's typed error, whatever the current stack depth:

    >>> check_json_depth(b'{"a": [[1], "[[[["]}', what="host file")  # depth 3; brackets in strings do not count
    >>> check_json_depth(b"[" * 100, what="host file")
    Traceback (most recent call last):
    agent.errors.InvalidInput: host file: JSON nested deeper than 32 levels
"""

from __future__ import annotations

import operator
import re
from itertools import accumulate, count
from typing import Callable

from agent.errors import AgentError, InvalidInput
from agent.limits import MAX_JSON_DEPTH

__all__ = ["check_json_depth", "json_depth"]

# a JSON string, escapes included (unrolled: no per-character alternation)
_STRING_RE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")  # +1 / -1, shifted by one to stay unsigned
_PAIR = bytes.maketrans(b"[{]}", b"(())")


def _brackets(data: bytes | str) -> bytes:
    """The brackets of `data` outside strings, in order (C loops only)."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    return _STRING_RE.sub(b"", raw).translate(None, _NOT_BRACKETS)


def json_depth(data: bytes | str) -> int:
    """The deepest nesting of arrays/objects in `data` (0 for a scalar), brackets in strings left out.

    Linear: the strings are cut out and the other bytes dropped by C loops, and the running depth
    is a C-level accumulate. Text that is not JSON gets some number; the decoder refuses it later.
    """
    steps = _brackets(data).translate(_STEP)
    # after k brackets the depth is (sum of the first k steps) - k
    return max(map(operator.sub, accumulate(steps), count(1)), default=0)


def _shallow(brackets: bytes, limit: int) -> bool:
    """True when balanced `brackets` nest at most `limit` deep: each pass removes the innermost
    level, so a document `limit` deep is gone after `limit` passes (a few C scans for any real one)."""
    pairs = brackets.translate(_PAIR)
    for _ in range(limit):
        if not pairs:
            return True
        pairs = pairs.replace(b"()", b"")
    return not pairs


def check_json_depth(
    data: bytes | str, *, what: str, error: Callable[[str], AgentError] = InvalidInput, limit: int = MAX_JSON_DEPTH
) -> None:
    """Refuse `data` (with `error`, naming `what`) when it nests deeper than `limit`."""
    raw_count = data.count("[") + data.count("{") if isinstance(data, str) else data.count(b"[") + data.count(b"{")
    if raw_count <= limit:  # too few brackets to nest that deep: every ordinary document
        return
    if not _shallow(_brackets(data), limit) and json_depth(data) > limit:
        raise error(f"{what}: JSON nested deeper than {limit} levels")
