"""Small helpers the ledger tests share: organizations, consumption, counts and dates."""

from __future__ import annotations

import calendar
import uuid
from datetime import datetime
from typing import Any

from ledger import accounts, reservations, transactions
from ledger.accounts import Organization
from ledger.db import Conn
from ledger.reservations import Reservation, Settlement
from ledger.transactions import Transaction, TransactionType

CREDIT = 1_000_000  # micro-credits in a credit
TTL_S = 3600  # long enough that only the expiry tests' own holds ever fall due


async def new_org(conn: Conn, plan: str, *, now: datetime | None = None) -> Organization:
    """A fresh organization on `plan`, unique to the calling test."""
    return await accounts.create_organization(conn, f"test-{uuid.uuid4().hex[:12]}", plan, now=now)


async def hold(
    conn: Conn,
    org_id: uuid.UUID,
    key: str,
    minimum_micro: int,
    requested_micro: int,
    *,
    ttl_s: int = TTL_S,
    capability: str | None = None,
    quality: str | None = None,
) -> Reservation:
    """reservations.reserve with positional amounts and a long default ttl."""
    return await reservations.reserve(
        conn,
        org_id,
        key,
        minimum_micro=minimum_micro,
        requested_micro=requested_micro,
        ttl_s=ttl_s,
        capability=capability,
        quality=quality,
    )


async def consume(
    conn: Conn, org_id: uuid.UUID, charge_micro: int, *, hold_micro: int | None = None
) -> Settlement:
    """Reserve exactly `hold_micro` (default: the charge), then settle for `charge_micro`."""
    amount = charge_micro if hold_micro is None else hold_micro
    held = await hold(conn, org_id, f"consume-{uuid.uuid4()}", amount, amount)
    assert held.amount_micro == amount
    settlement = await reservations.settle(conn, org_id, held.id, charge_micro)
    assert settlement.applied
    return settlement


async def counts(conn: Conn, org_id: uuid.UUID) -> tuple[int, int]:
    """How many ledger entries and reservations the organization has."""
    row = await conn.fetchrow(
        """SELECT (SELECT count(*) FROM credit_transactions WHERE organization_id = $1) AS t,
                  (SELECT count(*) FROM credit_reservations WHERE organization_id = $1) AS r""",
        org_id,
    )
    return int(row["t"]), int(row["r"])


async def entries(conn: Conn, org_id: uuid.UUID, *types: TransactionType) -> list[Transaction]:
    """The organization's entries, newest first, optionally of the given types only."""
    page = await transactions.list_transactions(
        conn, org_id, limit=500, types=frozenset(types) if types else None
    )
    assert page.next_cursor is None
    return page.data


def add_months(at: datetime, months: int) -> datetime:
    """`at` plus whole months, the day clamped to the month's end (as PostgreSQL does)."""
    index = at.year * 12 + at.month - 1 + months
    year, month = divmod(index, 12)
    day = min(at.day, calendar.monthrange(year, month + 1)[1])
    return at.replace(year=year, month=month + 1, day=day)


async def reservation_row(conn: Conn, org: uuid.UUID, key: str) -> dict[str, Any]:
    """The reservation under `key`: status, amounts and release reason."""
    row = await conn.fetchrow(
        """SELECT status, amount_micro, charged_micro, release_reason
             FROM credit_reservations WHERE organization_id = $1 AND idempotency_key = $2""",
        org,
        key,
    )
    assert row is not None
    return dict(row)
