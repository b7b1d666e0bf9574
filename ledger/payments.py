"""Stripe top-ups in the ledger: a paid Checkout session credits its package once, and the
refunds of its charge reverse their share once, whatever the order and however often the
events arrive. Each step is one transaction that first locks the payment's row."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import asyncpg

from ledger import transactions
from ledger.db import Conn, translated
from ledger.errors import UnknownOrganization
from ledger.transactions import TransactionType


@dataclass(frozen=True)
class Payment:
    """A paid Checkout session."""

    payment_intent: str  # the session id when the session has no PaymentIntent
    session_id: str
    organization_id: uuid.UUID
    package: str
    credits_micro: int


@dataclass(frozen=True)
class Refund:
    """A charge's refunds so far, as Stripe reports them on `charge.refunded`."""

    payment_intent: str
    charge_id: str
    amount_cents: int  # what the charge took
    refunded_cents: int  # refunded so far, all refunds together


@dataclass(frozen=True)
class Applied:
    credited_micro: int  # booked by this call; 0 when the payment had been credited before
    reversed_micro: int  # refunded by this call
    paid: bool  # the payment has been seen; False: a refund is waiting for it


# Both upserts lock the row until the transaction ends, so the events of one payment are
# applied one at a time. The first session seen for a PaymentIntent is the one credited.
_PAYMENT = """
INSERT INTO stripe_payments AS p
       (payment_intent, organization_id, session_id, package, credits_micro)
SELECT $1, o.id, $3, $4, $5 FROM organizations o WHERE o.id = $2
    ON CONFLICT (payment_intent) DO UPDATE
   SET organization_id = coalesce(p.organization_id, EXCLUDED.organization_id),
       session_id = coalesce(p.session_id, EXCLUDED.session_id),
       package = coalesce(p.package, EXCLUDED.package),
       credits_micro = coalesce(p.credits_micro, EXCLUDED.credits_micro)
RETURNING p.*"""

# Stripe reports the cumulative amount refunded; an older, smaller report never lowers it.
_REFUND = """
INSERT INTO stripe_payments AS p (payment_intent, charge_id, amount_cents, refunded_cents)
VALUES ($1, $2, $3, $4)
    ON CONFLICT (payment_intent) DO UPDATE
   SET charge_id = coalesce(p.charge_id, EXCLUDED.charge_id),
       amount_cents = coalesce(p.amount_cents, EXCLUDED.amount_cents),
       refunded_cents = least(greatest(p.refunded_cents, EXCLUDED.refunded_cents),
                              coalesce(p.amount_cents, EXCLUDED.amount_cents))
RETURNING p.*"""


async def record_payment(pool: asyncpg.Pool, payment: Payment) -> Applied:
    """Credit a paid session's package (idempotent by session), then reverse any refund
    that arrived before it. Raises UnknownOrganization for an organization not in the ledger."""
    with translated():
        async with pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                _PAYMENT,
                payment.payment_intent,
                payment.organization_id,
                payment.session_id,
                payment.package,
                payment.credits_micro,
            )
            if row is None:
                raise UnknownOrganization(f"unknown organization {payment.organization_id}")
            posted = await transactions.post(
                conn,
                row["organization_id"],
                TransactionType.TOPUP_PURCHASE,
                row["credits_micro"],
                f"stripe:checkout:{row['session_id']}",
                description=f"Top-up: {row['package']} (Stripe Checkout)",
                metadata={
                    "session_id": row["session_id"],
                    "payment_intent": row["payment_intent"],
                    "package": row["package"],
                },
            )
            reversed_micro = await _reverse_refunds(conn, row)
    credited = 0 if posted.replayed else posted.transaction.amount_micro
    return Applied(credited, reversed_micro, paid=True)


async def record_refund(pool: asyncpg.Pool, refund: Refund) -> Applied:
    """Record how much of a charge is refunded and reverse the credits of the refunded share
    not reversed yet; before its payment has been seen, only record it."""
    with translated():
        async with pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                _REFUND,
                refund.payment_intent,
                refund.charge_id,
                refund.amount_cents,
                refund.refunded_cents,
            )
            assert row is not None  # an upsert always returns its row
            reversed_micro = await _reverse_refunds(conn, row)
    return Applied(0, reversed_micro, paid=row["credits_micro"] is not None)


def refunded_share_micro(credits_micro: int, refunded_cents: int, amount_cents: int) -> int:
    """The credits a refund takes back: its share of the charge, rounded down (in the
    customer's favour, and exact for a full refund)."""
    return credits_micro * min(refunded_cents, amount_cents) // amount_cents


async def _reverse_refunds(conn: Conn, row: asyncpg.Record) -> int:
    """Book a refund entry for the refunded share not reversed yet; the locked row remembers
    how much has been. The debit takes bonus credits, then monthly, then the overdraft."""
    if row["credits_micro"] is None or not row["refunded_cents"]:
        return 0
    target = refunded_share_micro(row["credits_micro"], row["refunded_cents"], row["amount_cents"])
    due = target - int(row["reversed_micro"])
    if due <= 0:
        return 0
    await transactions.post(
        conn,
        row["organization_id"],
        TransactionType.REFUND,
        -due,
        f"stripe:refund:{row['charge_id']}:{row['refunded_cents']}",
        description=f"Refund of a {row['package']} top-up (Stripe)",
        metadata={
            "session_id": row["session_id"],
            "payment_intent": row["payment_intent"],
            "charge_id": row["charge_id"],
            "refunded_cents": row["refunded_cents"],
            "amount_cents": row["amount_cents"],
        },
    )
    await conn.execute(
        "UPDATE stripe_payments SET reversed_micro = $2 WHERE payment_intent = $1",
        row["payment_intent"],
        target,
    )
    return due
