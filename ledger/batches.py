"""Holds and settlements in one batch (sql/0012_credit_apply_batch.up.sql): what
ledger.group sends when both kinds are waiting, one statement and one commit for all."""

from __future__ import annotations

from collections.abc import Sequence

from ledger import reservations
from ledger.db import Conn, fetch
from ledger.errors import LedgerError
from ledger.reservations import HoldRequest, Reservation, Settlement, SettleRequest

Operation = HoldRequest | SettleRequest
Outcome = Reservation | Settlement

_APPLY = "SELECT * FROM credit_apply_batch({})".format(", ".join(f"${n}" for n in range(1, 23)))


async def apply_batch(conn: Conn, requests: Sequence[Operation]) -> list[Outcome | LedgerError]:
    """Each request's outcome, in order, as `reserve` or `settle` would give it alone; the
    settlements are applied before the holds (their credits come back first)."""
    holds = [(i, r) for i, r in enumerate(requests) if isinstance(r, HoldRequest)]
    settles = [(i, r) for i, r in enumerate(requests) if isinstance(r, SettleRequest)]
    if not settles:
        return [*await reservations.reserve_batch(conn, [r for _, r in holds])]
    if not holds:
        return [*await reservations.settle_batch(conn, [r for _, r in settles])]
    rows = await fetch(
        conn,
        _APPLY,
        *reservations.settle_arrays([r for _, r in settles]),
        *reservations.hold_arrays([r for _, r in holds]),
    )
    outcomes: list[Outcome | LedgerError | None] = [None] * len(requests)
    for row in rows:
        if row["kind"] == "settle":
            place, _ = settles[row["ord"] - 1]
            outcomes[place] = reservations.settlement_outcome(row)
        else:
            place, hold = holds[row["ord"] - 1]
            outcomes[place] = reservations.reservation_outcome(hold, row)
    if any(outcome is None for outcome in outcomes):
        raise RuntimeError("credit_apply_batch left an item without its outcome")
    return [outcome for outcome in outcomes if outcome is not None]


async def apply_one(conn: Conn, request: Operation) -> Outcome:
    """One operation alone, through the single function (cheaper for one)."""
    if isinstance(request, HoldRequest):
        return await reservations.reserve_request(conn, request)
    return await reservations.settle_request(conn, request)
