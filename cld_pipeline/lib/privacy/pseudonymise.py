"""Keyed-hash person tokens and generalisation (shared/domain/privacy.md sections 1 and 1.5).

A token is HMAC-SHA-256 under the secret key over a namespaced, normalised identifier:
`nhs:<10 digits>` for a valid NHS number, `la:<LA code>:<LA person id>` otherwise, so the two kinds
can never collide. The same function serves social care, carers' linked person ids and the hospital
extract, so tokens join across datasets. It is computed set-based in DuckDB (HMAC built from
DuckDB's SHA-256 with the key's inner and outer pads passed as parameters, never in the SQL text)
and, for single values, with Python's `hmac`; tests keep the two identical.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

MIN_KEY_BYTES = 32
BLOCK = 64  # SHA-256 block size
DEV_KEY_FILE = "DEVELOPMENT-ONLY-pseudonymisation.key"


class KeyError_(RuntimeError):
    """The key is missing or unusable (message says what to do; it never contains the key)."""


@dataclass(frozen=True)
class PseudoKey:
    secret: bytes = b""
    version: str = "1"
    development: bool = False

    def __repr__(self) -> str:  # never print the secret
        return f"PseudoKey(version={self.version!r}, development={self.development})"

    __str__ = __repr__

    @property
    def pads(self) -> tuple[bytes, bytes]:
        """(key XOR ipad, key XOR opad) as in RFC 2104, for the SQL form of HMAC."""
        key = hashlib.sha256(self.secret).digest() if len(self.secret) > BLOCK else self.secret
        key = key.ljust(BLOCK, b"\0")
        return bytes(b ^ 0x36 for b in key), bytes(b ^ 0x5C for b in key)


def parse_key(text: str) -> bytes:
    """A key given as hex or base64; at least 32 bytes."""
    text = text.strip()
    raw: bytes | None = None
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raw = None
    if raw is None:
        raise KeyError_("CLD_PSEUDO_KEY is neither hex nor base64.")
    if len(raw) < MIN_KEY_BYTES:
        raise KeyError_(f"CLD_PSEUDO_KEY is {len(raw)} bytes; at least {MIN_KEY_BYTES} random bytes are required.")
    return raw


def load_key(key_text: str | None, version: str, environment: str, data_dir: Path) -> PseudoKey:
    """The key from the environment; in development only, a clearly labelled key file is created
    inside the data folder when none is given. Outside development a missing key stops the run."""
    if key_text:
        return PseudoKey(parse_key(key_text), version or "1", development=False)
    if environment != "development":
        raise KeyError_("CLD_PSEUDO_KEY is not set. Outside development the pipeline will not pseudonymise "
                        "without the secret key: set CLD_PSEUDO_KEY (at least 32 random bytes, hex or base64), "
                        "or CLD_ENVIRONMENT=development for a throw-away development key.")
    path = data_dir / DEV_KEY_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(32) + "\n", encoding="utf-8")
        os.chmod(path, 0o600)
    return PseudoKey(parse_key(path.read_text(encoding="utf-8")), f"dev-{version or '1'}", development=True)


def load_ring(current: PseudoKey, previous_text: str | None) -> tuple[PseudoKey, ...]:
    """The current key first, then the previous versions still held (`CLD_PSEUDO_KEY_PREVIOUS`:
    comma-separated `version=key` pairs). Old versions are kept only so that rights registered under
    them (erasure, restriction) keep matching after a key rotation."""
    ring = [current]
    for item in filter(None, (part.strip() for part in (previous_text or "").split(","))):
        version, sep, text = item.partition("=")
        if not sep or not version.strip():
            raise KeyError_("CLD_PSEUDO_KEY_PREVIOUS must be comma-separated version=key pairs.")
        if version.strip() in {k.version for k in ring}:
            raise KeyError_(f"CLD_PSEUDO_KEY_PREVIOUS repeats key version {version.strip()!r}.")
        ring.append(PseudoKey(parse_key(text), version.strip()))
    return tuple(ring)


def nhs_message(nhs_number: str) -> str:
    return "nhs:" + nhs_number


def la_message(la_code: str, la_person_id: str) -> str:
    return f"la:{la_code.strip().upper()}:{la_person_id.strip()}"


def token(key: PseudoKey, message: str) -> str:
    return hmac.new(key.secret, message.encode("utf-8"), hashlib.sha256).hexdigest()


def hmac_sql(message_sql: str, pads: tuple[str, str] = ("ipad", "opad")) -> str:
    """HMAC-SHA-256 of a VARCHAR expression as SQL; the named parameters (default $ipad and $opad)
    are the key's pads."""
    ipad, opad = pads
    return (f"sha256(${opad} || unhex(sha256(${ipad} || encode({message_sql}))))")


def person_token_sql(nhs_valid_sql: str, la_code_sql: str, la_id_sql: str) -> str:
    """Token of the valid NHS number when there is one, else of the LA code and LA person id."""
    message = (f"CASE WHEN {nhs_valid_sql} IS NOT NULL THEN 'nhs:' || {nhs_valid_sql} "
               f"WHEN {la_id_sql} IS NOT NULL THEN 'la:' || upper(trim({la_code_sql})) || ':' || trim({la_id_sql}) END")
    return f"CASE WHEN ({message}) IS NOT NULL THEN {hmac_sql(message)} END"
