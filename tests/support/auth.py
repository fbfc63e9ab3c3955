"""Tokens for auth tests: valid JWTs, hand-built forgeries, and key files."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

SECRET = "parlour-test-secret-with-more-than-32-bytes"
ISSUER = "https://issuer.parlour.test"
AUDIENCE = "parlour-tests"


def b64url(data: bytes) -> str:
    """Base64url without padding, as JWTs write it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_json(value: Any) -> str:
    """A JSON value as a JWT segment."""
    return b64url(json.dumps(value, separators=(",", ":")).encode("utf-8"))


def claims(sub: str = "alice", *, ttl: int = 3600, **extra: Any) -> dict[str, Any]:
    """Claims valid for `ttl` seconds from now; `extra` adds or overrides (None removes)."""
    now = int(time.time())
    values: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + ttl}
    values.update(extra)
    return {k: v for k, v in values.items() if v is not None}


def hs256(sub: str = "alice", *, secret: str = SECRET, **extra: Any) -> str:
    """An HS256 token signed with `secret`."""
    return jwt.encode(claims(sub, **extra), secret, algorithm="HS256")


def signed(private_key: Any, algorithm: str, sub: str = "alice", **extra: Any) -> str:
    """A token signed with an RSA or EC private key."""
    return jwt.encode(claims(sub, **extra), private_key, algorithm=algorithm)


def unsigned(payload: dict[str, Any], *, alg: str = "none") -> str:
    """A token with `alg: none` (or a spelling of it) and an empty signature."""
    return f"{b64url_json({'alg': alg, 'typ': 'JWT'})}.{b64url_json(payload)}."


def hmac_forgery(payload: dict[str, Any], key: bytes) -> str:
    """HS256 signed with arbitrary key bytes, e.g. a public key's PEM text.

    Built by hand because PyJWT refuses to sign HS256 with a PEM key.
    """
    head = f"{b64url_json({'alg': 'HS256', 'typ': 'JWT'})}.{b64url_json(payload)}"
    signature = hmac.new(key, head.encode("ascii"), hashlib.sha256).digest()
    return f"{head}.{b64url(signature)}"


def with_payload(token: str, payload: dict[str, Any]) -> str:
    """The token with its payload replaced and its original signature kept."""
    head, _payload, signature = token.split(".")
    return f"{head}.{b64url_json(payload)}.{signature}"


def with_flipped_signature(token: str) -> str:
    """The token with one byte of its signature changed."""
    head, payload, signature = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
    raw[len(raw) // 2] ^= 0x01
    return f"{head}.{payload}.{b64url(bytes(raw))}"


def rsa_private_key() -> rsa.RSAPrivateKey:
    """A fresh RSA key."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def ec_private_key() -> ec.EllipticCurvePrivateKey:
    """A fresh P-256 key."""
    return ec.generate_private_key(ec.SECP256R1())


def write_public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, path: Path) -> bytes:
    """Write the public half of `key` as PEM to `path` and return the PEM bytes."""
    pem = key.public_key().public_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PublicFormat.SubjectPublicKeyInfo,
    )
    path.write_bytes(pem)
    return pem


def bearer(token: str) -> dict[str, str]:
    """An Authorization header."""
    return {"Authorization": f"Bearer {token}"}
