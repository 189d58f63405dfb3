"""Is a commit hidden in the ledger's WAL behind a damaged frame?

SQLite replays the write-ahead log up to the first frame whose checksum chain breaks and silently
ignores everything after it: right for a torn last write (that transaction never returned), but a
flipped bit in an *earlier* frame drops every later commit, acknowledged ones included, and the
ledger opens "fine" without claims it held. So before SQLite sees the WAL, its frames are walked
(https://sqlite.org/fileformat2.html#walformat): a complete frame of the current WAL generation
whose checksum fails, or a commit frame of that generation behind it, means committed transactions
would be lost: damage. A damaged WAL header with frames behind it is damage too (SQLite would
ignore the whole log). A torn last frame (shorter than a frame: the write never finished, so its
commit never returned) is not.

What this cannot see: whole frames missing from the end of the WAL (a lost write looks exactly like
commits that never happened), and a damaged salt *and* commit field in one frame.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

_HEADER = 32
_FRAME_HEADER = 24
_MAGIC = (0x377F0682, 0x377F0683)  # checksum words little-endian / big-endian
_MAX_PAGE = 65536


def _checksum(data: bytes, big_endian: bool, s0: int, s1: int) -> tuple[int, int]:
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[i + 1] + s0) & 0xFFFFFFFF
    return s0, s1


def _header(head: bytes) -> tuple[bool, int, bytes, tuple[int, int]] | None:
    """(big-endian checksums, page size, salts, header checksum) of a valid header, else None."""
    magic, _version, page_size, _seq, salt1, salt2, c1, c2 = struct.unpack(">8I", head)
    if magic not in _MAGIC or not (512 <= page_size <= _MAX_PAGE) or page_size & (page_size - 1):
        return None
    big = magic == _MAGIC[1]
    if _checksum(head[:24], big, 0, 0) != (c1, c2):
        return None
    return big, page_size, head[16:24], (c1, c2)


def _ours(frame: bytes, salts: bytes) -> bool:
    """A frame of the current WAL generation: one salt intact is enough (a flipped bit changes one;
    an older generation differs in both, salt1 counts up and salt2 is random)."""
    return frame[8:12] == salts[:4] or frame[12:16] == salts[4:]


def _commits_after_break(f: BinaryIO, big: bool, page_size: int, salts: bytes, sums: tuple[int, int]) -> int:
    """Frames with commits that SQLite would not replay (0: nothing lost). The end of the log is a
    short (torn) frame or one of an older generation; a complete frame of this generation whose
    checksum fails is damage, and so is every commit of this generation behind it."""
    ended, lost = False, 0
    while True:
        frame = f.read(_FRAME_HEADER + page_size)
        if len(frame) < _FRAME_HEADER + page_size:
            return lost  # a torn last frame: its transaction never returned
        ours = _ours(frame, salts)
        if ended:
            lost += ours and struct.unpack(">I", frame[4:8])[0] != 0
            continue
        if not ours:
            ended = True  # the log's end: frames of an older generation follow
            continue
        sums = _checksum(frame[:8] + frame[_FRAME_HEADER:], big, *sums)
        if frame[8:16] != salts or struct.unpack(">2I", frame[16:24]) != sums:
            ended, lost = True, lost + 1


def wal_damage(wal: Path) -> str | None:
    """Why the WAL beside a ledger would lose commits, or None (absent, empty, or sound)."""
    try:
        f = wal.open("rb")
    except FileNotFoundError:
        return None
    with f:
        head = f.read(_HEADER)
        if len(head) < _HEADER:
            return None  # no frame was ever written after this header
        parsed = _header(head)
        if parsed is None:
            rest = f.read(_FRAME_HEADER)
            return f"{wal.name}: damaged WAL header with frames behind it" if rest else None
        lost = _commits_after_break(f, *parsed)
    if lost:
        return f"{wal.name}: {lost} damaged or hidden WAL frame(s) with commits SQLite would silently drop"
    return None


__all__ = ["wal_damage"]
