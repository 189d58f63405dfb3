"""Sealing and opening envelopes: every drop reason, the replay cache, hostile bytes (pure, no broker)."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import uuid
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.bus.envelope import (
    DROP_LOG_BURST,
    MAX_DEPTH,
    DropLog,
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
    original = make()
    data = bytearray(original)
    position %= len(data)
    if data[position] == byte:
        return
    data[position] = byte
    try:
        env = opener().open(bytes(data))
    except Dropped:
        return
    # only a change of spelling survives, never of meaning: "1796131260.0" -> "1796131260e0"
    # (the signature covers the canonical re-encoding, as formats.md defines it)
    assert env == opener().open(original)


def test_envelope_struct_ignores_nothing_it_needs():
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"v": "1.1"}, type=Envelope)


# --- the examples of docs/protocol.md ---------------------------------------------------------------

DOC_KEY = Keyring.single("k2026a", bytes(range(32)))  # the documented example key: 000102...1f
DOC_TS = 1796131260.25
DOC_INSTANCE = {
    "uuid": "8d5b0c1e-5f2a-4c4e-9f51-7f2d1c0e9a10",
    "vcpus": 2,
    "memory_mb": 2048,
    "extra_specs": {"hw:cpu_policy": "dedicated", "hw:mem_page_size": "2048"},
    "image_properties": {},
}
DOC_PLACEMENT = {
    "fits": True,
    "cells": [
        {
            "guest_cell": 0,
            "host_cell": 1,
            "vcpus": [0, 1],
            "cpu_pins": {"0": [21], "1": [22]},
            "memory_mb": 2048,
            "pagesize_kb": 2048,
            "dedicated_vcpus": [0, 1],
            "reserved_cpus": [],
        }
    ],
    "emulator_pins": [21, 22],
    "emulator_isolated": False,
    "reason": None,
}


def protocol_examples() -> dict[str, bytes]:
    """The call, reply and event shown byte for byte in docs/protocol.md (fixed key, ids, clock)."""
    _, call = seal(
        DOC_KEY,
        kind="call",
        method="claim",
        body={"migration_id": "mig-0001", "instance": DOC_INSTANCE, "source_host": "hv-01", "ttl_s": 300},
        version="1.1",
        sender="orchestrator@ctl-1",
        now=DOC_TS,
        ttl_s=30.0,
        msg_id="3f0c5a8e-2b7d-4c1a-9e6f-0d4b8a7c6e21",
    )
    _, reply = seal(
        DOC_KEY,
        kind="reply",
        method="claim",
        body={"ok": True, "result": {"placement": DOC_PLACEMENT, "expires_at": DOC_TS + 300.5}},
        version="1.1",
        sender="hv-02",
        now=DOC_TS + 0.5,
        ttl_s=29.5,
        msg_id="9a1d7e42-6c3b-4f08-8d25-b7e0c4a9f613",
        reply_to_id="3f0c5a8e-2b7d-4c1a-9e6f-0d4b8a7c6e21",
    )
    progress = {
        "migration_id": "mig-0001",
        "instance": "8d5b0c1e-5f2a-4c4e-9f51-7f2d1c0e9a10",
        "source": "hv-01",
        "destination": "hv-02",
        "phase": "precopy",
        "percent": 42.5,
        "eta_s": 12.0,
        "memory_total": 2147483648,
        "memory_remaining": 1234567168,
        "dirty_rate_bps": 10485760,
        "bandwidth_bps": 104857600,
        "iteration": 2,
        "throttle_pct": 0,
        "max_downtime_ms": 50,
        "ts": DOC_TS + 10,
    }
    _, event = seal(
        DOC_KEY,
        kind="event",
        method="migration.mig-0001.progress",
        body=progress,
        version="1.1",
        sender="hv-01",
        now=DOC_TS + 10,
        ttl_s=600.0,
        msg_id="c2e8b5d1-7a4f-4e96-b3c0-5f1d9a2e8b74",
    )
    return {"call": call, "reply": reply, "event": event}


def documented(name: str) -> bytes:
    text = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text(encoding="utf-8")
    marker = f"<!-- wire:{name} -->\n```text\n"
    start = text.index(marker) + len(marker)
    return text[start : text.index("\n```", start)].encode("utf-8")


@pytest.mark.parametrize("name", ["call", "reply", "event"])
def test_the_documented_examples_are_true(name):
    example = protocol_examples()[name]
    assert documented(name) == example  # the page shows exactly what our code sends
    op = Opener(DOC_KEY, max_bytes=1 << 20, max_clock_skew_s=30, kinds=frozenset({name}), clock=Clock(DOC_TS + 1))
    env = op.open(example)
    assert env.kind == name
    doc = json.loads(example)
    secret = bytes.fromhex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
    canonical = json.dumps(
        {k: v for k, v in doc.items() if k != "sig"}, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    assert hmac.new(secret, canonical.encode("utf-8"), hashlib.sha256).hexdigest() == doc["sig"]


def test_drop_log_counts_everything_and_logs_a_bounded_number(caplog):
    drop_log = DropLog("test", logging.getLogger("test.droplog"))
    with caplog.at_level(logging.WARNING, logger="test.droplog"):
        for i in range(DROP_LOG_BURST * 5):
            drop_log.record(Dropped(DropReason.NOT_JSON, f"#{i}"))
        drop_log.record(Dropped(DropReason.STALE, "other reason"))
    assert drop_log.counts == {DropReason.NOT_JSON: DROP_LOG_BURST * 5, DropReason.STALE: 1}
    assert len(caplog.records) == DROP_LOG_BURST + 1
