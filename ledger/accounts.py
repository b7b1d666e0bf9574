"""Organizations and their API keys (shown once, stored as SHA-256 digests)."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime

from ledger.db import Conn, fetchrow, translated
from ledger.errors import UnknownOrganization

KEY_PREFIX = "sk-gw-"
_KEY_BYTES = 32  # 256 bits: unguessable, so an unsalted SHA-256 is a sound verifier


@dataclass(frozen=True)
class Organization:
    id: uuid.UUID
    name: str
    plan: str
    pending_plan: str | None
    pending_change_at: datetime | None
    created_at: datetime


@dataclass(frozen=True)
class NewApiKey:
    id: uuid.UUID
    organization_id: uuid.UUID
    key: str  # the secret itself: returned once, never stored
    prefix: str


@dataclass(frozen=True)
class KeyOwner:
    """Who an API key belongs to, as the proxy needs it on every request."""

    key_id: uuid.UUID
    organization_id: uuid.UUID
    plan: str


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


_ORG_QUERY = """
SELECT o.id, o.name, p.unique_name AS plan, pp.unique_name AS pending_plan,
       op.pending_change_at, o.created_at
  FROM organizations o
  JOIN organization_plans op ON op.organization_id = o.id
  JOIN plans p ON p.id = op.plan_id
  LEFT JOIN plans pp ON pp.id = op.pending_plan_id
 WHERE o.id = $1"""


async def create_organization(
    conn: Conn,
    name: str,
    plan: str,
    *,
    now: datetime | None = None,
    organization_id: uuid.UUID | None = None,
) -> Organization:
    """Create an organization with its balance, first allocation and welcome bonus.

    Idempotent by `organization_id`: creating the same id again returns the organization.
    """
    org_id = organization_id or uuid.uuid4()
    await fetchrow(
        conn,
        "SELECT * FROM credit_create_organization($1, $2, $3, coalesce($4, now()))",
        org_id,
        name,
        plan,
        now,
    )
    return await get_organization(conn, org_id)


async def get_organization(conn: Conn, organization_id: uuid.UUID) -> Organization:
    row = await fetchrow(conn, _ORG_QUERY, organization_id)
    if row is None:
        raise UnknownOrganization(f"unknown organization {organization_id}")
    return Organization(**dict(row))


async def create_api_key(
    conn: Conn, organization_id: uuid.UUID, name: str | None = None
) -> NewApiKey:
    """Generate a key for an organization. The secret is in the result and nowhere else."""
    key = KEY_PREFIX + secrets.token_urlsafe(_KEY_BYTES)
    prefix = key[: len(KEY_PREFIX) + 6]
    row = await fetchrow(
        conn,
        """INSERT INTO api_keys (organization_id, name, key_prefix, key_hash)
           SELECT id, $2, $3, $4 FROM organizations WHERE id = $1
           RETURNING id""",
        organization_id,
        name,
        prefix,
        hash_key(key),
    )
    if row is None:
        raise UnknownOrganization(f"unknown organization {organization_id}")
    return NewApiKey(row["id"], organization_id, key, prefix)


async def authenticate(conn: Conn, key: str) -> KeyOwner | None:
    """The owner of a live key, or None for an unknown or revoked one."""
    row = await fetchrow(
        conn,
        """SELECT k.id, k.organization_id, p.unique_name AS plan
             FROM api_keys k
             JOIN organization_plans op ON op.organization_id = k.organization_id
             JOIN plans p ON p.id = op.plan_id
            WHERE k.key_hash = $1 AND k.revoked_at IS NULL""",
        hash_key(key),
    )
    return None if row is None else KeyOwner(row["id"], row["organization_id"], row["plan"])


async def revoke_api_key(conn: Conn, key_id: uuid.UUID) -> bool:
    """Revoke a key; False when there is no such live key."""
    with translated():
        status = await conn.execute(
            "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL", key_id
        )
    return status.endswith(" 1")
