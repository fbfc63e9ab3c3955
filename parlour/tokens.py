"""JSON Web Tokens: the configured keys, verification with PyJWT, and development tokens."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from .errors import Unauthorized
from .settings import Settings

#: Seconds of clock skew tolerated on exp, nbf and iat.
LEEWAY_S = 10

HOW_TO_AUTHENTICATE = (
    "Send `Authorization: Bearer <token>` with an API key (`parlour key create --owner NAME`) "
    "or a JWT (`parlour token --sub NAME` mints one for development)."
)


def load_public_key(path: Path) -> tuple[str, Any]:
    """(algorithm, key) for a PEM public key or certificate: RSA → RS256, P-256 → ES256."""
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise ValueError(
            f"Cannot read PARLOUR_JWT_PUBLIC_KEY {str(path)!r}: {exc.strerror}; point it at a "
            "PEM file holding the public key that verifies your tokens."
        ) from exc
    try:
        if b"-----BEGIN CERTIFICATE-----" in pem:
            key: Any = x509.load_pem_x509_certificate(pem).public_key()
        else:
            key = load_pem_public_key(pem)
    except ValueError as exc:
        raise ValueError(
            f"PARLOUR_JWT_PUBLIC_KEY {str(path)!r} is not a PEM public key or certificate."
        ) from exc
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256", key
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256", key
    raise ValueError(
        f"PARLOUR_JWT_PUBLIC_KEY {str(path)!r} must be an RSA key (RS256) or a P-256 EC key "
        "(ES256)."
    )


#: The shortest HS256 secret accepted, in bytes (RFC 7518 §3.2: at least the hash's size).
MIN_SECRET_BYTES = 32


def check_secret(secret: str) -> str:
    """`secret` itself, or ValueError when it is too short to sign HS256 tokens safely."""
    size = len(secret.encode("utf-8", "surrogatepass"))
    if size < MIN_SECRET_BYTES:
        raise ValueError(
            f"PARLOUR_JWT_SECRET is {size} bytes; HS256 needs at least {MIN_SECRET_BYTES}. "
            "Make one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return secret


class JwtVerifier:
    """Verifies JWTs against the configured keys; each key accepts only its own algorithm."""

    def __init__(
        self,
        *,
        secret: str | None = None,
        public_key: tuple[str, Any] | None = None,
        issuer: str | None = None,
        audience: str | None = None,
    ) -> None:
        # One fixed algorithm per key: a token can never choose how its key is read,
        # so `alg: none` and HS256-with-the-public-key are refused before any check.
        self.keys: dict[str, Any] = {}
        if secret:
            self.keys["HS256"] = check_secret(secret)
        if public_key is not None:
            algorithm, key = public_key
            self.keys[algorithm] = key
        self.issuer = issuer
        self.audience = audience
        self.required_claims = ["exp", "sub"]
        if issuer:
            self.required_claims.append("iss")
        if audience:
            self.required_claims.append("aud")

    @classmethod
    def from_settings(cls, settings: Settings) -> JwtVerifier | None:
        """The verifier the settings ask for, or None when no JWT key is configured."""
        if not settings.jwt_secret and settings.jwt_public_key is None:
            return None
        return cls(
            secret=settings.jwt_secret,
            public_key=(
                load_public_key(settings.jwt_public_key)
                if settings.jwt_public_key is not None
                else None
            ),
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
        )

    def verify(self, token: str) -> str:
        """The token's subject if it is valid now, else Unauthorized saying why."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized(
                f"The bearer token is neither an API key nor a JWT. {HOW_TO_AUTHENTICATE}"
            ) from None
        algorithm = header.get("alg")
        key = self.keys.get(algorithm) if isinstance(algorithm, str) else None
        if key is None or not isinstance(algorithm, str):
            accepted = ", ".join(sorted(self.keys))
            raise Unauthorized(
                f"JWT algorithm {algorithm!r} is not accepted here; sign tokens with {accepted}."
            )
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                issuer=self.issuer,
                audience=self.audience,
                leeway=LEEWAY_S,
                options={"require": self.required_claims},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("The JWT has expired; get a new token.") from None
        except jwt.ImmatureSignatureError:
            raise Unauthorized("The JWT is not valid yet (nbf or iat is in the future).") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthorized(
                f"The JWT has no {exc.claim!r} claim; this server requires "
                f"{', '.join(self.required_claims)}."
            ) from None
        except jwt.InvalidAudienceError:
            raise Unauthorized(
                f"The JWT's aud claim does not match; expected {self.audience!r} "
                "(PARLOUR_JWT_AUDIENCE)."
                if self.audience
                else "The JWT carries an aud claim; set PARLOUR_JWT_AUDIENCE to accept it."
            ) from None
        except jwt.InvalidIssuerError:
            raise Unauthorized(
                f"The JWT's iss claim does not match; expected {self.issuer!r} "
                "(PARLOUR_JWT_ISSUER)."
            ) from None
        except jwt.InvalidSignatureError:
            raise Unauthorized(
                "The JWT signature does not verify with this server's key."
            ) from None
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"The JWT is invalid: {exc}.") from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject.strip() or len(subject) > 255:
            raise Unauthorized(
                "The JWT's sub claim must be a non-empty string of 255 characters at most."
            )
        return subject


def mint_token(
    *,
    secret: str,
    sub: str,
    ttl: int,
    issuer: str | None = None,
    audience: str | None = None,
    now: float | None = None,
) -> str:
    """An HS256 JWT for `sub` valid for `ttl` seconds, with iss/aud when given."""
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"sub": sub, "iat": issued, "exp": issued + ttl}
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    return jwt.encode(claims, secret, algorithm="HS256")
