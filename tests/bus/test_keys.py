"""Key file parsing, canonical JSON and HMAC signatures (pure, no broker)."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.bus.errors import KeyFileError
from agent.bus.keys import MIN_SECRET_BYTES, Keyring, canonical_json
from agent.config import BusConfig, load_config
from agent.errors import ConfigError

A = bytes(range(32))
B = bytes(range(100, 148))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


def test_first_line_signs_every_line_verifies(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# rotation in progress\n\nk2026b {B.hex()}  # new\nk2026a {A.hex()}\n")
    ring = Keyring.from_file(path)
    assert ring.signing_kid == "k2026b"
    assert set(ring.secrets) == {"k2026a", "k2026b"}
    old = Keyring.single("k2026a", A)
    env = {"v": "1.0", "body": {}}
    assert ring.verify(env, "k2026a", old.sign(env))  # still verifies what the old key signed
    assert ring.verify(env, "k2026b", ring.sign(env))
    assert not old.verify(env, "k2026b", ring.sign(env))  # the old ring does not know the new key


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (f"k1 {A.hex()} extra\n", ":1: want '<kid> <hex secret>', got 3 fields"),
        (f"\n\nk1\n{A.hex()}\n", ":3: want '<kid> <hex secret>', got 1 fields"),
        (f"k/1 {A.hex()}\n", ":1: kid must be"),
        ("k1 " + "zz" * 32 + "\n", ":1: secret of kid 'k1' is not hex"),
        ("k1 " + A.hex()[:-1] + "\n", ":1: secret of kid 'k1' is not hex"),
        ("k1 " + A.hex()[:-2] + "\n", f":1: secret of kid 'k1' has 31 bytes, need >= {MIN_SECRET_BYTES}"),
        (f"k1 {A.hex()}\nk1 {B.hex()}\n", ":2: kid 'k1' appears twice"),
        ("# only a comment\n\n", "no key"),
    ],
)
def test_bad_key_files_name_the_line(tmp_path, text, needle):
    path = tmp_path / "keys"
    path.write_text(text)
    with pytest.raises(KeyFileError) as exc:
        Keyring.from_file(path)
    assert str(path) in str(exc.value)
    assert needle in str(exc.value)


def test_unreadable_key_files(tmp_path):
    with pytest.raises(KeyFileError, match="cannot read"):
        Keyring.from_file(tmp_path / "missing")
    (tmp_path / "bin").write_bytes(b"k1 \xff\xfe\n")
    with pytest.raises(KeyFileError, match="not UTF-8"):
        Keyring.from_file(tmp_path / "bin")
    (tmp_path / "big").write_text("#" * 70_000)
    with pytest.raises(KeyFileError, match="larger than"):
        Keyring.from_file(tmp_path / "big")


def test_canonical_json_is_the_formats_md_definition():
    env = {"v": "1.1", "body": {"b": [1, 2.5, None], "a": "é\u2028\n"}, "ts": 1e16, "kind": "call"}
    expected = json.dumps(env, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert canonical_json(env) == expected
    assert (
        canonical_json(env)
        == '{"body":{"a":"é\u2028\\n","b":[1,2.5,null]},"kind":"call","ts":1e+16,"v":"1.1"}'.encode()
    )
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


def test_signature_is_lowercase_hex_hmac_sha256():
    ring = Keyring.single("k1", A)
    env = {"id": "x", "body": {"n": 1}}
    sig = ring.sign(env)
    assert sig == hmac.new(A, b'{"body":{"n":1},"id":"x"}', hashlib.sha256).hexdigest()
    assert sig == sig.lower() and len(sig) == 64


def test_verify_refuses_without_raising():
    ring = Keyring.single("k1", A)
    env = {"id": "x"}
    sig = ring.sign(env)
    assert not ring.verify({"id": "y"}, "k1", sig)
    assert not ring.verify(env, "k2", sig)
    assert not ring.verify(env, "k1", sig.upper())
    assert not ring.verify(env, "k1", "é" * 64)  # compare_digest would raise TypeError on non-ASCII
    assert not ring.verify_bytes("k1", b"{}", "")


@settings(max_examples=200, deadline=None)
@given(body=st.dictionaries(st.text(max_size=8), json_values, max_size=5), key=st.text(min_size=1, max_size=8))
def test_any_change_breaks_the_signature(body, key):
    ring = Keyring.single("k1", A)
    env = {"v": "1.0", "body": body}
    sig = ring.sign(env)
    assert ring.verify(json.loads(json.dumps(env)), "k1", sig)  # survives a JSON round trip
    changed = {"v": "1.0", "body": {**body, key: "changed" if body.get(key) != "changed" else "other"}}
    assert not ring.verify(changed, "k1", sig)


# --- the [bus] section of the config file (agent/config.py) -------------------------------------------


def test_bus_section_defaults_and_values():
    assert load_config(text="").bus == BusConfig()
    assert BusConfig().heartbeat_s == 30 and BusConfig().max_message_bytes == 1 << 20
    cfg = load_config(
        text="[bus]\n"
        "transport_url = amqp://u:p@h1:5672//; amqps://u:p@h2:5671/vh\n"
        "exchange_prefix = test.prefix-1\n"
        "key_file = /etc/keys\n"
        "heartbeat_s = 10\n"
        "quorum_queues = true\n"
        "ssl = true\n"
        "ssl_ca_file = /etc/ca.pem\n"
        "ssl_cert_file = /etc/c.pem\n"
        "ssl_key_file = /etc/c.key\n"
    ).bus
    assert cfg.urls == ("amqp://u:p@h1:5672//", "amqps://u:p@h2:5671/vh")
    assert (cfg.exchange_prefix, str(cfg.key_file), cfg.heartbeat_s, cfg.quorum_queues) == (
        "test.prefix-1",
        "/etc/keys",
        10,
        True,
    )


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("heartbeat_s = 0", "[bus] heartbeat_s = '0'"),
        ("transport_url = http://x", "[bus] transport_url = <hidden>: URL 1 is not amqp://"),
        ("transport_url = amqp://u:secret@h//;;ftp://x", "URL 2 is not"),
        ("exchange_prefix = a b", "[bus] exchange_prefix"),
        ("key_file = relative/keys", "[bus] key_file"),
        ("max_message_bytes = 10", "[bus] max_message_bytes"),
        ("prefetch_count = 70000", "[bus] prefetch_count"),
        ("quorum_queues = maybe", "[bus] quorum_queues"),
        ("ssl = true", "[bus] ssl_ca_file: required when ssl = true"),
        ("ssl_cert_file = /c.pem", "[bus] ssl_cert_file and ssl_key_file: give both or neither"),
        ("colour = blue", "[bus] colour: unknown option"),
    ],
)
def test_bad_bus_options_name_the_option(text, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(text=f"[bus]\n{text}\n")
    assert needle in str(exc.value)
    assert "secret" not in str(exc.value)
