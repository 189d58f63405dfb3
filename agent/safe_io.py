"""Bounded reads of input files: the one way the agent reads a file it did not write itself.

`read_bounded` opens without blocking (a FIFO with no writer would hang a plain ``open``), checks with
``fstat`` on the open descriptor (no race with a rename) that the file is a regular file, checks its
size before reading, and then reads at most the bound plus one byte, so a file that grows while it
is read (or that lies about its size, like every sysfs file reporting 4096) is still refused:

    >>> read_bounded("/dev/zero", limit=1024, what="host file")
    Traceback (most recent call last):
    agent.safe_io.InputFileError: host file /dev/zero: not a regular file (a character device)

Every refusal is an `InputFileError` (an InvalidInput) naming the path, or the caller's own error type.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Callable

from agent.errors import AgentError, InvalidInput

__all__ = ["InputFileError", "read_bounded", "read_bounded_text", "require_regular_file"]

_CHUNK = 1 << 16  # os.read size: large enough that a 64 MiB file takes ~1000 calls

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISLNK, "a symbolic link"),
)


class InputFileError(InvalidInput):
    """An input file is missing, unreadable, not a regular file or too large (names the path)."""

    code = "input_file_error"

    def __init__(self, message: str, path: str | None = None) -> None:
        self.path = path
        super().__init__(message)


ErrorFactory = Callable[[str, str], AgentError]


def _default_error(message: str, path: str) -> AgentError:
    return InputFileError(message, path)


def _kind(mode: int) -> str:
    return next((name for is_kind, name in _KINDS if is_kind(mode)), "not a regular file")


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    left = limit
    while left > 0:
        chunk = os.read(fd, min(_CHUNK, left))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_bounded(
    path: str | Path,
    *,
    limit: int,
    what: str,
    follow_symlinks: bool = True,
    trust_size: bool = True,
    error: ErrorFactory = _default_error,
) -> bytes:
    """The bytes of the regular file `path`, at most `limit` of them; else `error(message, path)`.

    `what` names the file in messages ("host file", "config file"). `follow_symlinks=False` refuses
    a symbolic link as the last component (O_NOFOLLOW). `trust_size=False` skips the size check
    before reading, for files whose size is not their length (sysfs reports 4096, /proc 0); the
    bounded read still applies.
    """
    name = str(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise _open_error(exc, what, name, error) from None
    try:
        return _read_regular(fd, limit=limit, what=what, name=name, trust_size=trust_size, error=error)
    except OSError as exc:
        raise error(f"{what} {name}: cannot read: {exc.strerror or exc}", name) from None
    finally:
        os.close(fd)


def _open_error(exc: OSError, what: str, name: str, error: ErrorFactory) -> AgentError:
    if exc.errno == errno.ELOOP:
        return error(f"{what} {name}: is a symbolic link (refused)", name)
    return error(f"{what} {name}: cannot read: {exc.strerror or exc}", name)


def _read_regular(fd: int, *, limit: int, what: str, name: str, trust_size: bool, error: ErrorFactory) -> bytes:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {name}: not a regular file ({_kind(st.st_mode)})", name)
    if trust_size and st.st_size > limit:
        raise error(f"{what} {name}: {st.st_size} bytes, larger than {limit}", name)
    data = _read_at_most(fd, limit + 1)  # one byte more: a file that grew since fstat is refused
    if len(data) > limit:
        raise error(f"{what} {name}: larger than {limit} bytes", name)
    return data


def read_bounded_text(
    path: str | Path, *, limit: int, what: str, encoding: str = "utf-8", error: ErrorFactory = _default_error
) -> str:
    """`read_bounded`, decoded (`encoding`); undecodable bytes are the same typed error."""
    data = read_bounded(path, limit=limit, what=what, error=error)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise error(f"{what} {path}: not {encoding} text (byte {exc.start})", str(path)) from None


def require_regular_file(
    path: str | Path, *, what: str, follow_symlinks: bool = True, error: ErrorFactory = _default_error
) -> os.stat_result | None:
    """The `stat` of `path` when it is a regular file, None when it does not exist; otherwise
    `error` (a FIFO, a device, a directory, a socket; a symbolic link with `follow_symlinks=False`).

    For files another library opens itself (SQLite's ledger.db): opened without blocking and
    checked with fstat, so a FIFO named like the file is refused at once instead of hanging.
    """
    name = str(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _open_error(exc, what, name, error) from None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {name}: not a regular file ({_kind(st.st_mode)})", name)
    return st
