"""The envelope every bus message travels in (shared/formats.md, "Envelope"): sealing (sign) and
opening (size, JSON, shape, signature, time, replay checks, in that order) with no I/O.

Opening a message either returns an `Envelope` or raises `Dropped(reason)`. The order is chosen so
that cheap checks on untrusted bytes come first and that only well-signed ids enter the replay
cache (a forger cannot fill it):

    too_large -> not_json / too_deep -> bad_envelope / unsigned -> unknown_kid -> bad_signature
    -> stale / future / bad_lifetime -> wrong_kind -> replayed / replay_cache_full

The signature covers every key of the envelope as received except `sig` (extra keys included), so
it is checked against the parsed document, not against the typed `Envelope` made from it.
"""

from __future__ import annotations

import enum
import heapq
import logging
import threading
import time
import uuid
from collections import Counter
from typing import Annotated, Any, Callable, Literal

import msgspec

from agent.bus.errors import BusError
from agent.bus.keys import Keyring, canonical_json
from agent.errors import InvalidInput

MAX_DEPTH = 32  # our bodies nest about 6 deep; the stdlib encoder recurses, so bound it well below its limit
MAX_LIFETIME_S = 24 * 3600.0  # expires - ts: bounds how long an id stays in the replay cache
REPLAY_CACHE_ENTRIES = 200_000  # ~200 bytes each: 40 MB at worst; 1000 calls/s for a 60 s window is 60k

Kind = Literal["call", "cast", "reply", "event"]
_VERSION = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{1,3}\.[0-9]{1,3}$")]
_NAME = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
_ID = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
_KID = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
_SIG = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]  # ASCII only: compare_digest needs it
_TIME = Annotated[float, msgspec.Meta(ge=0, le=1e11)]  # seconds since the epoch, before year 5138


class Envelope(msgspec.Struct, frozen=True):
    """A message as the wire carries it. `method` names the call's method on calls, casts and their
    replies, and the routing key on events; `reply_to_id` is set on replies only."""

    v: _VERSION
    kind: Kind
    method: _NAME
    id: _ID
    ts: _TIME
    expires: _TIME
    sender: _NAME
    kid: _KID
    body: dict[str, Any]
    sig: _SIG
    reply_to_id: _ID | None = None


class DropReason(str, enum.Enum):
    TOO_LARGE = "too_large"
    NOT_JSON = "not_json"
    TOO_DEEP = "too_deep"
    BAD_ENVELOPE = "bad_envelope"
    UNSIGNED = "unsigned"
    UNKNOWN_KID = "unknown_kid"
    BAD_SIGNATURE = "bad_signature"
    STALE = "stale"
    FUTURE = "future"
    BAD_LIFETIME = "bad_lifetime"
    WRONG_KIND = "wrong_kind"
    REPLAYED = "replayed"
    REPLAY_CACHE_FULL = "replay_cache_full"

    def __str__(self) -> str:
        return self.value


class Dropped(BusError):
    """A message that is acked and forgotten: no reply, a log line and a count by `reason`."""

    code = "dropped"

    def __init__(self, reason: DropReason, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason


DROP_LOG_BURST = 10  # log lines per reason per window: a flood of garbage must not flood the journal
DROP_LOG_WINDOW_S = 60.0


class DropLog:
    """Counts dropped messages by reason (`counts`, thread-safe) and logs them, at most
    DROP_LOG_BURST lines per reason a minute plus one line saying how many more were dropped."""

    def __init__(self, where: str, logger: logging.Logger) -> None:
        self.where = where
        self.log = logger
        self.counts: Counter[DropReason] = Counter()
        self._lock = threading.Lock()
        self._windows: dict[DropReason, list[float]] = {}  # reason -> [window start, lines in window]

    def record(self, drop: Dropped) -> None:
        now = time.monotonic()
        with self._lock:
            self.counts[drop.reason] += 1
            window = self._windows.setdefault(drop.reason, [now, 0])
            if now - window[0] > DROP_LOG_WINDOW_S:
                if window[1] > DROP_LOG_BURST:
                    self.log.warning(
                        "bus: %s: %d more %s drops not logged", self.where, window[1] - DROP_LOG_BURST, drop.reason
                    )
                window[:] = [now, 0]
            window[1] += 1
            loud = window[1] <= DROP_LOG_BURST
        if loud:
            self.log.warning("bus: %s: dropped %s", self.where, drop)


class ReplayCache:
    """Ids seen within their window (expiry + skew), bounded in memory.

    When full of ids that are all still inside their window, a new id is refused (`check_and_add`
    returns None) rather than forgetting one that could then be replayed.
    """

    def __init__(self, max_entries: int = REPLAY_CACHE_ENTRIES) -> None:
        self.max_entries = max_entries
        self._until: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._until)

    def check_and_add(self, msg_id: str, until: float, now: float) -> bool | None:
        """True: first sight (now remembered until `until`); False: a replay; None: cache full."""
        self._prune(now)
        if msg_id in self._until:
            return False
        if len(self._until) >= self.max_entries:
            return None
        self._until[msg_id] = until
        heapq.heappush(self._heap, (until, msg_id))
        return True

    def _prune(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] < now:
            _, old = heapq.heappop(heap)
            self._until.pop(old, None)


def _depth_within(doc: Any, limit: int) -> bool:
    """True when no list/object in `doc` nests deeper than `limit` (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return False
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return True


def _parse(data: bytes, max_bytes: int) -> dict[str, Any]:
    if len(data) > max_bytes:
        raise Dropped(DropReason.TOO_LARGE, f"{len(data)} bytes > {max_bytes}")
    try:
        doc = msgspec.json.decode(data)
    except RecursionError:
        raise Dropped(DropReason.TOO_DEEP, "nesting beyond the decoder's limit") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise Dropped(DropReason.NOT_JSON, str(exc)[:200]) from None
    if not isinstance(doc, dict):
        raise Dropped(DropReason.BAD_ENVELOPE, f"a JSON object is required, not {type(doc).__name__}")
    # no walk when there are too few brackets to nest that deep (every ordinary message)
    if data.count(b"{") + data.count(b"[") > MAX_DEPTH and not _depth_within(doc, MAX_DEPTH):
        raise Dropped(DropReason.TOO_DEEP, f"nests deeper than {MAX_DEPTH}")
    return doc


def _typed(doc: dict[str, Any]) -> Envelope:
    if not isinstance(doc.get("sig"), str) or not isinstance(doc.get("kid"), str):
        raise Dropped(DropReason.UNSIGNED, "no sig or kid")
    try:
        return msgspec.convert(doc, type=Envelope)
    except msgspec.ValidationError as exc:
        raise Dropped(DropReason.BAD_ENVELOPE, str(exc)[:200]) from None


def _check_signature(doc: dict[str, Any], env: Envelope, keyring: Keyring) -> None:
    if not keyring.knows(env.kid):
        raise Dropped(DropReason.UNKNOWN_KID, f"kid {env.kid!r} from {env.sender!r}")
    unsigned = {k: v for k, v in doc.items() if k != "sig"}
    try:
        good = keyring.verify(unsigned, env.kid, env.sig)
    except (ValueError, TypeError, RecursionError):  # NaN, a huge int: nothing we could have signed
        good = False
    if not good:
        raise Dropped(DropReason.BAD_SIGNATURE, f"id {env.id} from {env.sender!r}")


def _check_time(env: Envelope, now: float, skew: float) -> None:
    if env.expires < env.ts or env.expires - env.ts > MAX_LIFETIME_S:
        raise Dropped(DropReason.BAD_LIFETIME, f"expires - ts = {env.expires - env.ts:.3f} s")
    if env.expires + skew < now:
        raise Dropped(DropReason.STALE, f"id {env.id} expired {now - env.expires:.3f} s ago")
    if env.ts - skew > now:
        raise Dropped(DropReason.FUTURE, f"id {env.id} dated {env.ts - now:.3f} s ahead")


class Opener:
    """Opens messages for one consumer: keys, limits, clock and its own replay cache."""

    def __init__(
        self,
        keyring: Keyring,
        *,
        max_bytes: int,
        max_clock_skew_s: float,
        kinds: frozenset[str],
        clock: Callable[[], float],
        replay_cache: ReplayCache | None = None,
    ) -> None:
        self.keyring = keyring
        self.max_bytes = max_bytes
        self.skew = max_clock_skew_s
        self.kinds = kinds
        self.clock = clock
        self.replays = replay_cache if replay_cache is not None else ReplayCache()

    def open(self, data: bytes) -> Envelope:
        """The verified envelope of `data`, or `Dropped` naming the first check that failed."""
        env = _decode(data, self.max_bytes)
        _verify(data, env, self.keyring)
        now = self.clock()
        _check_time(env, now, self.skew)
        if env.kind not in self.kinds:
            raise Dropped(DropReason.WRONG_KIND, f"{env.kind} where {'/'.join(sorted(self.kinds))} is expected")
        first = self.replays.check_and_add(env.id, env.expires + self.skew, now)
        if first is None:
            raise Dropped(DropReason.REPLAY_CACHE_FULL, f"{self.replays.max_entries} ids inside their window")
        if not first:
            raise Dropped(DropReason.REPLAYED, f"id {env.id} from {env.sender!r}")
        return env


def _decode(data: bytes, max_bytes: int) -> Envelope:
    """Size, JSON, shape and depth checks; a typed decode in one pass for every good message."""
    if len(data) > max_bytes:
        raise Dropped(DropReason.TOO_LARGE, f"{len(data)} bytes > {max_bytes}")
    try:
        env = msgspec.json.decode(data, type=Envelope)
    except RecursionError:
        raise Dropped(DropReason.TOO_DEEP, "nesting beyond the decoder's limit") from None
    except msgspec.ValidationError:
        _typed(_parse(data, max_bytes))  # raises the precise reason (unsigned, bad_envelope, ...)
        raise Dropped(DropReason.BAD_ENVELOPE, "does not decode as an envelope") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise Dropped(DropReason.NOT_JSON, str(exc)[:200]) from None
    # no walk when there are too few brackets to nest that deep (every ordinary message)
    if data.count(b"{") + data.count(b"[") > MAX_DEPTH and not _depth_within(env.body, MAX_DEPTH - 1):
        raise Dropped(DropReason.TOO_DEEP, f"nests deeper than {MAX_DEPTH}")
    return env


def _verify(data: bytes, env: Envelope, keyring: Keyring) -> None:
    """The signature check. Fast path: our own senders write the canonical bytes with `sig` added
    as the last member, so the signed bytes are `data` without that member and no re-encoding is
    needed (a valid HMAC over them proves they are what a key holder signed). Anything else (another
    implementation's key order or spacing) is re-canonicalised as formats.md defines."""
    if not keyring.knows(env.kid):
        raise Dropped(DropReason.UNKNOWN_KID, f"kid {env.kid!r} from {env.sender!r}")
    suffix = b',"sig":"' + env.sig.encode("ascii") + b'"}'
    if data.endswith(suffix) and keyring.verify_bytes(env.kid, data[: -len(suffix)] + b"}", env.sig):
        return
    _check_signature(_parse(data, len(data)), env, keyring)


def seal(
    keyring: Keyring,
    *,
    kind: Kind,
    method: str,
    body: dict[str, Any],
    version: str,
    sender: str,
    now: float,
    ttl_s: float,
    reply_to_id: str | None = None,
    msg_id: str | None = None,
) -> tuple[str, bytes]:
    """(id, wire bytes) of a signed envelope; `body` must be plain JSON data (dicts, lists, str,
    int, finite floats, bool, None), else InvalidInput."""
    env: dict[str, Any] = {
        "v": version,
        "kind": kind,
        "method": method,
        "id": msg_id or str(uuid.uuid4()),
        "ts": now,
        "expires": now + ttl_s,
        "sender": sender,
        "kid": keyring.signing_kid,
        "body": body,
    }
    if reply_to_id is not None:
        env["reply_to_id"] = reply_to_id
    try:
        signed = canonical_json(env)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidInput(f"the {kind} body of {method!r} is not JSON data: {exc}") from None
    sig = keyring.sign_bytes(keyring.signing_kid, signed)
    # the wire form is the signed bytes with sig as a last member (see _verify's fast path)
    return env["id"], signed[:-1] + b',"sig":"' + sig.encode("ascii") + b'"}'
