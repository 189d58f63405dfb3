"""Is a commit hidden in the ledger's WAL behind a damaged frame?

SQLite replays the write-ahead log up to the first frame whose checksum chain breaks and silently
ignores everything after it: right for a torn last write (that transaction never returned), but a
flipped bit in an *earlier* frame drops every later commit, acknowledged ones included, and the
ledger opens "fine" without claims it held. So before SQLite sees the WAL, its frames are walked
(https://sqlite.org/fileformat2.html#walformat, https://sqlite.org/walformat.html) and it is damage:

* a commit frame of the current WAL generation (a salt matches the header) *behind* the break;
* fewer frames replayable than the WAL index (``-shm``, left by the last writer, same salts) says
  were committed: the index is updated only after the commit's frames were written and synced, so
  it catches a damaged frame in the last transaction itself;
* a damaged WAL header with frames behind it (SQLite would ignore the whole log).

Not damage: the frames of a transaction a crash cut short (SQLite writes a frame's header before its
page, and a reused WAL still holds old pages there, so such a frame fails its checksum; it is the last
frame of this generation and the index does not count it).

What this cannot see: whole frames missing from the end of the WAL (a lost write looks exactly like
commits that never happened), and a damaged frame in the last transaction when the ``-shm`` is gone
(after a reboot) or damaged too.
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

_HEADER = 32
_FRAME_HEADER = 24
_MAGIC = (0x377F0682, 0x377F0683)  # checksum words little-endian / big-endian
_MAX_PAGE = 65536
_SHM_HEADER = 48  # one copy of the WAL index header; two copies lead the -shm file


@dataclass(frozen=True, slots=True)
class _Walk:
    replayable: int  # frames SQLite replays: up to the last valid commit before the break
    hidden_commits: int  # commit frames of this generation behind the break


def _checksum(data: bytes, big_endian: bool, s0: int, s1: int) -> tuple[int, int]:
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[i + 1] + s0) & 0xFFFFFFFF
    return s0, s1


def _header(head: bytes) -> tuple[bool, int, bytes, tuple[int, int]] | None:
    """(big-endian checksums, page size, salts, header checksum) of a valid header, else None."""
    magic, _version, page_size, _seq, _salt1, _salt2, c1, c2 = struct.unpack(">8I", head)
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


def _walk(f: BinaryIO, big: bool, page_size: int, salts: bytes, sums: tuple[int, int]) -> _Walk:
    n, replayable, hidden, ended = 0, 0, 0, False
    while True:
        frame = f.read(_FRAME_HEADER + page_size)
        if len(frame) < _FRAME_HEADER + page_size:
            return _Walk(replayable, hidden)
        n += 1
        commit = struct.unpack(">I", frame[4:8])[0] != 0
        if ended:
            hidden += _ours(frame, salts) and commit
            continue
        sums = _checksum(frame[:8] + frame[_FRAME_HEADER:], big, *sums)
        if frame[8:16] != salts or struct.unpack(">2I", frame[16:24]) != sums:
            ended = True  # the end of what SQLite replays
        elif commit:
            replayable = n


def _committed_by_index(shm: Path, salts: bytes) -> int | None:
    """Frames the WAL index says were committed, when it is intact and of this WAL generation."""
    try:
        with shm.open("rb") as f:
            data = f.read(2 * _SHM_HEADER)
    except OSError:
        return None
    if len(data) < 2 * _SHM_HEADER or data[:_SHM_HEADER] != data[_SHM_HEADER:] or not data[12]:
        return None  # absent, being written, or never initialised
    if data[32:40] != salts:
        return None  # another WAL generation
    return int.from_bytes(data[16:20], sys.byteorder)


def wal_damage(wal: Path) -> str | None:
    """Why the WAL beside a ledger would lose commits, or None (absent, empty, or sound)."""
    shm = wal.with_name(wal.name[: -len("-wal")] + "-shm")
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
            return f"{wal.name}: damaged WAL header with frames behind it" if f.read(_FRAME_HEADER) else None
        committed = _committed_by_index(shm, parsed[2])  # read before the frames: it never runs ahead
        walk = _walk(f, *parsed)
    if walk.hidden_commits:
        return f"{wal.name}: a damaged frame hides {walk.hidden_commits} later commit(s) SQLite would drop"
    if committed is not None and walk.replayable < committed:
        return f"{wal.name}: {committed - walk.replayable} committed frame(s) damaged (SQLite would drop them)"
    return None


__all__ = ["wal_damage"]
