"""Who is calling: organization API keys (hashed lookup, briefly cached) and the admin key."""

from __future__ import annotations

import hmac
import time
import uuid
from dataclasses import dataclass

from aiohttp import web

from gateway.errors import Forbidden, Unauthorized
from ledger import accounts
from ledger.db import Conn

KEY_CACHE_TTL_S = 5.0  # a revoked key stops working within this long on every instance
NEGATIVE_CACHE_TTL_S = 1.0  # unknown keys: brief, so a new key works almost at once
KEY_CACHE_MAX = 10_000  # entries; the cache is cleared when it grows past this


@dataclass(frozen=True)
class Principal:
    """The organization a request acts for."""

    key_id: uuid.UUID
    organization_id: uuid.UUID
    plan: str


class KeyCache:
    """Key digest → owner, for a few seconds, so the hot path skips PostgreSQL."""

    def __init__(self) -> None:
        self._entries: dict[bytes, tuple[float, Principal | None]] = {}

    async def principal(self, conn: Conn, key: str) -> Principal | None:
        digest = accounts.hash_key(key)
        now = time.monotonic()
        hit = self._entries.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
        owner = await accounts.authenticate(conn, key)
        found = (
            None if owner is None else Principal(owner.key_id, owner.organization_id, owner.plan)
        )
        if len(self._entries) >= KEY_CACHE_MAX:
            self._entries.clear()
        ttl = KEY_CACHE_TTL_S if found is not None else NEGATIVE_CACHE_TTL_S
        self._entries[digest] = (now + ttl, found)
        return found

    def forget(self) -> None:
        """Drop every entry (after a revocation on this instance)."""
        self._entries.clear()


def bearer_token(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Missing API key: send it as 'Authorization: Bearer <key>'.")
    return token.strip()


async def authenticate(request: web.Request, cache: KeyCache, conn: Conn) -> Principal:
    principal = await cache.principal(conn, bearer_token(request))
    if principal is None:
        raise Unauthorized("Invalid, unknown or revoked API key.")
    return principal


async def require_admin(request: web.Request, admin_key: str, cache: KeyCache, conn: Conn) -> None:
    """The admin key, compared in constant time; an organization key gets 403."""
    token = bearer_token(request)
    if admin_key and hmac.compare_digest(token.encode(), admin_key.encode()):
        return
    if await cache.principal(conn, token) is not None:
        raise Forbidden("This route needs the admin key, not an organization key.")
    raise Unauthorized("Invalid admin key.")
