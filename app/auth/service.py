"""API keys: random secrets shown once, stored as SHA-256 (they are 256-bit random, so a fast hash is
the right tool: there is nothing to brute-force), each belonging to a tenant."""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from functools import lru_cache

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.core.timeutil import utcnow

from .tables import ApiKey

SECRET_PREFIX = "pbrf_"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(session: Session, tenant_id: str, name: str) -> tuple[ApiKey, str]:
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(tenant_id=tenant_id, name=name, prefix=secret[:12], secret_sha256=hash_secret(secret))
    session.add(row)
    session.flush()
    return row, secret


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at)))


def revoke_key(session: Session, key_id: uuid.UUID) -> bool:
    result = session.execute(update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
                             .values(revoked_at=utcnow()))
    return result.rowcount == 1


@lru_cache
def static_keys(spec: str) -> dict[str, str]:
    """PBRF_API_KEYS="tenant:secret,tenant2:secret2" -> {sha256(secret): tenant}."""
    out = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        tenant, _, secret = item.partition(":")
        if not tenant or len(secret) < 16:
            raise ValueError("PBRF_API_KEYS entries look like tenant:secret with a secret of 16+ characters")
        out[hash_secret(secret)] = tenant
    return out


def tenant_for_secret(session: Session, secret: str, static: dict[str, str]) -> str | None:
    digest = hash_secret(secret)
    if digest in static:
        return static[digest]
    return session.scalar(select(ApiKey.tenant_id).where(ApiKey.secret_sha256 == digest, ApiKey.revoked_at.is_(None)))


def key_name(session: Session, secret: str, static: dict[str, str]) -> str | None:
    """The name of a valid key, for records of who did something: a key made with `pbrf-audit keys create`
    has its `--name`; a static PBRF_API_KEYS entry (`tenant:secret`) has no name of its own and is called
    by its tenant."""
    digest = hash_secret(secret)
    if digest in static:
        return static[digest]
    return session.scalar(select(ApiKey.name).where(ApiKey.secret_sha256 == digest, ApiKey.revoked_at.is_(None)))


# Whether the server runs open (no key anywhere) is asked by every request that comes without a key: the
# answer is kept this long, so that a key created with the CLI is required everywhere within a second
# while polls in open mode do not each count the key table. Lookups of a presented key are not cached:
# a revoked key stops working at once.
OPEN_MODE_CHECK_SECONDS = 1.0
_any_keys_seen: dict[str, tuple[float, bool]] = {}  # database URL -> (when, answer)


def any_keys(session: Session, static: dict[str, str]) -> bool:
    if static:
        return True
    database, now = str(session.get_bind().url), time.monotonic()
    seen = _any_keys_seen.get(database)
    if seen is not None and now - seen[0] < OPEN_MODE_CHECK_SECONDS:
        return seen[1]
    found = session.scalar(select(ApiKey.id).where(ApiKey.revoked_at.is_(None)).limit(1)) is not None
    _any_keys_seen[database] = (now, found)
    return found
