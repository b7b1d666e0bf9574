"""An organization's balance, with the computed fields of the API (SPEC §4, §5)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from ledger.db import Conn, fetchrow
from ledger.errors import UnknownOrganization


@dataclass(frozen=True)
class Balance:
    organization_id: uuid.UUID
    plan: str
    monthly_credits_micro: int  # this period's allocation
    monthly_remaining_micro: int
    used_this_period_micro: int  # consumption this period, from the ledger
    bonus_credits_micro: int
    reserved_credits_micro: int
    overdraft_limit_micro: int
    overdraft_used_micro: int
    period_start: datetime
    period_end: datetime

    @property
    def available_micro(self) -> int:
        """Monthly remaining plus bonus, less any overdraft in use."""
        return self.monthly_remaining_micro + self.bonus_credits_micro - self.overdraft_used_micro

    @property
    def spendable_micro(self) -> int:
        """What a new hold may take: available less holds plus the overdraft limit."""
        return self.available_micro - self.reserved_credits_micro + self.overdraft_limit_micro


_QUERY = """
SELECT b.organization_id, p.unique_name AS plan, b.monthly_credits_micro,
       b.monthly_remaining_micro,
       coalesce((SELECT -sum(t.credits_amount_micro) FROM credit_transactions t
                  WHERE t.organization_id = b.organization_id
                    AND t.transaction_type = 'consumption'
                    AND t.created_at >= b.period_start AND t.created_at < b.period_end), 0)::bigint
           AS used_this_period_micro,
       b.bonus_credits_micro, b.reserved_credits_micro, b.overdraft_limit_micro,
       b.overdraft_used_micro, b.period_start, b.period_end
  FROM organization_credit_balances b
  JOIN organization_plans op ON op.organization_id = b.organization_id
  JOIN plans p ON p.id = op.plan_id
 WHERE b.organization_id = $1"""


async def get_balance(conn: Conn, organization_id: uuid.UUID) -> Balance:
    row = await fetchrow(conn, _QUERY, organization_id)
    if row is None:
        raise UnknownOrganization(f"unknown organization {organization_id}")
    return Balance(**dict(row))
