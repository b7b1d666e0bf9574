"""Holds and settlements in batches (sql/0007_credit_batches.up.sql): one statement per batch,
each item's outcome its own; the single operations on top of them; and GroupCommit, which
batches concurrent callers, releases the holds of cancelled ones and falls back to one item at
a time when a batch fails as a whole."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

import asyncpg
import pytest

from gateway.config import Config
from ledger import balances, catalog_sync, db, migrations, reservations
from ledger.check import check_ledger
from ledger.db import Conn
from ledger.errors import (
    IdempotencyConflict,
    InsufficientCredits,
    InvalidArgument,
    LedgerError,
    LedgerUnavailable,
    UnknownCatalogEntry,
    UnknownOrganization,
    UnknownReservation,
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
from tests.ledger.helpers import CREDIT, TTL_S, counts, entries, hold, new_org

CONSUMPTION = TransactionType.CONSUMPTION
PENDING, SETTLED = ReservationStatus.PENDING, ReservationStatus.SETTLED
_R = TypeVar("_R")

_RESERVE_BATCH = "SELECT * FROM credit_reserve_batch($1, $2, $3, $4, $5, $6, $7, $8, $9)"
_SETTLE_BATCH = (
    "SELECT * FROM credit_settle_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
)


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


async def _alone(conn: Conn, r: HoldRequest) -> Reservation | LedgerError:
    """What `reservations.reserve` gives for one request: its hold or its error."""
    try:
        return await reservations.reserve(
            conn,
            r.organization_id,
            r.key,
            minimum_micro=r.minimum_micro,
            requested_micro=r.requested_micro,
            ttl_s=r.ttl_s,
            capability=r.capability,
            quality=r.quality,
            model=r.model,
            request_id=r.request_id,
        )
    except LedgerError as exc:
        return exc


def _shape(outcome: Reservation | LedgerError) -> tuple[object, ...]:
    """An outcome without what differs between two organizations (ids, times)."""
    if isinstance(outcome, Reservation):
        return (outcome.status, outcome.amount_micro, outcome.spendable_micro, outcome.replayed)
    return (type(outcome), str(outcome))


async def _reservation_row(conn: Conn, org: uuid.UUID, key: str) -> dict[str, Any]:
    row = await conn.fetchrow(
        """SELECT status, amount_micro, charged_micro, release_reason
             FROM credit_reservations WHERE organization_id = $1 AND idempotency_key = $2""",
        org,
        key,
    )
    assert row is not None
    return dict(row)


def _mixed_holds(pro: uuid.UUID, free: uuid.UUID, missing: uuid.UUID) -> list[HoldRequest]:
    return [
        HoldRequest(pro, "a1", 100 * CREDIT, 100 * CREDIT, 600, "question_generation", "fast",
                    "gpt-4o-mini", "req-a1"),
        HoldRequest(free, "b1", 5 * CREDIT, 8 * CREDIT, TTL_S),
        HoldRequest(free, "b-big", 15 * CREDIT, 15 * CREDIT, TTL_S),  # 12 left: refused
        HoldRequest(missing, "x", CREDIT, CREDIT, TTL_S),
        HoldRequest(pro, "cap", 1, 2, TTL_S, capability="no_such_thing"),
        HoldRequest(pro, "bad", 3, 2, TTL_S),  # minimum above requested
        HoldRequest(pro, "pre", 2 * CREDIT, 3 * CREDIT, TTL_S),  # held before as 2..2
        HoldRequest(pro, "twice", CREDIT, 4 * CREDIT, TTL_S),
        HoldRequest(pro, "twice", CREDIT, 4 * CREDIT, TTL_S),  # a replay of the one above
        HoldRequest(free, "b2", CREDIT, 50 * CREDIT, TTL_S),  # clamped to what is left
    ]  # fmt: skip


async def test_mixed_reserve_batch_gives_each_item_its_own_outcome(pool: asyncpg.Pool) -> None:
    pro, free = await new_org(pool, "pro"), await new_org(pool, "free")
    twin_pro, twin_free = await new_org(pool, "pro"), await new_org(pool, "free")
    missing = uuid.uuid4()
    for org in (pro, twin_pro):
        await hold(pool, org.id, "pre", 2 * CREDIT, 2 * CREDIT)
    before = {o.id: await counts(pool, o.id) for o in (pro, free)}
    started = datetime.now(UTC)

    results = await reservations.reserve_batch(pool, _mixed_holds(pro.id, free.id, missing))
    singles = [await _alone(pool, r) for r in _mixed_holds(twin_pro.id, twin_free.id, missing)]

    assert [_shape(r) for r in results] == [_shape(r) for r in singles]  # as if alone
    a1, b1, b_big, unknown_org, cap, bad, conflict, twice, again, b2 = results
    assert isinstance(a1, Reservation) and isinstance(b1, Reservation)
    assert isinstance(twice, Reservation) and isinstance(again, Reservation)
    assert isinstance(b2, Reservation)
    assert (a1.organization_id, a1.status, a1.amount_micro, a1.spendable_micro, a1.replayed) == (
        pro.id, PENDING, 100 * CREDIT, 433 * CREDIT, False)  # fmt: skip
    assert (b1.organization_id, b1.amount_micro, b1.spendable_micro) == (
        free.id, 8 * CREDIT, 12 * CREDIT)  # fmt: skip
    assert isinstance(b_big, InsufficientCredits)
    assert (b_big.required_micro, b_big.spendable_micro) == (15 * CREDIT, 12 * CREDIT)
    assert isinstance(unknown_org, UnknownOrganization)
    assert str(unknown_org) == f"unknown organization {missing}"
    assert isinstance(cap, UnknownCatalogEntry) and str(cap) == "unknown capability no_such_thing"
    assert isinstance(bad, InvalidArgument)
    assert str(bad) == "invalid reservation amounts: minimum 3, requested 2"
    assert isinstance(conflict, IdempotencyConflict)
    assert (twice.amount_micro, twice.spendable_micro, twice.replayed) == (
        4 * CREDIT, 429 * CREDIT, False)  # fmt: skip
    assert (again.id, again.amount_micro, again.spendable_micro, again.replayed) == (
        twice.id, 4 * CREDIT, 429 * CREDIT, True)  # fmt: skip
    assert (b2.amount_micro, b2.spendable_micro, b2.replayed) == (12 * CREDIT, 0, False)
    ttl = timedelta(seconds=600)
    assert started + ttl - timedelta(seconds=5) < a1.expires_at < datetime.now(UTC) + ttl
    long = timedelta(seconds=TTL_S)
    assert started + long - timedelta(seconds=5) < b2.expires_at < datetime.now(UTC) + long

    # the refusal is remembered; nothing is written for the failed items
    refusal = await _reservation_row(pool, free.id, "b-big")
    assert (refusal["status"], refusal["amount_micro"]) == ("rejected", 0)
    stored = await pool.fetchrow(
        """SELECT c.unique_name AS capability, q.unique_name AS quality, r.model, r.request_id
             FROM credit_reservations r
             LEFT JOIN ai_capabilities c ON c.id = r.ai_capability_id
             LEFT JOIN quality_levels q ON q.id = r.quality_level_id
            WHERE r.id = $1""",
        a1.id,
    )
    assert stored is not None
    assert dict(stored) == {"capability": "question_generation", "quality": "fast",
                            "model": "gpt-4o-mini", "request_id": "req-a1"}  # fmt: skip
    for key in ("cap", "bad"):
        assert (
            await pool.fetchval(
                "SELECT count(*) FROM credit_reservations WHERE organization_id = $1 AND "
                "idempotency_key = $2",
                pro.id,
                key,
            )
            == 0
        )
    assert await counts(pool, pro.id) == (before[pro.id][0], before[pro.id][1] + 2)  # a1, twice
    assert await counts(pool, free.id) == (before[free.id][0], before[free.id][1] + 3)

    # balances moved by the granted holds only
    for org, held, spendable in ((pro, 106, 429), (free, 20, 0)):
        balance = await balances.get_balance(pool, org.id)
        assert balance.reserved_credits_micro == held * CREDIT
        assert balance.spendable_micro == spendable * CREDIT
        assert balance.available_micro == (525 if org is pro else 20) * CREDIT


async def test_holds_in_a_batch_see_the_earlier_items(pool: asyncpg.Pool) -> None:
    org = await new_org(pool, "free")  # 20 credits, no overdraft: six holds of 3 fit
    requests = [HoldRequest(org.id, f"eq-{i}", 3 * CREDIT, 3 * CREDIT, TTL_S) for i in range(8)]
    requests.append(HoldRequest(org.id, "small", 2 * CREDIT, 2 * CREDIT, TTL_S))
    results = await reservations.reserve_batch(pool, requests)

    granted = results[:6]
    assert all(isinstance(r, Reservation) for r in granted)
    assert [r.spendable_micro for r in granted if isinstance(r, Reservation)] == [
        17 * CREDIT, 14 * CREDIT, 11 * CREDIT, 8 * CREDIT, 5 * CREDIT, 2 * CREDIT]  # fmt: skip
    for refused in results[6:8]:
        assert isinstance(refused, InsufficientCredits)
        assert (refused.required_micro, refused.spendable_micro) == (3 * CREDIT, 2 * CREDIT)
    last = results[8]  # a refusal does not stop the items after it
    assert isinstance(last, Reservation)
    assert (last.amount_micro, last.spendable_micro) == (2 * CREDIT, 0)
    rows = await pool.fetch(
        "SELECT idempotency_key, status FROM credit_reservations WHERE organization_id = $1",
        org.id,
    )
    status = {row["idempotency_key"]: row["status"] for row in rows}
    assert [status[r.key] for r in requests] == ["pending"] * 6 + ["rejected"] * 2 + ["pending"]
    assert (await balances.get_balance(pool, org.id)).reserved_credits_micro == 20 * CREDIT


async def test_mixed_settle_batch_gives_each_item_its_own_outcome(pool: asyncpg.Pool) -> None:
    pro, free = await new_org(pool, "pro"), await new_org(pool, "free")
    h1 = await reservations.reserve(
        pool, pro.id, "h1", minimum_micro=10 * CREDIT, requested_micro=10 * CREDIT,
        ttl_s=TTL_S, capability="question_generation", quality="fast", model="gpt-4o-mini",
    )  # fmt: skip
    h2 = await hold(pool, pro.id, "h2", 5 * CREDIT, 5 * CREDIT)
    h3 = await hold(pool, free.id, "h3", 4 * CREDIT, 4 * CREDIT)
    earlier = await reservations.settle(pool, pro.id, h2.id, 3 * CREDIT)
    missing = uuid.uuid4()
    snapshot = ChargeSnapshot(
        model="gpt-4o", provider="openai", input_usd_per_mtok=Decimal("0.15"),
        output_usd_per_mtok=Decimal("0.6"), credit_multiplier=Decimal("1.5"),
        credits_per_usd=Decimal("100"), prompt_tokens=100, completion_tokens=200,
        estimated_micro=9 * CREDIT, metadata={"id": "chatcmpl-1"},
    )  # fmt: skip
    before = await counts(pool, pro.id), await counts(pool, free.id)

    results = await reservations.settle_batch(
        pool,
        [
            SettleRequest(pro.id, h1.id, 7 * CREDIT, snapshot),
            SettleRequest(free.id, h3.id, 12 * CREDIT),  # above the hold: the overage is booked
            SettleRequest(pro.id, h2.id, 3 * CREDIT),  # settled before, same charge
            SettleRequest(pro.id, h2.id, 2 * CREDIT),  # settled before, another charge
            SettleRequest(pro.id, missing, CREDIT),
            SettleRequest(pro.id, h3.id, CREDIT),  # another organization's hold
            SettleRequest(pro.id, h1.id, -1),
            SettleRequest(pro.id, h1.id, 7 * CREDIT),  # settled by the first item
            SettleRequest(missing, h1.id, CREDIT),
        ],
    )

    s1, s3, replay, conflict, unknown, foreign, negative, replay1, no_org = results
    assert isinstance(s1, Settlement) and isinstance(s3, Settlement)
    assert isinstance(replay, Settlement) and isinstance(replay1, Settlement)
    assert s1 == Settlement(SETTLED, True, s1.transaction_id, 7 * CREDIT, 515 * CREDIT,
                            525 * CREDIT, 500 * CREDIT)  # fmt: skip
    assert s3 == Settlement(SETTLED, True, s3.transaction_id, 12 * CREDIT, 8 * CREDIT,
                            8 * CREDIT, 10 * CREDIT)  # fmt: skip
    assert replay == Settlement(SETTLED, False, earlier.transaction_id, 3 * CREDIT,
                                515 * CREDIT, 525 * CREDIT, 500 * CREDIT)  # fmt: skip
    assert replay1 == Settlement(SETTLED, False, s1.transaction_id, 7 * CREDIT, 515 * CREDIT,
                                 525 * CREDIT, 500 * CREDIT)  # fmt: skip
    assert isinstance(conflict, IdempotencyConflict)
    assert str(conflict) == f"reservation {h2.id} was settled for a different amount"
    assert isinstance(unknown, UnknownReservation)
    assert str(unknown) == f"unknown reservation {missing}"
    assert isinstance(foreign, UnknownReservation)
    assert isinstance(negative, InvalidArgument) and str(negative) == "invalid charge -1"
    assert isinstance(no_org, UnknownOrganization)

    # one consumption entry per applied settlement, the rest of each hold given back
    assert await counts(pool, pro.id) == (before[0][0] + 1, before[0][1])
    assert await counts(pool, free.id) == (before[1][0] + 1, before[1][1])
    t1, t2 = await entries(pool, pro.id, CONSUMPTION)
    assert (t1.id, t2.id) == (s1.transaction_id, earlier.transaction_id)
    assert (t1.amount_micro, t1.monthly_micro, t1.bonus_micro, t1.overdraft_micro) == (
        -7 * CREDIT, -7 * CREDIT, 0, 0)  # fmt: skip
    assert (t1.reservation_id, t1.reserved_micro, t1.estimated_credits_micro) == (
        h1.id, 10 * CREDIT, 9 * CREDIT)  # fmt: skip
    assert (t1.capability, t1.quality, t1.model, t1.provider) == (
        "question_generation", "fast", "gpt-4o", "openai")  # fmt: skip
    assert (t1.prompt_tokens, t1.completion_tokens) == (100, 200)
    assert (t1.input_usd_per_mtok, t1.output_usd_per_mtok, t1.credit_multiplier) == (
        Decimal("0.15"), Decimal("0.6"), Decimal("1.5"))  # fmt: skip
    extra = await pool.fetchrow(
        "SELECT credits_per_usd, provider_metadata FROM credit_transactions WHERE id = $1",
        t1.id,
    )
    assert extra is not None and extra["credits_per_usd"] == Decimal("100")
    assert json.loads(extra["provider_metadata"]) == {"id": "chatcmpl-1"}
    [t3] = await entries(pool, free.id, CONSUMPTION)
    assert (t3.id, t3.amount_micro, t3.monthly_micro, t3.bonus_micro, t3.overdraft_micro) == (
        s3.transaction_id, -12 * CREDIT, -10 * CREDIT, -2 * CREDIT, 0)  # fmt: skip
    assert (t3.reserved_micro, t3.overage_micro, t3.model) == (4 * CREDIT, 8 * CREDIT, None)
    assert await _reservation_row(pool, pro.id, "h1") == {
        "status": "settled", "amount_micro": 10 * CREDIT, "charged_micro": 7 * CREDIT,
        "release_reason": None}  # fmt: skip
    assert (await _reservation_row(pool, pro.id, "h2"))["charged_micro"] == 3 * CREDIT

    pro_balance = await balances.get_balance(pool, pro.id)
    assert (pro_balance.reserved_credits_micro, pro_balance.monthly_remaining_micro) == (
        0, 490 * CREDIT)  # fmt: skip
    assert (pro_balance.bonus_credits_micro, pro_balance.used_this_period_micro) == (
        25 * CREDIT, 10 * CREDIT)  # fmt: skip
    free_balance = await balances.get_balance(pool, free.id)
    assert (free_balance.reserved_credits_micro, free_balance.available_micro) == (0, 8 * CREDIT)
    assert (free_balance.monthly_remaining_micro, free_balance.bonus_credits_micro) == (
        0, 8 * CREDIT)  # fmt: skip


async def test_single_operations_still_raise_their_errors(pool: asyncpg.Pool) -> None:
    org = await new_org(pool, "free")
    missing = uuid.uuid4()
    with pytest.raises(InvalidArgument, match="^invalid reservation amounts: minimum 3, "):
        await hold(pool, org.id, "k", 3, 2)
    with pytest.raises(UnknownOrganization, match=f"^unknown organization {missing}$"):
        await hold(pool, missing, "k", 1, 2)
    with pytest.raises(InsufficientCredits):
        await hold(pool, org.id, "too-big", 21 * CREDIT, 21 * CREDIT)
    held = await hold(pool, org.id, "ok", CREDIT, CREDIT)
    with pytest.raises(UnknownReservation):
        await reservations.settle(pool, org.id, missing, CREDIT)
    await reservations.settle(pool, org.id, held.id, CREDIT)
    with pytest.raises(IdempotencyConflict):
        await reservations.settle(pool, org.id, held.id, 2)
    # the SQL functions raise the item's SQLSTATE and keep their 0004 columns
    with pytest.raises(asyncpg.PostgresError) as raw:
        await pool.fetch("SELECT * FROM credit_reserve($1, 'raw', 1, 2, 60)", missing)
    assert raw.value.sqlstate == "GL002"
    with pytest.raises(asyncpg.PostgresError) as raw:
        await pool.fetch("SELECT * FROM credit_settle($1, $2, -5)", org.id, held.id)
    assert raw.value.sqlstate == "GL001"
    row = await pool.fetchrow("SELECT * FROM credit_reserve($1, 'raw', 1, 2, 60)", org.id)
    assert row is not None and list(row.keys()) == [
        "reservation_id", "status", "amount_micro", "spendable_micro", "expires_at",
        "replayed"]  # fmt: skip
    assert await counts(pool, org.id) == (3, 3)  # two entries at creation, one consumption


async def test_arrays_of_different_lengths_are_refused_and_empty_batches_do_nothing(
    pool: asyncpg.Pool,
) -> None:
    org = await new_org(pool, "pro")
    before = await counts(pool, org.id)
    with pytest.raises(InvalidArgument, match="batch arrays differ in length"):
        await db.fetch(
            pool, _RESERVE_BATCH, [org.id, org.id], ["a", "b"], [1, 1], [2, 2], [60, 60],
            [None, None], [None, None], [None, None], ["only-one"],
        )  # fmt: skip
    held = await hold(pool, org.id, "h", CREDIT, CREDIT)
    with pytest.raises(InvalidArgument, match="batch arrays differ in length"):
        await db.fetch(
            pool, _SETTLE_BATCH, [org.id], [held.id], [1, 2], [None], [None], [None], [None],
            [None], [None], [None], [None], [None], [None],
        )  # fmt: skip
    assert await counts(pool, org.id) == (before[0], before[1] + 1)  # only the hold "h"
    assert (await balances.get_balance(pool, org.id)).reserved_credits_micro == CREDIT
    assert await reservations.reserve_batch(pool, []) == []
    assert await reservations.settle_batch(pool, []) == []
    assert await counts(pool, org.id) == (before[0], before[1] + 1)


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

    assert await _reservation_row(pool, org.id, "abandoned") == {
        "status": "released", "amount_micro": 4 * CREDIT, "charged_micro": None,
        "release_reason": ABANDONED_RELEASE_REASON}  # fmt: skip
    # a replayed hold is not the cancelled caller's to give back
    assert (await _reservation_row(pool, org.id, "earlier"))["status"] == "pending"
    assert (await _reservation_row(pool, org.id, "waited"))["status"] == "pending"
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
    assert await _reservation_row(pool, org.id, "to-settle") == {
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
    assert (await _reservation_row(pool, org.id, "bad"))["status"] == "pending"
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


async def _has_batches(conn: asyncpg.Connection) -> bool:
    names: Sequence[str] = ("credit_reserve_batch", "credit_settle_batch", "credit_check_batch")
    found = await conn.fetchval(
        "SELECT count(*) FROM pg_proc WHERE proname = ANY($1::text[])", list(names)
    )
    assert found in (0, len(names))
    return bool(found)


async def _single_operations_work(conn: asyncpg.Connection, tag: str) -> None:
    org = await new_org(conn, "pro")
    held = await hold(conn, org.id, f"{tag}-hold", CREDIT, 2 * CREDIT)
    assert (held.status, held.amount_micro, held.spendable_micro) == (PENDING, 2 * CREDIT,
                                                                      533 * CREDIT)  # fmt: skip
    again = await hold(conn, org.id, f"{tag}-hold", CREDIT, 2 * CREDIT)
    assert (again.id, again.replayed) == (held.id, True)
    done = await reservations.settle(conn, org.id, held.id, CREDIT)
    assert (done.applied, done.available_micro, done.spendable_micro) == (
        True, 524 * CREDIT, 534 * CREDIT)  # fmt: skip
    with pytest.raises(InsufficientCredits):
        await hold(conn, org.id, f"{tag}-big", 600 * CREDIT, 600 * CREDIT)
    with pytest.raises(UnknownOrganization):
        await hold(conn, uuid.uuid4(), f"{tag}-nobody", 1, 2)
    with pytest.raises(IdempotencyConflict):
        await reservations.settle(conn, org.id, held.id, 2 * CREDIT)
    with pytest.raises(InvalidArgument):
        await reservations.settle(conn, org.id, held.id, -1)


async def test_migration_0007_down_and_up_keeps_the_single_operations(
    empty_db: asyncpg.Connection, config: Config
) -> None:
    await migrations.up(empty_db)
    await catalog_sync.seed(empty_db, config)
    assert await _has_batches(empty_db)
    rolled_back = await migrations.down(empty_db, 2)  # 0008 (the check), then 0007
    assert [m.version for m in rolled_back] == [8, 7]
    assert not await _has_batches(empty_db)
    await _single_operations_work(empty_db, "down")  # the 0004 functions are back

    applied = await migrations.up(empty_db)
    assert [m.version for m in applied] == [7, 8]
    assert await _has_batches(empty_db)
    await _single_operations_work(empty_db, "up")
    org = await new_org(empty_db, "free")
    [batched] = await reservations.reserve_batch(
        empty_db, [HoldRequest(org.id, "batched", CREDIT, CREDIT, TTL_S)]
    )
    assert isinstance(batched, Reservation) and batched.spendable_micro == 19 * CREDIT
    assert await check_ledger(empty_db) == []


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
