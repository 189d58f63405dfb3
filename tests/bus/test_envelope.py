"""Sealing and opening envelopes: every drop reason, the replay cache, hostile bytes (pure, no broker)."""

from __future__ import annotations

import json
import uuid

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.bus.envelope import (
    MAX_DEPTH,
    Dropped,
    DropReason,
    Envelope,
    Opener,
    ReplayCache,
    seal,
)
from agent.bus.keys import Keyring

A = bytes(range(32))
NOW = 1_796_131_260.0
RING = Keyring.single("k1", A)


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def opener(clock: Clock | None = None, *, kinds=("call", "cast"), cache: ReplayCache | None = None) -> Opener:
    return Opener(
        RING,
        max_bytes=4096,
        max_clock_skew_s=30.0,
        kinds=frozenset(kinds),
        clock=clock or Clock(),
        replay_cache=cache,
    )


def make(body=None, *, kind="call", now=NOW, ttl=30.0, ring=RING, **kw) -> bytes:
    _, data = seal(
        ring,
        kind=kind,
        method="claim",
        body={"migration_id": "m1"} if body is None else body,
        version="1.1",
        sender="orch@ctl-1",
        now=now,
        ttl_s=ttl,
        **kw,
    )
    return data


def signed(doc: dict, ring: Keyring = RING) -> bytes:
    """A message as another implementation could write it: any key order, spaces, sig first."""
    doc = {k: v for k, v in doc.items() if k != "sig"}
    return json.dumps({"sig": ring.sign(doc), **doc}, indent=1).encode()


def reason(data: bytes, op: Opener | None = None) -> DropReason:
    with pytest.raises(Dropped) as exc:
        (op or opener()).open(data)
    return exc.value.reason


def test_round_trip():
    data = make({"x": ["é", 1, None]})
    env = opener().open(data)
    assert isinstance(env, Envelope)
    assert (env.v, env.kind, env.method, env.sender, env.kid) == ("1.1", "call", "claim", "orch@ctl-1", "k1")
    assert env.body == {"x": ["é", 1, None]}
    assert env.expires == NOW + 30.0 and env.ts == NOW
    uuid.UUID(env.id)
    doc = json.loads(data)
    assert RING.verify({k: v for k, v in doc.items() if k != "sig"}, "k1", doc["sig"])


def test_reply_carries_reply_to_id():
    env = opener(kinds=("reply",)).open(make(kind="reply", reply_to_id="abc"))
    assert env.reply_to_id == "abc"


def test_another_implementations_key_order_and_spacing_verify():
    doc = json.loads(make())
    assert opener().open(signed(doc)).id == doc["id"]


def test_unknown_keys_are_signed_too():
    doc = json.loads(make())
    doc["trace"] = "abc"  # added after signing: the signature no longer covers the envelope
    assert reason(json.dumps(doc).encode()) is DropReason.BAD_SIGNATURE
    assert opener().open(signed(doc)).id == doc["id"]  # signed with the extra key: fine


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"x" * 5000, DropReason.TOO_LARGE),
        (b"\xff\xfe garbage", DropReason.NOT_JSON),
        (b'{"v": "1.1",', DropReason.NOT_JSON),
        (b"", DropReason.NOT_JSON),
        (b"[1, 2]", DropReason.BAD_ENVELOPE),
        (b'"a string"', DropReason.BAD_ENVELOPE),
        (b'{"v": "1.1"}', DropReason.UNSIGNED),
        (b"[" * 1000 + b"]" * 1000, DropReason.TOO_DEEP),
    ],
)
def test_malformed_bytes(data, expected):
    assert reason(data) is expected


def test_deep_nesting_never_recurses():
    big = Opener(RING, max_bytes=1 << 20, max_clock_skew_s=30, kinds=frozenset({"call"}), clock=Clock())
    doc = json.loads(make())
    for depth in (MAX_DEPTH, 500, 100_000):
        doc["body"] = {"a": "@"}
        data = signed(doc).replace(b'"@"', b"[" * depth + b"]" * depth)
        assert reason(data, big) is DropReason.TOO_DEEP, depth
    doc["body"] = {"a": json.loads("[" * (MAX_DEPTH - 2) + "]" * (MAX_DEPTH - 2))}  # at the limit: fine
    assert big.open(signed(doc))


def test_shape_errors():
    doc = json.loads(make())
    for key, value in [("kind", "shout"), ("ts", "yesterday"), ("body", [1]), ("v", "one"), ("method", "")]:
        assert reason(signed({**doc, key: value})) is DropReason.BAD_ENVELOPE, key
    assert reason(signed({k: v for k, v in doc.items() if k != "id"})) is DropReason.BAD_ENVELOPE


def test_signature_problems():
    doc = json.loads(make())
    assert reason(json.dumps({k: v for k, v in doc.items() if k != "sig"}).encode()) is DropReason.UNSIGNED
    assert reason(json.dumps({k: v for k, v in doc.items() if k != "kid"}).encode()) is DropReason.UNSIGNED
    assert reason(signed({**doc, "kid": "k9"}, Keyring.single("k9", A))) is DropReason.UNKNOWN_KID
    assert reason(signed(doc, Keyring.single("k1", bytes(32)))) is DropReason.BAD_SIGNATURE  # forged: wrong secret
    assert reason(json.dumps({**doc, "body": {"migration_id": "m2"}}).encode()) is DropReason.BAD_SIGNATURE
    assert reason(json.dumps({**doc, "sig": "0" * 64}).encode()) is DropReason.BAD_SIGNATURE
    assert reason(json.dumps({**doc, "sig": "Z" * 64}).encode()) is DropReason.BAD_ENVELOPE


def test_fast_path_suffix_cannot_be_reused_on_other_bytes():
    data = make()
    tampered = data.replace(b'"migration_id":"m1"', b'"migration_id":"m2"')
    assert tampered != data
    assert reason(tampered) is DropReason.BAD_SIGNATURE


def test_time_rules():
    clock = Clock()
    op = opener(clock)
    assert op.open(make(now=NOW - 50, ttl=30))  # expired 20 s ago: inside the 30 s skew
    assert reason(make(now=NOW - 70, ttl=30), op) is DropReason.STALE
    assert op.open(make(now=NOW + 25))  # 25 s ahead: inside the skew
    assert reason(make(now=NOW + 31), op) is DropReason.FUTURE
    assert reason(make(ttl=-1), op) is DropReason.BAD_LIFETIME
    assert reason(make(ttl=2 * 86400), op) is DropReason.BAD_LIFETIME


def test_wrong_kind_and_replay():
    op = opener()
    assert reason(make(kind="event"), op) is DropReason.WRONG_KIND
    data = make()
    op.open(data)
    assert reason(data, op) is DropReason.REPLAYED
    assert reason(signed(json.loads(data)), op) is DropReason.REPLAYED  # same id, other bytes


def test_replay_cache_forgets_after_the_window_and_is_bounded():
    clock = Clock()
    cache = ReplayCache(max_entries=2)
    op = opener(clock, cache=cache)
    first = make(ttl=10)
    op.open(first)
    op.open(make(ttl=10))
    assert reason(make(ttl=10), op) is DropReason.REPLAY_CACHE_FULL
    clock.now += 10 + 30 + 1  # past expires + skew: the ids leave the cache
    assert len(cache) == 2
    assert reason(first, op) is DropReason.STALE  # and the old message is stale by then anyway
    assert op.open(make(now=clock.now))
    assert len(cache) == 1


def test_drop_reasons_are_strings_for_logs_and_counters():
    assert str(DropReason.BAD_SIGNATURE) == "bad_signature"
    assert Dropped(DropReason.STALE, "id x").reason is DropReason.STALE


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_ever_drop(data):
    with pytest.raises(Dropped):
        opener().open(data)


@settings(max_examples=300, deadline=None)
@given(position=st.integers(min_value=0), byte=st.integers(0, 255))
def test_any_flipped_byte_is_dropped_or_identical(position, byte):
    data = bytearray(make())
    position %= len(data)
    if data[position] == byte:
        return
    data[position] = byte
    try:
        env = opener().open(bytes(data))
    except Dropped:
        return
    # a change that survives must not change the meaning (e.g. JSON whitespace): never seen here
    raise AssertionError(f"flipped byte {position} accepted: {env}")


def test_envelope_struct_ignores_nothing_it_needs():
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"v": "1.1"}, type=Envelope)
