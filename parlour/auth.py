"""Authentication: API keys (stored hashed), JWT verification, and who a request acts for."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
import uuid
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from .errors import NotFound, Unauthorized
from .settings import Settings
from .store import queries
from .store.db import Database
from .store.tables import ApiKey, Owner, utcnow
from .tokens import HOW_TO_AUTHENTICATE, JwtVerifier

#: Every API key starts with this, so a key is never mistaken for a JWT (which starts `eyJ`).
KEY_PREFIX = "plr_"
#: `last_used_at` is refreshed at most this often, so verifying a key rarely writes.
LAST_USED_RESOLUTION = timedelta(seconds=60)
#: Owner ids of JWT subjects are remembered (owners are never renamed or removed).
OWNER_CACHE_SIZE = 10_000
#: Seconds for which "does an active API key exist" is remembered instead of asked per
#: request: keys created or revoked by another process (`parlour key ...`) switch
#: authentication on or off within this time; in this process, at once.
KEYS_RECHECK_S = 1.0


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
    # Every field but the owner's name is the key's column of the same name.
    columns = {f.name: getattr(key, f.name) for f in fields(KeyInfo) if f.name != "owner"}
    return KeyInfo(owner=owner, **columns)


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
