"""Signing keys (`[bus] key_file`) and the HMAC-SHA256 signature of an envelope.

The key file holds one `<kid> <hex secret>` a line (blank lines and `#` comments allowed). The first
key signs; every key verifies, so a key is rotated in three steps: add the new key on the second line
everywhere, move it to the first line everywhere, remove the old one.

The signature covers the canonical JSON of the envelope without `sig` (shared/formats.md):
`json.dumps(env, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")`. The
standard library's encoder is the definition, so it is what we use (msgspec writes some floats
differently, e.g. `1e16` for `1e+16`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from agent.bus.errors import KeyFileError
from agent.safe_io import read_bounded

MIN_SECRET_BYTES = 32  # HMAC-SHA256's block of strength; shorter secrets are guessable offline
MAX_KEYS = 64  # a rotation needs two; more is a mistake, not a policy
MAX_KEY_FILE_BYTES = 64 * 1024  # 64 keys of a few hundred bytes each
_KID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HEX_RE = re.compile(r"(?:[0-9a-fA-F]{2})+")


def canonical_json(envelope_without_sig: Mapping[str, Any]) -> bytes:
    """The bytes that are signed (raises ValueError on NaN/Infinity, which JSON cannot carry)."""
    text = json.dumps(envelope_without_sig, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8")


def _key_file_error(message: str, path: str) -> KeyFileError:
    return KeyFileError(message)  # the message names the path already


@dataclass(frozen=True, slots=True)
class Keyring:
    """The keys of one process: `signing_kid` signs, every kid in `secrets` verifies."""

    signing_kid: str
    secrets: Mapping[str, bytes]

    @classmethod
    def from_file(cls, path: str | Path) -> Keyring:
        data = read_bounded(path, limit=MAX_KEY_FILE_BYTES, what="bus key file", error=_key_file_error)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise KeyFileError(f"{path}: not UTF-8 text") from None
        return cls.from_text(text, source=str(path))

    @classmethod
    def from_text(cls, text: str, *, source: str = "<keys>") -> Keyring:
        keys: dict[str, bytes] = {}
        first: str | None = None
        for lineno, line in enumerate(text.splitlines(), 1):
            entry = line.split("#", 1)[0].strip()
            if not entry:
                continue
            kid, secret = _parse_line(entry, f"{source}:{lineno}")
            if kid in keys:
                raise KeyFileError(f"{source}:{lineno}: kid {kid!r} appears twice")
            keys[kid] = secret
            first = first or kid
        if first is None:
            raise KeyFileError(f"{source}: no key (want '<kid> <hex secret of >= {MIN_SECRET_BYTES} bytes>' lines)")
        if len(keys) > MAX_KEYS:
            raise KeyFileError(f"{source}: more than {MAX_KEYS} keys")
        return cls(signing_kid=first, secrets=keys)

    @classmethod
    def single(cls, kid: str, secret: bytes) -> Keyring:
        """A keyring of one key (tests, tools)."""
        return cls.from_text(f"{kid} {secret.hex()}")

    def sign(self, envelope_without_sig: Mapping[str, Any]) -> str:
        """Lowercase hex HMAC-SHA256 with the signing key; the envelope's `kid` must name it."""
        return self.sign_bytes(self.signing_kid, canonical_json(envelope_without_sig))

    def sign_bytes(self, kid: str, payload: bytes) -> str:
        return hmac.new(self.secrets[kid], payload, hashlib.sha256).hexdigest()

    def knows(self, kid: str) -> bool:
        return kid in self.secrets

    def verify(self, envelope_without_sig: Mapping[str, Any], kid: str, sig: str) -> bool:
        """True when `sig` is the signature of the envelope with key `kid` (constant-time compare)."""
        return self.verify_bytes(kid, canonical_json(envelope_without_sig), sig)

    def verify_bytes(self, kid: str, payload: bytes, sig: str) -> bool:
        """True when `sig` (hex) is the HMAC of `payload` with key `kid` (constant-time compare)."""
        secret = self.secrets.get(kid)
        if secret is None or not sig.isascii():  # compare_digest refuses non-ASCII str
            return False
        return hmac.compare_digest(hmac.new(secret, payload, hashlib.sha256).hexdigest(), sig)


def _parse_line(entry: str, where: str) -> tuple[str, bytes]:
    parts = entry.split()
    if len(parts) != 2:
        raise KeyFileError(f"{where}: want '<kid> <hex secret>', got {len(parts)} fields")
    kid, hex_secret = parts
    if not _KID_RE.fullmatch(kid):
        raise KeyFileError(f"{where}: kid must be 1-64 of letters, digits, '_', '.', '-'")
    if not _HEX_RE.fullmatch(hex_secret):
        raise KeyFileError(f"{where}: secret of kid {kid!r} is not hex (an even number of 0-9a-f)")
    secret = bytes.fromhex(hex_secret)
    if len(secret) < MIN_SECRET_BYTES:
        raise KeyFileError(f"{where}: secret of kid {kid!r} has {len(secret)} bytes, need >= {MIN_SECRET_BYTES}")
    return kid, secret
