"""Low-balance notifications as an outbox: recorded at most once per threshold per
organization per day, then delivered (and retried) by the jobs until they get through."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import date
from typing import Any

from ledger.db import Conn, fetch, fetchrow, translated

MAX_ATTEMPTS = 8  # a webhook that keeps failing is given up on after this many tries


@dataclass(frozen=True)
class Pending:
    organization_id: uuid.UUID
    threshold: str
    notified_on: date
    payload: dict[str, Any]
    attempts: int


async def record(
    conn: Conn, organization_id: uuid.UUID, threshold: str, day: date, payload: dict[str, Any]
) -> bool:
    """Record a notification; False when this threshold was already notified that day."""
    row = await fetchrow(
        conn,
        """INSERT INTO credit_notifications (organization_id, threshold, notified_on, payload)
           VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING true""",
        organization_id,
        threshold,
        day,
        json.dumps(payload),
    )
    return row is not None


async def undelivered(conn: Conn, limit: int = 100) -> list[Pending]:
    """Notifications still to deliver, oldest first; retries wait longer each time."""
    rows = await fetch(
        conn,
        """SELECT organization_id, threshold, notified_on, payload, attempts
             FROM credit_notifications
            WHERE delivered_at IS NULL AND attempts < $1
              AND created_at + make_interval(secs => 30 * (2 ^ attempts - 1)) <= now()
            ORDER BY created_at LIMIT $2""",
        MAX_ATTEMPTS,
        limit,
    )
    return [
        Pending(
            r["organization_id"],
            r["threshold"],
            r["notified_on"],
            json.loads(r["payload"]),
            r["attempts"],
        )
        for r in rows
    ]


async def mark(conn: Conn, item: Pending, *, delivered: bool) -> None:
    with translated():
        await conn.execute(
            """UPDATE credit_notifications
                  SET attempts = attempts + 1,
                      delivered_at = CASE WHEN $4 THEN now() END
                WHERE organization_id = $1 AND threshold = $2 AND notified_on = $3""",
            item.organization_id,
            item.threshold,
            item.notified_on,
            delivered,
        )
