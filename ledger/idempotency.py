"""Idempotency-Key records of proxied requests: claim a key, then store the response or
give the key up. A claim left by a crashed process lapses after its lease."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from enum import StrEnum

from ledger.db import Conn, fetchrow, translated

RECORD_TTL_S = 24 * 3600  # a replay is served for a day, like the big payment APIs do


class ClaimState(StrEnum):
    CLAIMED = "claimed"  # this request owns the key: go ahead
    IN_FLIGHT = "in_flight"  # another request with this key is running
    MISMATCH = "mismatch"  # the key was used with a different request
    DONE = "done"  # the key's response is stored: replay it


@dataclass(frozen=True)
class StoredResponse:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class Claim:
    state: ClaimState
    response: StoredResponse | None = None


def request_hash(method: str, path: str, body: bytes) -> bytes:
    return hashlib.sha256(method.encode() + b" " + path.encode() + b"\n" + body).digest()


async def claim(
    conn: Conn, organization_id: uuid.UUID, key: str, digest: bytes, lease_s: int
) -> Claim:
    """Claim `key` for a request, or say why not (and hand back a stored response)."""
    row = await fetchrow(
        conn,
        """INSERT INTO request_idempotency AS r (organization_id, idempotency_key, request_hash,
               state, lease_until, expires_at)
           VALUES ($1, $2, $3, 'in_flight', now() + make_interval(secs => $4),
                   now() + make_interval(secs => $5))
           ON CONFLICT (organization_id, idempotency_key) DO UPDATE
              SET request_hash = excluded.request_hash, state = 'in_flight',
                  response_status = NULL, response_headers = NULL, response_body = NULL,
                  created_at = now(), lease_until = excluded.lease_until,
                  expires_at = excluded.expires_at
            WHERE r.expires_at < now()
               OR (r.state = 'in_flight' AND r.lease_until < now()
                   AND r.request_hash = excluded.request_hash)
           RETURNING true AS claimed""",
        organization_id,
        key,
        digest,
        lease_s,
        RECORD_TTL_S,
    )
    if row is not None:
        return Claim(ClaimState.CLAIMED)
    row = await fetchrow(
        conn,
        """SELECT request_hash, state, response_status, response_headers, response_body
             FROM request_idempotency WHERE organization_id = $1 AND idempotency_key = $2""",
        organization_id,
        key,
    )
    if row is None:  # given up between the two statements: the caller may retry
        return Claim(ClaimState.IN_FLIGHT)
    if bytes(row["request_hash"]) != digest:
        return Claim(ClaimState.MISMATCH)
    if row["state"] == "in_flight":
        return Claim(ClaimState.IN_FLIGHT)
    stored = StoredResponse(
        row["response_status"], json.loads(row["response_headers"]), bytes(row["response_body"])
    )
    return Claim(ClaimState.DONE, stored)


async def complete(
    conn: Conn, organization_id: uuid.UUID, key: str, response: StoredResponse
) -> None:
    """Store the response of a claimed key."""
    with translated():
        await conn.execute(
            """UPDATE request_idempotency SET state = 'done', response_status = $3,
                      response_headers = $4, response_body = $5
                WHERE organization_id = $1 AND idempotency_key = $2""",
            organization_id,
            key,
            response.status,
            json.dumps(response.headers),
            response.body,
        )


async def give_up(conn: Conn, organization_id: uuid.UUID, key: str) -> None:
    """Forget a claim whose request failed, so that a retry runs afresh."""
    with translated():
        await conn.execute(
            """DELETE FROM request_idempotency
                WHERE organization_id = $1 AND idempotency_key = $2 AND state = 'in_flight'""",
            organization_id,
            key,
        )


async def purge_expired(conn: Conn) -> int:
    with translated():
        status = await conn.execute("DELETE FROM request_idempotency WHERE expires_at < now()")
    return int(status.split()[-1])
