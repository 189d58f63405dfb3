"""Opening `<state_dir>/ledger.db`: the checks, and what happens when the file is damaged.

Writable open (the agent, and `claims release` / `accept-damage`):

1. Before SQLite sees the file: a zero-length ``ledger.db``, a missing one next to its own WAL or a
   damaged ledger kept aside (a recovery cut short), or a WAL whose damaged frames would make SQLite
   drop commits silently (`agent.claims.walcheck`) is damage - never a reason to start empty.
2. The file is checked read-only: ``PRAGMA integrity_check`` (tables *and* indexes: a stale index
   page can hide a live claim from an indexed query; ~40 ms for 20,000 claims), the schema version
   and the schema itself (columns, types, indexes); then, upgraded, the rows (`salvage.check_rows`:
   every claim's checksum, live claims and damage records in full, every row in full after an upgrade).
3. Damage found in 1 or 2: what is readable is salvaged (`agent.claims.salvage`), the damaged files
   are renamed to ``ledger.db.corrupt-<UTC time>`` (never deleted), and a new ledger holding the
   salvaged claims and a `DamageRecord` is built beside and renamed into place. From then on new
   claims are refused (`LedgerDamaged`) until the hold ends or an operator accepts the damage (see
   `agent.claims.damage`); salvaged claims keep holding what they held and move as usual.
   ``on_corrupt``: "salvage" does this at once; "raise" (the default) moves a file damaged in place
   aside and raises `LedgerCorrupt`, and the next open salvages from the file kept aside; "recreate"
   carries nothing over (but records the damage and holds all the same).
   Nothing is moved while another process has the ledger open for writing (``ledger.db.use``,
   `UseLock`): a running agent would go on writing to the renamed file. Processes opening the
   ledger take turns (``ledger.db.lock``), so two never create or salvage it at once.

A new ledger is built the same way (complete, then renamed), so ``ledger.db`` is never half-made.

Read-only open (commands that only look): nothing is created, upgraded, moved or salvaged; SQLite
``mode=ro``, or ``immutable=1`` when the directory cannot be written and no WAL holds commits (the
WAL's index needs a writable directory; with an empty or absent WAL the main file is the whole
ledger, so ignoring the WAL loses nothing). Damage is reported (`LedgerCorrupt`, ``moved_to=None``).
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import stat
import time
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from agent.claims import store
from agent.claims.damage import DamageRecord
from agent.claims.errors import (
    LedgerAccessDenied,
    LedgerBusy,
    LedgerCorrupt,
    LedgerError,
    LedgerSchemaTooNew,
)
from agent.claims.salvage import Salvage, build_ledger, check_rows, salvage
from agent.claims.store import LEDGER_FILE, SCHEMA_VERSION, ClaimStore, is_busy, is_corruption
from agent.claims.walcheck import wal_damage

log = logging.getLogger("compute_agent.claims")

_DETAIL_MAX = 2000  # characters of a check report kept in a damage record


@dataclass(frozen=True, slots=True)
class Opened:
    """What `open_store` found besides the store itself."""

    store: ClaimStore
    recovered_from_corrupt: Path | None = None  # a damaged ledger kept aside, salvaged into this one
    corrupt_files: tuple[Path, ...] = ()


@dataclass(frozen=True, slots=True)
class _Finding:
    """Damage found before or at open: what, where to salvage from, and is it `path` itself."""

    detail: str
    source: Path | None
    in_place: bool


class _Damaged(Exception):
    """Internal: the file in place is damaged (becomes a _Finding)."""


# --- small file helpers -----------------------------------------------------------------------------


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:
        return None
    except PermissionError:
        raise LedgerAccessDenied(path, "cannot look at the ledger file") from None
    except OSError as exc:
        raise LedgerError(f"{path}: cannot look at the claim ledger: {exc}") from None


def _side(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def corrupt_files(state_dir: Path, *, quiet: bool = False) -> tuple[Path, ...]:
    """Every damaged ledger kept aside in the state directory (not their -wal/-shm)."""
    try:
        found = sorted(state_dir.glob(LEDGER_FILE + ".corrupt-*"), key=lambda p: (p.stat().st_mtime, p.name))
    except OSError:
        return ()
    kept = tuple(p for p in found if not p.name.endswith(("-wal", "-shm")))
    if kept and not quiet:
        log.warning(
            "claim ledger: %d damaged ledger file(s) kept aside in %s: %s",
            len(kept),
            state_dir,
            ", ".join(p.name for p in kept),
        )
    return kept


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def move_aside(path: Path) -> Path | None:
    """Rename the ledger and its -wal/-shm to ``ledger.db.corrupt-<UTC time>[.n]``; returns the new
    name of the ledger itself (None if only side files were there)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.corrupt-{stamp}.{n}")
        n += 1
    moved: Path | None = None
    try:
        if path.exists():
            os.replace(path, target)
            moved = target
        for suffix in ("-wal", "-shm"):
            if _side(path, suffix).exists():
                os.replace(_side(path, suffix), _side(target, suffix))
        fsync_dir(path.parent)
    except OSError as exc:
        raise LedgerCorrupt(path, f"could not move the damaged ledger aside: {exc}", None) from None
    return moved


def _lock_file(state_dir: Path, suffix: str) -> int:
    try:
        return os.open(state_dir / (LEDGER_FILE + suffix), os.O_RDWR | os.O_CREAT, 0o600)
    except PermissionError:
        raise LedgerAccessDenied(state_dir, "cannot create the ledger's lock file") from None
    except OSError as exc:
        raise LedgerError(f"{state_dir}: cannot lock the claim ledger: {exc}") from None


@contextmanager
def _opening_lock(state_dir: Path) -> Iterator[None]:
    """``ledger.db.lock``: processes opening the ledger for writing take turns (two must not
    create or salvage it at once); held only while opening."""
    fd = _lock_file(state_dir, ".lock")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class UseLock:
    """``ledger.db.use``: every process with the ledger open for writing holds it shared for as
    long as it is open; moving a damaged ledger aside needs it exclusive. So a damaged ledger is
    never renamed under a running agent (which would go on writing to the renamed file)."""

    def __init__(self, state_dir: Path) -> None:
        self.fd: int | None = _lock_file(state_dir, ".use")
        fcntl.flock(self.fd, fcntl.LOCK_SH)

    def alone(self) -> bool:
        """Take the lock exclusive (then back to shared by `shared`) if no other process holds it."""
        assert self.fd is not None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fcntl.flock(self.fd, fcntl.LOCK_SH)  # a failed conversion may have dropped it
            return False
        return True

    def shared(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_SH)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# --- checks --------------------------------------------------------------------------------------------


_WAL_LOOKS = 3  # a WAL being written while it is read can look damaged: believe a finding it keeps
_WAL_PAUSE_S = 0.05


def _wal_version(wal: Path) -> tuple[int, int] | None:
    st = _stat(wal)
    return None if st is None else (st.st_size, st.st_mtime_ns)


def _settled_wal_damage(wal: Path) -> str | None:
    """`wal_damage`, believed only when the WAL did not change while it was read (another process,
    the agent, may be writing it: a reset racing the read can look like hidden commits)."""
    for _ in range(_WAL_LOOKS):
        before = _wal_version(wal)
        found = wal_damage(wal)
        if found is None or _wal_version(wal) == before:
            return found
        time.sleep(_WAL_PAUSE_S)
    return None  # still being written: it is in use, so a writer is replaying it


def _finding_before_open(path: Path) -> _Finding | None:
    """Damage visible without SQLite: an empty ledger.db, or a missing one with leftovers."""
    st = _stat(path)
    if st is not None:
        if not stat.S_ISREG(st.st_mode):
            raise LedgerError(f"{path}: the claim ledger is not a regular file; not touching it")
        if st.st_size == 0:
            return _Finding("ledger.db is empty (zero length)", path, True)
        wal = _settled_wal_damage(_side(path, "-wal"))
        return None if wal is None else _Finding(wal, path, True)
    kept = corrupt_files(path.parent, quiet=True)
    leftovers = [p.name for p in (_side(path, "-wal"), _side(path, "-shm")) if p.exists()]
    if not kept and not leftovers:
        return None  # a first start
    what = f"ledger.db is missing but {', '.join(leftovers) or 'a damaged ledger kept aside'} is there"
    return _Finding(what, kept[-1] if kept else None, False)


def _check_report(conn: sqlite3.Connection) -> None:
    """Raise sqlite3.DatabaseError unless ``integrity_check`` (indexes included) says ok."""
    check = [str(r[0]) for r in conn.execute("PRAGMA integrity_check(20)").fetchall()]
    if check != ["ok"]:
        raise sqlite3.DatabaseError("integrity_check: " + "; ".join(check[:5])[:_DETAIL_MAX])


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def schema_of(conn: sqlite3.Connection) -> tuple[tuple[object, ...], ...]:
    """Tables (columns: name, type, not null, default, primary key) and indexes (table, columns)
    as SQLite understands them - not the CREATE text, which differs in whitespace between files."""
    out: list[tuple[object, ...]] = []
    rows = conn.execute("SELECT type, name, tbl_name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY name")
    for kind, name, table in rows.fetchall():
        if kind == "table":
            cols = conn.execute(f"PRAGMA table_xinfo({_quoted(name)})").fetchall()
            out.append((kind, name, tuple(tuple(c[1:]) for c in cols)))
        elif kind == "index":
            cols = conn.execute(f"PRAGMA index_info({_quoted(name)})").fetchall()
            out.append((kind, name, table, tuple(c[2] for c in cols)))
    return tuple(out)


_EXPECTED: list[tuple[tuple[object, ...], ...]] = []  # the schema MIGRATIONS build, computed once


def _expected_schema() -> tuple[tuple[object, ...], ...]:
    if not _EXPECTED:
        conn = store.prepare(sqlite3.connect(":memory:", isolation_level=None))
        for step in store.MIGRATIONS:
            for stmt in step:
                conn.execute(stmt)
        _EXPECTED.append(schema_of(conn))
        conn.close()
    return _EXPECTED[0]


def check_schema(conn: sqlite3.Connection) -> None:
    """Raise sqlite3.DatabaseError if a current ledger's schema is not the one MIGRATIONS build
    (damaged schema text can rename a column and still pass integrity_check)."""
    found, expected = schema_of(conn), _expected_schema()
    if found != expected:
        pairs = zip(found, expected, strict=False)
        diff = next((f"{a} != {b}" for a, b in pairs if a != b), "objects missing or extra")
        raise sqlite3.DatabaseError(f"schema differs from this agent's: {diff}"[:_DETAIL_MAX])


def _checked(conn: sqlite3.Connection, path: Path) -> int:
    """Integrity and schema version of an open read-only connection; returns the version."""
    with store.decoded_errors():
        return _checked_decoded(conn, path)


def _checked_decoded(conn: sqlite3.Connection, path: Path) -> int:
    conn.execute("PRAGMA query_only=ON")
    _check_report(conn)
    version = store.user_version(conn)
    if version > SCHEMA_VERSION:
        raise LedgerSchemaTooNew(path, version, SCHEMA_VERSION)
    if version == 0:
        objects = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if objects:
            raise sqlite3.DatabaseError(f"schema version 0 but {objects} schema objects: not a claim ledger")
    if version == SCHEMA_VERSION:
        check_schema(conn)
    return version


def _ro_uri(path: Path) -> str:
    uri = "file:" + urllib.parse.quote(str(path.resolve())) + "?mode=ro"
    wal = _stat(_side(path, "-wal"))
    if not os.access(path.parent, os.W_OK) and (wal is None or wal.st_size == 0):
        uri += "&immutable=1"  # no WAL to read, none can appear: the file alone is the ledger
    return uri


def _open_ro(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    for part in (path, _side(path, "-wal"), _side(path, "-shm")):
        if (part is path or part.exists()) and not os.access(part, os.R_OK):
            raise LedgerAccessDenied(part, "cannot read the ledger file")
    try:
        conn = sqlite3.connect(
            _ro_uri(path), uri=True, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as exc:
        raise LedgerError(f"{path}: cannot open the claim ledger read-only: {exc}") from None
    return store.prepare(conn)


def _sqlite_failure(path: Path, exc: sqlite3.Error, doing: str) -> LedgerError:
    if is_busy(exc):
        return LedgerBusy(path, 0)
    if "unable to open" in str(exc).lower() or "readonly" in str(exc).lower():
        return LedgerError(
            f"{path}: cannot {doing} the claim ledger ({exc}); on a read-only mount the ledger can be read "
            "only when its WAL is empty or its -shm file is there (stop the agent cleanly first)"
        )
    return LedgerError(f"{path}: cannot {doing} the claim ledger: {exc}")


def connect_readonly(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    """A connection for operator commands that only look: nothing created, upgraded or moved
    aside. A damaged ledger raises LedgerCorrupt with ``moved_to=None``, an older one LedgerError."""
    finding = _finding_before_open(path)
    if finding is not None:
        raise LedgerCorrupt(path, f"{finding.detail}; the agent salvages it when it next opens the ledger", None)
    if _stat(path) is None:
        raise LedgerError(f"{path}: no ledger here")
    conn = _open_ro(path, busy_timeout_s)
    try:
        version = _checked(conn, path)
    except sqlite3.Error as exc:
        conn.close()
        if isinstance(exc, sqlite3.DatabaseError) and is_corruption(exc):
            err = LedgerCorrupt(path, str(exc), None)
            log.error("claim ledger corrupt (opened read-only, left in place): %s", err)
            raise err from None
        raise _sqlite_failure(path, exc, "read") from None
    except BaseException:
        conn.close()
        raise
    if version < SCHEMA_VERSION:
        conn.close()
        raise LedgerError(
            f"{path}: ledger schema version {version} is older than this agent's ({SCHEMA_VERSION}); "
            "a read-only open does not upgrade it (the agent does when it starts)"
        )
    return conn


# --- the writable open -----------------------------------------------------------------------------------


def _configure(conn: sqlite3.Connection, path: Path) -> None:
    """WAL, synchronous=FULL, foreign keys, and the schema upgraded to SCHEMA_VERSION."""
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise LedgerError(f"{path}: cannot switch the ledger to WAL mode (got {mode})")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    store.migrate(conn, path)


def _verify_rows(conn: sqlite3.Connection, *, full: bool) -> None:
    """The schema, rows' checksums and columns, live placements (see salvage.check_rows): raise
    _Damaged naming bad rows."""
    check_schema(conn)  # an upgraded ledger too
    bad = check_rows(conn, full=full)
    if bad:
        raise _Damaged(f"{len(bad)} damaged row(s): " + "; ".join(map(str, bad[:5])))


def damage_in_open_ledger(conn: sqlite3.Connection) -> str | None:
    """The open-time checks again, on a ledger in use (`Ledger.verify`): what is wrong, or None."""
    try:
        with store.decoded_errors():
            _check_report(conn)
            check_schema(conn)
            bad = check_rows(conn, full=False)
    except sqlite3.DatabaseError as exc:
        if not is_corruption(exc):
            raise
        return str(exc)[:_DETAIL_MAX]
    return f"{len(bad)} damaged row(s): " + "; ".join(map(str, bad[:5])) if bad else None


def _precheck(path: Path, busy_timeout_s: float) -> int:
    conn = _open_ro(path, busy_timeout_s)
    try:
        return _checked(conn, path)
    finally:
        conn.close()


def _connect_verified(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    """The writable connection to an existing file, fully checked. Raises _Damaged for damage."""
    try:
        version = _precheck(path, busy_timeout_s)
        conn = store.prepare(
            sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
        )
    except sqlite3.Error as exc:
        if isinstance(exc, sqlite3.DatabaseError) and is_corruption(exc):
            raise _Damaged(str(exc)[:_DETAIL_MAX]) from None
        raise _sqlite_failure(path, exc, "open") from None
    try:
        with store.decoded_errors():
            _configure(conn, path)
            _verify_rows(conn, full=version < SCHEMA_VERSION)
    except sqlite3.Error as exc:
        conn.close()
        if isinstance(exc, sqlite3.DatabaseError) and is_corruption(exc):
            raise _Damaged(str(exc)[:_DETAIL_MAX]) from None
        raise _sqlite_failure(path, exc, "open") from None
    except BaseException:
        conn.close()
        raise
    return conn


def _migrate_new(conn: sqlite3.Connection, path: Path) -> None:
    store.prepare(conn)
    store.migrate(conn, path)


def _install(path: Path, found: Salvage, record: DamageRecord | None) -> None:
    """Build a complete ledger beside `path` and rename it into place."""
    tmp = _side(path, ".rebuild")
    try:
        build_ledger(tmp, _migrate_new, found, record)
        os.replace(tmp, path)
    except (OSError, sqlite3.Error) as exc:
        raise LedgerError(f"{path}: cannot write a new claim ledger: {exc}") from None
    fsync_dir(path.parent)


def _recover(path: Path, finding: _Finding, on_corrupt: str, now: float, hold_s: float, lock: UseLock) -> Path | None:
    """Salvage, keep the damaged files aside, install the salvaged ledger with its damage record."""
    if not lock.alone():
        raise LedgerCorrupt(
            path,
            f"{finding.detail}; another process (the agent?) has the ledger open: it is left in place, "
            "and salvaged when that process reopens it",
            None,
        )
    try:
        return _recover_alone(path, finding, on_corrupt, now, hold_s)
    finally:
        lock.shared()


def _recover_alone(path: Path, finding: _Finding, on_corrupt: str, now: float, hold_s: float) -> Path | None:
    if finding.in_place and on_corrupt == "raise":
        moved = move_aside(path)
        err = LedgerCorrupt(path, finding.detail, moved)
        log.error("claim ledger damaged: %s; the next open salvages it", err)
        raise err
    found = salvage(finding.source) if on_corrupt != "recreate" else Salvage(opened=False)
    moved = move_aside(path)
    kept = moved if finding.in_place else finding.source
    record = DamageRecord(
        found_at=now,
        detail=f"{finding.detail}; {found.summary()}"[:_DETAIL_MAX],
        moved_to=str(kept) if kept is not None else None,
        salvaged=len(found.claims),
        live_salvaged=found.live_claims,
        unreadable=len(found.bad) + found.failed_seeks,
        hold_until=now + hold_s,
    )
    _install(path, found, record)
    log.error(
        "claim ledger %s was DAMAGED (%s); damaged file kept at %s; %s; NEW CLAIMS REFUSED until %s "
        "(claims lost with the damage may still hold resources) or `compute-agent claims accept-damage`",
        path,
        finding.detail,
        kept,
        found.summary(),
        time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(record.hold_until)),
    )
    return kept


def _open_writable(
    path: Path, busy_timeout_s: float, on_corrupt: str, now: Callable[[], float], hold_s: float, lock: UseLock
) -> tuple[sqlite3.Connection, Path | None]:
    finding = _finding_before_open(path)
    if finding is None:
        if _stat(path) is None:
            _install(path, Salvage(), None)
        try:
            return _connect_verified(path, busy_timeout_s), None
        except _Damaged as exc:
            finding = _Finding(str(exc), path, True)
    kept = _recover(path, finding, on_corrupt, now(), hold_s, lock)
    try:
        return _connect_verified(path, busy_timeout_s), kept
    except _Damaged as exc:  # the ledger just built is damaged: the disk itself is failing
        raise LedgerCorrupt(path, f"the salvaged ledger fails its checks too: {exc}", None) from None


def _make_dir(state_dir: Path) -> None:
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except PermissionError:
        raise LedgerAccessDenied(state_dir, "cannot create the state directory") from None
    except OSError as exc:
        raise LedgerError(f"{state_dir}: cannot create the state directory: {exc}") from None


def open_store(
    state_dir: Path,
    *,
    busy_timeout_s: float,
    on_corrupt: str,
    create: bool,
    readonly: bool,
    clock: Callable[[], float] = time.time,
    hold_s: float = 7200.0,
) -> Opened:
    """Open `<state_dir>/ledger.db` (see `Ledger.open` for what each option does)."""
    path = state_dir / LEDGER_FILE
    if readonly:
        with store.file_lock(path):
            return Opened(ClaimStore(connect_readonly(path, busy_timeout_s), path, readonly=True))
    if not create and _stat(path) is None and _finding_before_open(path) is None:
        raise LedgerError(f"{path}: no ledger here")
    _make_dir(state_dir)
    with store.file_lock(path), _opening_lock(state_dir):
        lock = UseLock(state_dir)
        try:
            conn, recovered = _open_writable(path, busy_timeout_s, on_corrupt, clock, hold_s, lock)
        except BaseException:
            lock.close()
            raise
        led = ClaimStore(conn, path, busy_timeout_s=busy_timeout_s, on_close=lock.close)
        return Opened(led, recovered, corrupt_files(state_dir))


__all__ = [
    "Opened",
    "connect_readonly",
    "corrupt_files",
    "damage_in_open_ledger",
    "fsync_dir",
    "move_aside",
    "open_store",
]
