"""Authentication: API keys (stored hashed), JWT verification, and who a request acts for."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from .errors import NotFound, Unauthorized
from .settings import Settings
from .store import queries
from .store.db import Database
from .store.tables import ApiKey, Owner, utcnow

#: Every API key starts with this, so a key is never mistaken for a JWT (which starts `eyJ`).
KEY_PREFIX = "plr_"
#: Seconds of clock difference tolerated on `exp`, `nbf` and `iat`.
LEEWAY_S = 10
#: `last_used_at` is refreshed at most this often, so verifying a key rarely writes.
LAST_USED_RESOLUTION = timedelta(seconds=60)
#: Owner ids of JWT subjects are remembered (owners are never renamed or removed).
OWNER_CACHE_SIZE = 10_000
#: Seconds for which "does an active API key exist" is remembered instead of asked per
#: request: keys created or revoked by another process (`parlour key ...`) switch
#: authentication on or off within this time; in this process, at once.
KEYS_RECHECK_S = 1.0

HOW_TO_AUTHENTICATE = (
    "Send `Authorization: Bearer <token>` with an API key (`parlour key create --owner NAME`) "
    "or a JWT (`parlour token --sub NAME` mints one for development)."
)


@dataclass(frozen=True)
class Principal:
    """Who a request acts for."""

    owner_id: uuid.UUID
    name: str
    admin: bool = False
    #: The API key presented (None for a JWT or the local owner), and its own limits.
    key_id: uuid.UUID | None = None
    requests_per_minute: int | None = None
    tokens_per_day: int | None = None


@dataclass(frozen=True)
class KeyInfo:
    """An API key as listed: everything but the secret."""

    id: uuid.UUID
    owner: str
    prefix: str
    admin: bool
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None
    requests_per_minute: int | None = None
    tokens_per_day: int | None = None


@dataclass(frozen=True)
class NewKey:
    """A freshly created key; `secret` is the only copy of the full key."""

    info: KeyInfo
    secret: str


def hash_key(key: str) -> str:
    """The stored form of a key: sha256 is enough because keys carry 256 random bits."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_key() -> tuple[str, str]:
    """A new (prefix, full key); the prefix identifies the key in listings and lookups."""
    prefix = secrets.token_hex(6)
    return prefix, f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"


def key_prefix(token: str) -> str | None:
    """The prefix of something shaped like a parlour API key, else None."""
    if not token.startswith(KEY_PREFIX):
        return None
    prefix, sep, secret = token[len(KEY_PREFIX) :].partition("_")
    if not sep or not secret or len(prefix) != 12:
        return None
    return prefix


def _info(key: ApiKey, owner: str) -> KeyInfo:
    return KeyInfo(
        id=key.id,
        owner=owner,
        prefix=key.prefix,
        admin=key.admin,
        created_at=key.created_at,
        last_used_at=key.last_used_at,
        revoked_at=key.revoked_at,
        requests_per_minute=key.requests_per_minute,
        tokens_per_day=key.tokens_per_day,
    )


async def create_key(
    db: Database,
    *,
    owner: str,
    admin: bool = False,
    requests_per_minute: int | None = None,
    tokens_per_day: int | None = None,
) -> NewKey:
    """Create an API key for `owner` (created if new) and return it with its secret."""
    prefix, secret = generate_key()
    async with db.session() as session, session.begin():
        row = await queries.ensure_owner(session, owner)
        key = ApiKey(
            owner_id=row.id,
            prefix=prefix,
            secret_hash=hash_key(secret),
            admin=admin,
            created_at=utcnow(),
            requests_per_minute=requests_per_minute,
            tokens_per_day=tokens_per_day,
        )
        session.add(key)
        await session.flush()
        new = NewKey(info=_info(key, row.name), secret=secret)
    db.key_changes += 1
    return new


async def list_keys(db: Database) -> list[KeyInfo]:
    """Every API key, oldest first, revoked ones included."""
    async with db.session() as session, session.begin():
        rows = await session.execute(
            select(ApiKey, Owner.name)
            .join(Owner, Owner.id == ApiKey.owner_id)
            .order_by(ApiKey.created_at, ApiKey.id)
        )
        return [_info(key, name) for key, name in rows]


async def _find_key(session: AsyncSession, ident: str) -> tuple[ApiKey, str]:
    """The key with this id or prefix and its owner's name, or NotFound."""
    condition: Any
    try:
        condition = ApiKey.id == uuid.UUID(ident)
    except ValueError:
        condition = ApiKey.prefix == (key_prefix(ident) or ident)
    found = (
        await session.execute(
            select(ApiKey, Owner.name).join(Owner, Owner.id == ApiKey.owner_id).where(condition)
        )
    ).all()
    if len(found) != 1:
        raise NotFound(f"No API key {ident!r}: `parlour key list` shows the ids of every key.")
    key, owner = found[0]
    return key, owner


async def revoke_key(db: Database, ident: str) -> KeyInfo:
    """Revoke the key with this id or prefix; revoking twice keeps the first time."""
    async with db.session() as session, session.begin():
        key, owner = await _find_key(session, ident)
        if key.revoked_at is None:
            key.revoked_at = utcnow()
        info = _info(key, owner)
    db.key_changes += 1
    return info


async def update_key_limits(
    db: Database,
    ident: str,
    *,
    requests_per_minute: int | None = None,
    tokens_per_day: int | None = None,
) -> KeyInfo:
    """Set the limits given of the key with this id or prefix (0 is unlimited)."""
    async with db.session() as session, session.begin():
        key, owner = await _find_key(session, ident)
        if requests_per_minute is not None:
            key.requests_per_minute = requests_per_minute
        if tokens_per_day is not None:
            key.tokens_per_day = tokens_per_day
        return _info(key, owner)


async def active_keys_exist(db: Database) -> bool:
    """True if at least one API key has not been revoked."""
    async with db.read() as session, session.begin():
        found = await session.scalar(select(ApiKey.id).where(ApiKey.revoked_at.is_(None)).limit(1))
        return found is not None


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


def _presents_key(authorization: str | None) -> bool:
    """True if the header carries something shaped like a parlour API key."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    return scheme.lower() == "bearer" and key_prefix(token.strip()) is not None


def bearer_token(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer …` header, or Unauthorized."""
    if not authorization:
        raise Unauthorized(f"Authentication required. {HOW_TO_AUTHENTICATE}")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized(
            f"The Authorization header must read `Bearer <token>`. {HOW_TO_AUTHENTICATE}"
        )
    return token


class Authenticator:
    """Decides who a request acts for, from its Authorization header and the configuration.

    Auth counts as configured when a JWT secret or public key is set, or when at least one
    API key has not been revoked. Without it, requests act for the local owner, but only on
    a loopback address or with --insecure; anywhere else every request is refused.
    """

    def __init__(
        self,
        *,
        db: Database,
        local: Principal,
        jwt_verifier: JwtVerifier | None,
        open_without_auth: bool,
    ) -> None:
        self.db = db
        self.local = local
        self.jwt = jwt_verifier
        self.open_without_auth = open_without_auth
        self._owners: dict[str, uuid.UUID] = {}
        #: (when asked, db.key_changes then, the answer) of the last active_keys_exist().
        self._keys_exist: tuple[float, int, bool] | None = None

    @classmethod
    def from_settings(cls, settings: Settings, *, db: Database, local: Principal) -> Authenticator:
        """The authenticator the settings describe; raises ValueError for an unusable key."""
        return cls(
            db=db,
            local=local,
            jwt_verifier=JwtVerifier.from_settings(settings),
            open_without_auth=settings.is_loopback or settings.insecure,
        )

    async def required(self, *, fresh: bool = False) -> bool:
        """True when requests must carry a valid token (`fresh`: ask the database now)."""
        if self.jwt is not None:
            return True
        now = time.monotonic()
        known = self._keys_exist
        changes = self.db.key_changes
        if fresh or known is None or now - known[0] > KEYS_RECHECK_S or known[1] != changes:
            known = (now, changes, await active_keys_exist(self.db))
            self._keys_exist = known
        return known[2]

    async def principal(self, authorization: str | None) -> Principal:
        """Who a request with this Authorization header acts for, or Unauthorized."""
        required = await self.required()
        if not required and _presents_key(authorization):
            # A key that another process just created must act for its owner at once.
            required = await self.required(fresh=True)
        if not required:
            # Clients such as the OpenAI SDK always send some token; it means nothing here.
            if self.open_without_auth:
                return self.local
            raise Unauthorized(
                "This server listens beyond loopback without authentication configured: set "
                "PARLOUR_JWT_SECRET or create an API key with `parlour key create`."
            )
        token = bearer_token(authorization)
        if key_prefix(token) is not None:
            return await self._key_principal(token)
        if self.jwt is None:
            raise Unauthorized(
                "This server accepts only API keys (no PARLOUR_JWT_SECRET or "
                "PARLOUR_JWT_PUBLIC_KEY is set); send a key from `parlour key create`."
            )
        subject = self.jwt.verify(token)
        return Principal(owner_id=await self._owner_id(subject), name=subject)

    async def _key_principal(self, token: str) -> Principal:
        prefix = key_prefix(token)
        digest = hash_key(token)
        async with self.db.session() as session, session.begin():
            rows = await session.execute(
                select(ApiKey, Owner.name)
                .join(Owner, Owner.id == ApiKey.owner_id)
                .where(ApiKey.prefix == prefix)
            )
            for key, owner in rows:
                if not hmac.compare_digest(key.secret_hash, digest):
                    continue
                if key.revoked_at is not None:
                    raise Unauthorized("This API key has been revoked; create a new one.")
                now = utcnow()
                if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:
                    await session.execute(
                        update(ApiKey).where(ApiKey.id == key.id).values(last_used_at=now)
                    )
                return Principal(
                    owner_id=key.owner_id,
                    name=owner,
                    admin=key.admin,
                    key_id=key.id,
                    requests_per_minute=key.requests_per_minute,
                    tokens_per_day=key.tokens_per_day,
                )
        raise Unauthorized(f"Unknown API key. {HOW_TO_AUTHENTICATE}")

    async def _owner_id(self, name: str) -> uuid.UUID:
        cached = self._owners.get(name)
        if cached is not None:
            return cached
        async with self.db.session() as session, session.begin():
            owner_id = (await queries.ensure_owner(session, name)).id
        if len(self._owners) >= OWNER_CACHE_SIZE:
            self._owners.clear()
        self._owners[name] = owner_id
        return owner_id
