"""Holds on credits around a call: reserve the worst case, then settle, release or expire."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any, TypeVar

from ledger.db import Conn, fetch, fetchrow
from ledger.errors import SQLSTATE_ERRORS, InsufficientCredits, LedgerError

_T = TypeVar("_T")


class ReservationStatus(StrEnum):
    PENDING = "pending"
    SETTLED = "settled"
    RELEASED = "released"
    EXPIRED = "expired"
    REJECTED = "rejected"


@dataclass(frozen=True)
class Reservation:
    id: uuid.UUID
    organization_id: uuid.UUID
    status: ReservationStatus
    amount_micro: int  # held
    spendable_micro: int  # left to spend after this hold
    expires_at: datetime
    replayed: bool  # the key had been used before: this is the original outcome


@dataclass(frozen=True)
class ChargeSnapshot:
    """What a charge was computed from; stored on the consumption entry."""

    model: str
    provider: str | None = None
    input_usd_per_mtok: Decimal | None = None
    output_usd_per_mtok: Decimal | None = None
    credit_multiplier: Decimal | None = None
    credits_per_usd: Decimal | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    estimated_micro: int | None = None
    metadata: dict[str, Any] | None = None


@dataclass(frozen=True)
class Settlement:
    status: ReservationStatus  # settled, or how the hold had already ended
    applied: bool  # False: the hold was resolved before; nothing changed now
    transaction_id: int | None
    charged_micro: int | None
    available_micro: int
    spendable_micro: int
    monthly_credits_micro: int


@dataclass(frozen=True)
class Release:
    status: ReservationStatus
    applied: bool
    amount_micro: int
    available_micro: int
    spendable_micro: int


@dataclass(frozen=True)
class PendingReservation:
    id: uuid.UUID
    organization_id: uuid.UUID
    amount_micro: int
    capability: str | None
    quality: str | None
    model: str | None
    request_id: str | None
    created_at: datetime
    expires_at: datetime


@dataclass(frozen=True)
class HoldRequest:
    """One hold to take (the arguments of `reserve`), for `reserve_batch`."""

    organization_id: uuid.UUID
    key: str
    minimum_micro: int
    requested_micro: int
    ttl_s: int
    capability: str | None = None
    quality: str | None = None
    model: str | None = None
    request_id: str | None = None


@dataclass(frozen=True)
class SettleRequest:
    """One settlement (the arguments of `settle`), for `settle_batch`."""

    organization_id: uuid.UUID
    reservation_id: uuid.UUID
    charge_micro: int
    snapshot: ChargeSnapshot | None = None


async def reserve_request(conn: Conn, request: HoldRequest) -> Reservation:
    """`reserve` for one HoldRequest."""
    return await reserve(
        conn,
        request.organization_id,
        request.key,
        minimum_micro=request.minimum_micro,
        requested_micro=request.requested_micro,
        ttl_s=request.ttl_s,
        capability=request.capability,
        quality=request.quality,
        model=request.model,
        request_id=request.request_id,
    )


async def settle_request(conn: Conn, request: SettleRequest) -> Settlement:
    """`settle` for one SettleRequest."""
    return await settle(
        conn,
        request.organization_id,
        request.reservation_id,
        request.charge_micro,
        request.snapshot,
    )


async def reserve_batch(
    conn: Conn, requests: Sequence[HoldRequest]
) -> list[Reservation | LedgerError]:
    """Take many holds in one statement and one commit (sql/0007_credit_batches.up.sql),
    in order; each one's outcome is what `reserve` would return or raise for it alone."""
    rows = await fetch(
        conn,
        "SELECT * FROM credit_reserve_batch($1, $2, $3, $4, $5, $6, $7, $8, $9) ORDER BY ord",
        *hold_arrays(requests),
    )
    return [reservation_outcome(r, row) for r, row in zip(requests, rows, strict=True)]


def hold_arrays(requests: Sequence[HoldRequest]) -> list[list[Any]]:
    """The arguments of credit_reserve_batch, in order."""
    return [
        [r.organization_id for r in requests],
        [r.key for r in requests],
        [r.minimum_micro for r in requests],
        [r.requested_micro for r in requests],
        [r.ttl_s for r in requests],
        [r.capability for r in requests],
        [r.quality for r in requests],
        [r.model for r in requests],
        [r.request_id for r in requests],
    ]


def reservation_outcome(request: HoldRequest, row: Any) -> Reservation | LedgerError:
    """One item's row of a batch, as what `reserve` returns or raises for it."""
    return _reservation(request.organization_id, request.minimum_micro, row)


async def settle_batch(
    conn: Conn, requests: Sequence[SettleRequest]
) -> list[Settlement | LedgerError]:
    """Settle many holds in one statement and one commit, in order; each one's outcome is
    what `settle` would return or raise for it alone."""
    rows = await fetch(
        conn,
        """SELECT * FROM credit_settle_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,
                                             $13) ORDER BY ord""",
        *settle_arrays(requests),
    )
    return [settlement_outcome(row) for row in rows]


def settle_arrays(requests: Sequence[SettleRequest]) -> list[list[Any]]:
    """The arguments of credit_settle_batch, in order."""
    snapshots = [r.snapshot or ChargeSnapshot(model="") for r in requests]
    return [
        [r.organization_id for r in requests],
        [r.reservation_id for r in requests],
        [r.charge_micro for r in requests],
        [s.model or None for s in snapshots],
        [s.provider for s in snapshots],
        [s.input_usd_per_mtok for s in snapshots],
        [s.output_usd_per_mtok for s in snapshots],
        [s.credit_multiplier for s in snapshots],
        [s.credits_per_usd for s in snapshots],
        [s.prompt_tokens for s in snapshots],
        [s.completion_tokens for s in snapshots],
        [s.estimated_micro for s in snapshots],
        [None if s.metadata is None else json.dumps(s.metadata) for s in snapshots],
    ]


def _item_error(row: Any) -> LedgerError | None:
    code = row.get("error_code")  # the single operations raise theirs instead
    if code is None:
        return None
    return SQLSTATE_ERRORS.get(code, LedgerError)(row["error_message"])


async def reserve(
    conn: Conn,
    organization_id: uuid.UUID,
    key: str,
    *,
    minimum_micro: int,
    requested_micro: int,
    ttl_s: int,
    capability: str | None = None,
    quality: str | None = None,
    model: str | None = None,
    request_id: str | None = None,
) -> Reservation:
    """Hold between `minimum_micro` and `requested_micro`, as much as the balance allows.

    Raises InsufficientCredits when even the minimum cannot be held; that refusal is
    remembered, so the same key is refused again. Idempotent by `key`.
    """
    row = await fetchrow(
        conn,
        "SELECT * FROM credit_reserve($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        organization_id,
        key,
        minimum_micro,
        requested_micro,
        ttl_s,
        capability,
        quality,
        model,
        request_id,
    )
    return _outcome(_reservation(organization_id, minimum_micro, row))


def _outcome(result: _T | LedgerError) -> _T:
    if isinstance(result, LedgerError):
        raise result
    return result


def _reservation(
    organization_id: uuid.UUID, minimum_micro: int, row: Any
) -> Reservation | LedgerError:
    error = _item_error(row)
    if error is not None:
        return error
    status = ReservationStatus(row["status"])
    if status is ReservationStatus.REJECTED:
        return InsufficientCredits(minimum_micro, row["spendable_micro"])
    return Reservation(
        id=row["reservation_id"],
        organization_id=organization_id,
        status=status,
        amount_micro=row["amount_micro"],
        spendable_micro=row["spendable_micro"],
        expires_at=row["expires_at"],
        replayed=row["replayed"],
    )


async def settle(
    conn: Conn,
    organization_id: uuid.UUID,
    reservation_id: uuid.UUID,
    charge_micro: int,
    snapshot: ChargeSnapshot | None = None,
) -> Settlement:
    """Charge `charge_micro` against a hold and give back the rest. Idempotent."""
    s = snapshot or ChargeSnapshot(model="")
    row = await fetchrow(
        conn,
        "SELECT * FROM credit_settle($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        organization_id,
        reservation_id,
        charge_micro,
        s.model or None,
        s.provider,
        s.input_usd_per_mtok,
        s.output_usd_per_mtok,
        s.credit_multiplier,
        s.credits_per_usd,
        s.prompt_tokens,
        s.completion_tokens,
        s.estimated_micro,
        None if s.metadata is None else json.dumps(s.metadata),
    )
    return _outcome(settlement_outcome(row))


def settlement_outcome(row: Any) -> Settlement | LedgerError:
    """One item's row of a batch, as what `settle` returns or raises for it."""
    error = _item_error(row)
    if error is not None:
        return error
    return Settlement(
        status=ReservationStatus(row["status"]),
        applied=row["applied"],
        transaction_id=row["transaction_id"],
        charged_micro=row["charged_micro"],
        available_micro=row["available_micro"],
        spendable_micro=row["spendable_micro"],
        monthly_credits_micro=row["monthly_credits_micro"],
    )


async def release(
    conn: Conn, organization_id: uuid.UUID, reservation_id: uuid.UUID, reason: str | None = None
) -> Release:
    """Give a hold back after a failed call. Idempotent."""
    row = await fetchrow(
        conn,
        "SELECT * FROM credit_release($1, $2, $3, false)",
        organization_id,
        reservation_id,
        reason,
    )
    return _release(row)


async def expire(
    conn: Conn, organization_id: uuid.UUID, reservation_id: uuid.UUID, now: datetime | None = None
) -> Release:
    """Expire a hold whose ttl has run out by `now` (a pending hold not yet due stays)."""
    row = await fetchrow(
        conn,
        "SELECT * FROM credit_release($1, $2, 'ttl elapsed', true, coalesce($3, now()))",
        organization_id,
        reservation_id,
        now,
    )
    return _release(row)


def _release(row: Any) -> Release:
    return Release(
        status=ReservationStatus(row["status"]),
        applied=row["applied"],
        amount_micro=row["amount_micro"],
        available_micro=row["available_micro"],
        spendable_micro=row["spendable_micro"],
    )


async def expire_due(conn: Conn, now: datetime | None = None, limit: int = 500) -> int:
    """Expire up to `limit` holds past their ttl, each in its own transaction; returns how many."""
    due = await fetch(
        conn,
        """SELECT organization_id, id FROM credit_reservations
            WHERE status = 'pending' AND expires_at <= coalesce($1, now())
            ORDER BY expires_at LIMIT $2""",
        now,
        limit,
    )
    expired = 0
    for row in due:
        result = await expire(conn, row["organization_id"], row["id"], now)
        expired += result.applied
    return expired


async def list_pending(
    conn: Conn, organization_id: uuid.UUID | None = None, limit: int = 500
) -> list[PendingReservation]:
    """Pending holds, oldest first, for one organization or all."""
    rows = await fetch(
        conn,
        """SELECT r.id, r.organization_id, r.amount_micro, c.unique_name AS capability,
                  q.unique_name AS quality, r.model, r.request_id, r.created_at, r.expires_at
             FROM credit_reservations r
             LEFT JOIN ai_capabilities c ON c.id = r.ai_capability_id
             LEFT JOIN quality_levels q ON q.id = r.quality_level_id
            WHERE r.status = 'pending' AND ($1::uuid IS NULL OR r.organization_id = $1)
            ORDER BY r.created_at LIMIT $2""",
        organization_id,
        limit,
    )
    return [PendingReservation(**dict(row)) for row in rows]
