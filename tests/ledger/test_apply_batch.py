"""Holds and settlements in one batch (sql/0012, ledger/batches.py): each item's outcome
its own, the settlements applied first, one statement; and GroupCommit sending both kinds
together when both are waiting."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg

from ledger import balances, batches
from ledger.errors import InsufficientCredits, UnknownReservation
from ledger.group import GroupCommit
from ledger.reservations import HoldRequest, Reservation, Settlement, SettleRequest
from ledger.transactions import TransactionType
from tests.ledger.helpers import CREDIT, TTL_S, counts, entries, hold, new_org
from tests.ledger.test_group_commit import RecordingConn


async def test_settlements_go_first_and_each_item_has_its_own_outcome(pool: asyncpg.Pool) -> None:
    org = await new_org(pool, "free")  # 20 credits, no overdraft
    big = await hold(pool, org.id, "big", 15 * CREDIT, 15 * CREDIT)  # 5 left to hold
    missing = uuid.uuid4()
    after, settled, unknown, too_big = await batches.apply_batch(
        pool,
        [
            HoldRequest(
                org.id, "after", 12 * CREDIT, 12 * CREDIT, TTL_S
            ),  # fits once big is settled
            SettleRequest(org.id, big.id, 5 * CREDIT),
            SettleRequest(org.id, missing, CREDIT),
            HoldRequest(org.id, "too-big", 30 * CREDIT, 30 * CREDIT, TTL_S),
        ],
    )
    assert isinstance(settled, Settlement) and settled.applied
    assert (settled.charged_micro, settled.available_micro) == (5 * CREDIT, 15 * CREDIT)
    assert settled.spendable_micro == 15 * CREDIT  # before the holds of the batch
    assert isinstance(after, Reservation) and not after.replayed
    assert (after.amount_micro, after.spendable_micro) == (12 * CREDIT, 3 * CREDIT)
    assert (
        isinstance(unknown, UnknownReservation) and str(unknown) == f"unknown reservation {missing}"
    )
    assert isinstance(too_big, InsufficientCredits)
    assert (too_big.required_micro, too_big.spendable_micro) == (30 * CREDIT, 3 * CREDIT)

    balance = await balances.get_balance(pool, org.id)
    assert (balance.available_micro, balance.reserved_credits_micro) == (15 * CREDIT, 12 * CREDIT)
    [entry] = await entries(pool, org.id, TransactionType.CONSUMPTION)
    assert entry.amount_micro == -5 * CREDIT


async def test_one_kind_alone_goes_through_its_own_batch(pool: asyncpg.Pool) -> None:
    org = await new_org(pool, "pro")
    conn = RecordingConn(pool)
    holds = await batches.apply_batch(
        conn, [HoldRequest(org.id, f"h{i}", CREDIT, CREDIT, TTL_S) for i in range(3)]
    )
    assert all(isinstance(h, Reservation) for h in holds)
    settled = await batches.apply_batch(
        conn, [SettleRequest(org.id, h.id, CREDIT) for h in holds if isinstance(h, Reservation)]
    )
    assert all(isinstance(s, Settlement) and s.applied for s in settled)
    assert [c.function for c in conn.calls] == ["credit_reserve_batch", "credit_settle_batch"]


async def test_group_commit_sends_waiting_holds_and_settlements_together(
    pool: asyncpg.Pool,
) -> None:
    org = await new_org(pool, "pro")  # 525 credits available, 10 of overdraft
    first = [await hold(pool, org.id, f"first-{i}", CREDIT, CREDIT) for i in range(40)]
    conn = RecordingConn(pool)
    gc = GroupCommit(conn, max_batch=32, max_inflight=2)
    results = await asyncio.gather(
        *(gc.settle(SettleRequest(org.id, h.id, CREDIT // 2)) for h in first),
        *(gc.reserve(HoldRequest(org.id, f"second-{i}", CREDIT, CREDIT, TTL_S)) for i in range(40)),
    )
    await gc.drain()
    settled, held = results[:40], results[40:]
    assert all(isinstance(s, Settlement) and s.applied for s in settled)
    assert all(isinstance(h, Reservation) and h.amount_micro == CREDIT for h in held)
    mixed = conn.of("credit_apply_batch")
    assert mixed and not any(c.failed for c in conn.calls)
    assert sum(c.items for c in conn.calls) == 80
    assert gc.stats()["settle"][1] == 40 and gc.stats()["reserve"][1] == 40
    assert await counts(pool, org.id) == (2 + 40, 80)
    balance = await balances.get_balance(pool, org.id)
    assert balance.reserved_credits_micro == 40 * CREDIT
    assert balance.available_micro == 525 * CREDIT - 40 * (CREDIT // 2)
