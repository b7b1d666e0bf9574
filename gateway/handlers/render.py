"""JSON shapes shared by the client and admin routes (SPEC §5): credits as numbers, times
as ISO 8601 UTC."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ledger.balances import Balance
from ledger.transactions import Page, Transaction
from policies.pricing import credits_number


def iso(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat().replace("+00:00", "Z")


def balance(b: Balance) -> dict[str, Any]:
    return {
        "organization_id": str(b.organization_id),
        "plan": b.plan,
        "available": credits_number(b.available_micro),
        "spendable": credits_number(b.spendable_micro),
        "monthly_credits": credits_number(b.monthly_credits_micro),
        "monthly_remaining": credits_number(b.monthly_remaining_micro),
        "used_this_period": credits_number(b.used_this_period_micro),
        "bonus_credits": credits_number(b.bonus_credits_micro),
        "reserved_credits": credits_number(b.reserved_credits_micro),
        "overdraft_limit": credits_number(b.overdraft_limit_micro),
        "overdraft_used": credits_number(b.overdraft_used_micro),
        "period_start": iso(b.period_start),
        "period_end": iso(b.period_end),
    }


def transaction(t: Transaction) -> dict[str, Any]:
    return {
        "id": str(t.id),
        "type": t.type.value,
        "amount": credits_number(t.amount_micro),
        "capability": t.capability,
        "quality": t.quality,
        "model": t.model,
        "prompt_tokens": t.prompt_tokens,
        "completion_tokens": t.completion_tokens,
        "reservation_id": None if t.reservation_id is None else str(t.reservation_id),
        "idempotency_key": t.idempotency_key,
        "description": t.description,
        "created_at": iso(t.created_at),
    }


def page(p: Page) -> dict[str, Any]:
    return {"data": [transaction(t) for t in p.data], "next_cursor": p.next_cursor}
