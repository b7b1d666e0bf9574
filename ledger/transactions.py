"""The append-only ledger: posting grants and adjustments, and reading entries page by page."""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from ledger.db import Conn, fetch, fetchrow
from ledger.errors import InvalidArgument


class TransactionType(StrEnum):
    PLAN_ALLOCATION = "plan_allocation"
    MONTHLY_EXPIRY = "monthly_expiry"
    PROMO_BONUS = "promo_bonus"
    TOPUP_PURCHASE = "topup_purchase"
    CONSUMPTION = "consumption"
    PLAN_CHANGE_ADJUSTMENT = "plan_change_adjustment"
    ADMIN_ADJUSTMENT = "admin_adjustment"
    REFUND = "refund"


# The types that may be posted directly; the others come from reserve/settle and periods.
POSTABLE = frozenset(
    {
        TransactionType.PROMO_BONUS,
        TransactionType.TOPUP_PURCHASE,
        TransactionType.ADMIN_ADJUSTMENT,
        TransactionType.REFUND,
    }
)


@dataclass(frozen=True)
class Transaction:
    id: int
    organization_id: uuid.UUID
    type: TransactionType
    amount_micro: int  # signed
    monthly_micro: int
    bonus_micro: int
    overdraft_micro: int
    idempotency_key: str
    reservation_id: uuid.UUID | None
    capability: str | None
    quality: str | None
    model: str | None
    provider: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    input_usd_per_mtok: Decimal | None
    output_usd_per_mtok: Decimal | None
    credit_multiplier: Decimal | None
    reserved_micro: int | None
    estimated_credits_micro: int | None
    estimation_variance_micro: int | None
    overage_micro: int | None
    description: str | None
    created_at: datetime


@dataclass(frozen=True)
class Posted:
    transaction: Transaction
    replayed: bool  # the key had been used: this is the original entry


@dataclass(frozen=True)
class Page:
    data: list[Transaction]
    next_cursor: str | None


_COLUMNS = """
t.id, t.organization_id, t.transaction_type AS type, t.credits_amount_micro AS amount_micro,
t.monthly_micro, t.bonus_micro, t.overdraft_micro, t.idempotency_key, t.reservation_id,
c.unique_name AS capability, q.unique_name AS quality, t.model, t.provider, t.prompt_tokens,
t.completion_tokens, t.input_usd_per_mtok, t.output_usd_per_mtok, t.credit_multiplier,
t.reserved_micro, t.estimated_credits_micro, t.estimation_variance_micro, t.overage_micro,
t.description, t.created_at"""

_JOINS = """
LEFT JOIN ai_capabilities c ON c.id = t.ai_capability_id
LEFT JOIN quality_levels q ON q.id = t.quality_level_id"""


def _transaction(row: Any) -> Transaction:
    values = dict(row)
    values["type"] = TransactionType(values["type"])
    return Transaction(**values)


async def post(
    conn: Conn,
    organization_id: uuid.UUID,
    type: TransactionType,
    amount_micro: int,
    key: str,
    *,
    description: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> Posted:
    """Book a grant (positive) or a debit (negative) entry, idempotently by `key`.

    Credits first repay any overdraft in use; debits take bonus credits, then monthly, then
    the overdraft. A key reused with another type or amount raises IdempotencyConflict.
    """
    if type not in POSTABLE:
        raise InvalidArgument(f"{type} entries cannot be posted directly")
    row = await fetchrow(
        conn,
        f"""SELECT {_COLUMNS}, r.replayed
              FROM credit_post($1, $2, $3, $4, $5, $6) r
             CROSS JOIN LATERAL (SELECT (r.txn).*) t {_JOINS}""",
        organization_id,
        type.value,
        amount_micro,
        key,
        description,
        None if metadata is None else json.dumps(metadata),
    )
    values = dict(row)
    replayed = values.pop("replayed")
    return Posted(_transaction(values), replayed)


def encode_cursor(transaction_id: int) -> str:
    return base64.urlsafe_b64encode(f"t{transaction_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if not raw.startswith("t"):
            raise ValueError(raw)
        return int(raw[1:])
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument("cursor is not one this API returned") from None


async def list_transactions(
    conn: Conn,
    organization_id: uuid.UUID,
    *,
    limit: int = 50,
    cursor: str | None = None,
    types: frozenset[TransactionType] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> Page:
    """Newest first, keyset-paginated by id: a page never skips or repeats an entry that
    existed when the first page was read, whatever is appended meanwhile."""
    if not 1 <= limit <= 500:
        raise InvalidArgument("limit must be between 1 and 500")
    before = decode_cursor(cursor) if cursor else None
    rows = await fetch(
        conn,
        f"""SELECT {_COLUMNS} FROM credit_transactions t {_JOINS}
             WHERE t.organization_id = $1
               AND ($2::bigint IS NULL OR t.id < $2)
               AND ($3::text[] IS NULL OR t.transaction_type = ANY($3))
               AND ($4::timestamptz IS NULL OR t.created_at >= $4)
               AND ($5::timestamptz IS NULL OR t.created_at < $5)
             ORDER BY t.id DESC LIMIT $6""",
        organization_id,
        before,
        None if types is None else sorted(types),
        since,
        until,
        limit + 1,
    )
    data = [_transaction(row) for row in rows[:limit]]
    next_cursor = encode_cursor(data[-1].id) if len(rows) > limit else None
    return Page(data, next_cursor)
