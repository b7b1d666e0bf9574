"""Billing periods and plans: the monthly reset and plan changes (SPEC §4)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from ledger.db import Conn, fetch, fetchrow


class PlanChangeKind(StrEnum):
    UPGRADED = "upgraded"
    DOWNGRADE_SCHEDULED = "downgrade_scheduled"
    DOWNGRADE_CANCELLED = "downgrade_cancelled"


@dataclass(frozen=True)
class PeriodReset:
    reset: bool  # False: the period was still current; nothing changed
    expired_micro: int
    allocated_micro: int
    plan: str
    period_start: datetime
    period_end: datetime


@dataclass(frozen=True)
class PlanChange:
    kind: PlanChangeKind
    plan: str
    effective_at: datetime
    transaction_id: int | None
    adjustment_micro: int


async def reset_period(
    conn: Conn, organization_id: uuid.UUID, now: datetime | None = None
) -> PeriodReset:
    """End the period if it is over by `now`: expire leftover monthly credits, apply a
    scheduled downgrade, allocate the new period. Idempotent."""
    row = await fetchrow(
        conn, "SELECT * FROM credit_reset_period($1, coalesce($2, now()))", organization_id, now
    )
    return PeriodReset(**dict(row))


async def due_for_reset(
    conn: Conn, now: datetime | None = None, limit: int = 500
) -> list[uuid.UUID]:
    """Organizations whose period has ended by `now`."""
    rows = await fetch(
        conn,
        """SELECT organization_id FROM organization_credit_balances
            WHERE period_end <= coalesce($1, now()) ORDER BY period_end LIMIT $2""",
        now,
        limit,
    )
    return [row["organization_id"] for row in rows]


async def change_plan(
    conn: Conn,
    organization_id: uuid.UUID,
    plan: str,
    *,
    direction: str | None = None,
    now: datetime | None = None,
) -> PlanChange:
    """Upgrade at once (with an adjustment for the difference) or schedule a downgrade for
    the period's end; `direction` ('upgrade' / 'downgrade'), when given, must match."""
    row = await fetchrow(
        conn,
        "SELECT * FROM credit_change_plan($1, $2, $3, coalesce($4, now()))",
        organization_id,
        plan,
        direction,
        now,
    )
    values = dict(row)
    return PlanChange(
        kind=PlanChangeKind(values.pop("change")),
        plan=values["plan"],
        effective_at=values["effective_at"],
        transaction_id=values["transaction_id"],
        adjustment_micro=values["adjustment_micro"],
    )
