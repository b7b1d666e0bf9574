"""GroupCommit (ledger/group.py): concurrent callers batched, a cancelled caller's hold
released, a batch that fails as a whole applied item by item, batches of one through the
single operations."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TypeVar

import asyncpg
import pytest

from ledger import balances
from ledger.errors import (
    InsufficientCredits,
    InvalidArgument,
    LedgerUnavailable,
)
from ledger.group import ABANDONED_RELEASE_REASON, GroupCommit
from ledger.reservations import (
    ChargeSnapshot,
    HoldRequest,
    Reservation,
    ReservationStatus,
    Settlement,
    SettleRequest,
)
from ledger.transactions import TransactionType
from tests.ledger.helpers import (
    CREDIT,
    TTL_S,
    counts,
    entries,
    hold,
    new_org,
    reservation_row,
)

CONSUMPTION = TransactionType.CONSUMPTION
PENDING = ReservationStatus.PENDING
_R = TypeVar("_R")


@dataclass(frozen=True)
class Call:
    function: str
    items: int
    failed: bool


class RecordingConn:
    """The pool, noting each ledger function called through it, with how many items it got
    and whether the statement failed."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.calls: list[Call] = []

    def _name(self, query: str, args: tuple[Any, ...]) -> tuple[str, int]:
        if "credit_apply_batch" in query:  # settlements' arrays, then the holds' from $14
            return "credit_apply_batch", len(args[0]) + len(args[13])
        for name in ("credit_reserve_batch", "credit_settle_batch"):
            if name in query:
                return name, len(args[0])
        for name in ("credit_reserve", "credit_settle", "credit_release"):
            if f"{name}(" in query:
                return name, 1
        return "other", 0

    async def _call(self, query: str, args: tuple[Any, ...], run: Awaitable[_R]) -> _R:
        name, items = self._name(query, args)
        try:
            result = await run
        except Exception:
            self.calls.append(Call(name, items, True))
            raise
        self.calls.append(Call(name, items, False))
        return result

    async def fetch(self, query: str, *args: Any, timeout: float | None = None) -> list[Any]:
        return await self._call(query, args, self.pool.fetch(query, *args, timeout=timeout))

    async def fetchrow(self, query: str, *args: Any, timeout: float | None = None) -> Any:
        return await self._call(query, args, self.pool.fetchrow(query, *args, timeout=timeout))

    async def fetchval(
        self, query: str, *args: Any, column: int = 0, timeout: float | None = None
    ) -> Any:
        run = self.pool.fetchval(query, *args, column=column, timeout=timeout)
        return await self._call(query, args, run)

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        return await self._call(query, args, self.pool.execute(query, *args, timeout=timeout))

    def of(self, function: str) -> list[Call]:
        return [c for c in self.calls if c.function == function]


def _check_batching(conn: RecordingConn, function: str, items: int, max_inflight: int) -> None:
    """Every item went in a batch of at most 32 (a batch of one through the single
    function); the batches were fewer, fuller ones: at most `max_inflight` more than the
    fewest possible (the first may leave before the rest queue)."""
    single = function.removesuffix("_batch")
    sizes = [c.items for c in conn.of(function)] + [c.items for c in conn.of(single)]
    assert sum(sizes) == items and max(sizes) <= 32
    fewest = -(-items // 32)
    assert fewest <= len(sizes) <= fewest + max_inflight
    assert not any(c.failed for c in conn.calls)


def _retried_item_by_item(conn: RecordingConn, function: str, single: str, items: int) -> None:
    """Exactly one batch failed, the bad item shared it with good ones, and each of its items
    was then applied alone, only the bad one failing."""
    batches, singles = conn.of(function), conn.of(single)
    [failed] = [c for c in batches if c.failed]
    assert failed.items >= 2
    retried = singles[-failed.items :]  # after the batch; any single before it was alone
    assert [c.failed for c in retried].count(True) == 1
    alone = len(singles) - failed.items
    assert sum(c.items for c in batches) + alone == items


async def test_group_commit_batches_a_stampede_and_grants_exactly_what_fits(
    pool: asyncpg.Pool,
) -> None:
    org = await new_org(pool, "pro")  # 535 credits to hold: 356 holds of 1.5
    conn = RecordingConn(pool)
    gc = GroupCommit(conn, max_batch=32, max_inflight=2)
    a = 1_500_000
    results = await asyncio.gather(
        *(gc.reserve(HoldRequest(org.id, f"gc-{i}", a, a, TTL_S)) for i in range(500)),
        return_exceptions=True,
    )
    granted = [r for r in results if isinstance(r, Reservation)]
    refused = [r for r in results if not isinstance(r, Reservation)]
    assert len(granted) == 535 * CREDIT // a == 356 and len({r.id for r in granted}) == 356
    assert len(refused) == 144 and all(isinstance(e, InsufficientCredits) for e in refused)
    # fewer batches than calls, none above max_batch
    batches, items = gc.stats()["reserve"]
    assert items == 500 and batches == len(conn.calls) < 500
    _check_batching(conn, "credit_reserve_batch", 500, max_inflight=2)
    held = await balances.get_balance(pool, org.id)
    assert (held.reserved_credits_micro, held.spendable_micro) == (356 * a, CREDIT)

    settled = await asyncio.gather(
        *(gc.settle(SettleRequest(org.id, r.id, CREDIT)) for r in granted)
    )
    assert all(s.applied for s in settled) and len({s.transaction_id for s in settled}) == 356
    batches, items = gc.stats()["settle"]
    sent = len(conn.of("credit_settle_batch")) + len(conn.of("credit_settle"))
    assert items == 356 and batches == sent < 356
    _check_batching(conn, "credit_settle_batch", 356, max_inflight=2)
    await gc.drain()
    end = await balances.get_balance(pool, org.id)
    assert (end.reserved_credits_micro, end.monthly_remaining_micro) == (0, 144 * CREDIT)
    assert (end.available_micro, end.spendable_micro) == (169 * CREDIT, 179 * CREDIT)
    assert len(await entries(pool, org.id, CONSUMPTION)) == 356
    assert await counts(pool, org.id) == (2 + 356, 500)


async def test_group_commit_releases_the_hold_of_a_cancelled_caller(pool: asyncpg.Pool) -> None:
    org = await new_org(pool, "pro")
    await hold(pool, org.id, "earlier", 3 * CREDIT, 3 * CREDIT)
    gc = GroupCommit(pool)
    waited = asyncio.create_task(gc.reserve(HoldRequest(org.id, "waited", 2 * CREDIT,
                                                        2 * CREDIT, TTL_S)))  # fmt: skip
    abandoned = asyncio.create_task(gc.reserve(HoldRequest(org.id, "abandoned", 4 * CREDIT,
                                                           4 * CREDIT, TTL_S)))  # fmt: skip
    replay = asyncio.create_task(gc.reserve(HoldRequest(org.id, "earlier", 3 * CREDIT,
                                                        3 * CREDIT, TTL_S)))  # fmt: skip
    await asyncio.sleep(0)  # all three are submitted; their holds are being taken
    abandoned.cancel()
    replay.cancel()
    await gc.drain()
    with pytest.raises(asyncio.CancelledError):
        await abandoned
    with pytest.raises(asyncio.CancelledError):
        await replay
    kept = await waited
    assert (kept.status, kept.amount_micro) == (PENDING, 2 * CREDIT)
    assert gc.stats()["reserve"][1] == 3  # the hold was taken, then given back

    assert await reservation_row(pool, org.id, "abandoned") == {
        "status": "released", "amount_micro": 4 * CREDIT, "charged_micro": None,
        "release_reason": ABANDONED_RELEASE_REASON}  # fmt: skip
    # a replayed hold is not the cancelled caller's to give back
    assert (await reservation_row(pool, org.id, "earlier"))["status"] == "pending"
    assert (await reservation_row(pool, org.id, "waited"))["status"] == "pending"
    balance = await balances.get_balance(pool, org.id)
    assert balance.reserved_credits_micro == 5 * CREDIT
    assert balance.spendable_micro == 530 * CREDIT


async def test_group_commit_applies_the_settlement_of_a_cancelled_caller(
    pool: asyncpg.Pool,
) -> None:
    org = await new_org(pool, "pro")
    held = await hold(pool, org.id, "to-settle", 5 * CREDIT, 5 * CREDIT)
    gc = GroupCommit(pool)
    task = asyncio.create_task(gc.settle(SettleRequest(org.id, held.id, 2 * CREDIT)))
    await asyncio.sleep(0)
    task.cancel()
    await gc.drain()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await reservation_row(pool, org.id, "to-settle") == {
        "status": "settled", "amount_micro": 5 * CREDIT, "charged_micro": 2 * CREDIT,
        "release_reason": None}  # fmt: skip
    [txn] = await entries(pool, org.id, CONSUMPTION)
    assert (txn.amount_micro, txn.reservation_id) == (-2 * CREDIT, held.id)
    balance = await balances.get_balance(pool, org.id)
    assert (balance.reserved_credits_micro, balance.available_micro) == (0, 523 * CREDIT)


async def test_group_commit_retries_a_failed_batch_item_by_item(pool: asyncpg.Pool) -> None:
    org = await new_org(pool, "pro")
    h0 = await hold(pool, org.id, "h0", CREDIT, CREDIT)
    h1 = await hold(pool, org.id, "h1", 2 * CREDIT, 2 * CREDIT)
    h2 = await hold(pool, org.id, "h2", 3 * CREDIT, 3 * CREDIT)
    bad = await hold(pool, org.id, "bad", 4 * CREDIT, 4 * CREDIT)
    conn = RecordingConn(pool)
    # one batch at a time: whatever leaves first, the last three share a batch
    gc = GroupCommit(conn, max_inflight=1)
    overflow = ChargeSnapshot(model="gpt-4o", input_usd_per_mtok=Decimal("1e20"))  # numeric(14,6)
    results = await asyncio.gather(
        gc.settle(SettleRequest(org.id, h0.id, CREDIT)),
        gc.settle(SettleRequest(org.id, h1.id, CREDIT)),
        gc.settle(SettleRequest(org.id, bad.id, 2 * CREDIT, overflow)),
        gc.settle(SettleRequest(org.id, h2.id, 3 * CREDIT)),
        return_exceptions=True,
    )
    good0, good1, failed, good2 = results
    assert isinstance(good0, Settlement) and isinstance(good1, Settlement)
    assert isinstance(good2, Settlement)
    assert [(g.applied, g.charged_micro) for g in (good0, good1, good2)] == [
        (True, CREDIT), (True, CREDIT), (True, 3 * CREDIT)]  # fmt: skip
    assert isinstance(failed, InvalidArgument) and not isinstance(failed, LedgerUnavailable)
    _retried_item_by_item(conn, "credit_settle_batch", "credit_settle", 4)
    # nothing of the bad item was written: its hold is still pending
    assert (await reservation_row(pool, org.id, "bad"))["status"] == "pending"
    consumed = await entries(pool, org.id, CONSUMPTION)
    assert {t.reservation_id for t in consumed} == {h0.id, h1.id, h2.id} and len(consumed) == 3
    balance = await balances.get_balance(pool, org.id)
    assert (balance.reserved_credits_micro, balance.available_micro) == (
        4 * CREDIT, 520 * CREDIT)  # fmt: skip
    later = await gc.settle(SettleRequest(org.id, bad.id, 2 * CREDIT))
    assert (later.applied, later.available_micro) == (True, 518 * CREDIT)

    # the same for holds: a NUL byte fails the whole statement, the good holds are taken
    conn.calls.clear()
    outcomes = await asyncio.gather(
        gc.reserve(HoldRequest(org.id, "r0", CREDIT, CREDIT, TTL_S)),
        gc.reserve(HoldRequest(org.id, "r1", CREDIT, CREDIT, TTL_S)),
        gc.reserve(HoldRequest(org.id, "r-bad", CREDIT, CREDIT, TTL_S, model="gpt\x00")),
        gc.reserve(HoldRequest(org.id, "r2", CREDIT, CREDIT, TTL_S)),
        return_exceptions=True,
    )
    r0, r1, r_bad, r2 = outcomes
    assert isinstance(r0, Reservation) and isinstance(r1, Reservation)
    assert isinstance(r2, Reservation)
    assert isinstance(r_bad, InvalidArgument)
    _retried_item_by_item(conn, "credit_reserve_batch", "credit_reserve", 4)
    keys = await pool.fetch(
        "SELECT idempotency_key FROM credit_reservations WHERE organization_id = $1",
        org.id,
    )
    assert "r-bad" not in {k["idempotency_key"] for k in keys} and len(keys) == 7
    assert (await balances.get_balance(pool, org.id)).reserved_credits_micro == 3 * CREDIT


async def test_group_commit_with_batches_of_one_calls_the_single_operations(
    pool: asyncpg.Pool,
) -> None:
    """max_batch=1 (batching off, e.g. on Citus) goes through credit_reserve/credit_settle."""
    org = await new_org(pool, "pro")
    conn = RecordingConn(pool)
    group = GroupCommit(conn, max_batch=1)
    holds = await asyncio.gather(
        *(group.reserve(HoldRequest(org.id, f"one-{i}", CREDIT, CREDIT, TTL_S)) for i in range(4))
    )
    await asyncio.gather(*(group.settle(SettleRequest(org.id, h.id, CREDIT // 2)) for h in holds))
    assert conn.of("credit_reserve_batch") == [] and conn.of("credit_settle_batch") == []
    assert len(conn.of("credit_reserve")) == 4 and len(conn.of("credit_settle")) == 4
    assert await counts(pool, org.id) == (2 + 4, 4)  # allocation, welcome bonus, 4 charges


async def test_group_commit_keeps_its_connections_between_batches(
    pool: asyncpg.Pool, database_url: str
) -> None:
    """A connection per batch in flight stays out of the pool, reused, at most half the
    pool; drain gives them back."""
    org = await new_org(pool, "pro")
    async with asyncpg.create_pool(database_url, min_size=6, max_size=6) as own:
        gc = GroupCommit(own, max_inflight=4)
        for n in range(5):  # one after the other: one connection, used again and again
            held = await gc.reserve(HoldRequest(org.id, f"one-{n}", CREDIT, CREDIT, TTL_S))
            await gc.settle(SettleRequest(org.id, held.id, CREDIT // 2))
        assert own.get_idle_size() == 5
        # a burst: batches in flight at once, of which at most 6 // 2 are kept
        await asyncio.gather(
            *(gc.reserve(HoldRequest(org.id, f"burst-{n}", 1, 1, TTL_S)) for n in range(40))
        )
        assert own.get_idle_size() >= 3
        await gc.drain()
        assert own.get_idle_size() == 6
    assert await counts(pool, org.id) == (2 + 5, 45)


async def test_group_commit_replaces_a_kept_connection_that_died(
    pool: asyncpg.Pool, database_url: str
) -> None:
    org = await new_org(pool, "pro")
    settings = {"application_name": "kept-connection-test"}
    async with asyncpg.create_pool(
        database_url, min_size=2, max_size=2, server_settings=settings
    ) as own:
        gc = GroupCommit(own)
        await gc.reserve(HoldRequest(org.id, "before", CREDIT, CREDIT, TTL_S))
        killed = await pool.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'kept-connection-test'"
        )
        assert killed == 2
        await asyncio.sleep(0.2)  # the clients see their connections closed
        after = await gc.reserve(HoldRequest(org.id, "after", CREDIT, CREDIT, TTL_S))
        assert after.status is PENDING
        await gc.drain()
        assert own.get_idle_size() == 2
    assert (await reservation_row(pool, org.id, "after"))["status"] == "pending"
