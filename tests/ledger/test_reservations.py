"""Reservations under concurrency, idempotency, settlement arithmetic, expiry, bad input and
the database's own guards (SPEC §4 "Credits")."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from ledger import balances, db, reservations, transactions
from ledger.errors import (
    IdempotencyConflict,
    InsufficientCredits,
    InvalidArgument,
    LedgerError,
    LedgerImmutable,
    UnknownCatalogEntry,
    UnknownOrganization,
    UnknownReservation,
)
from ledger.reservations import Release, Reservation, ReservationStatus, Settlement
from ledger.transactions import TransactionType
from tests.ledger.helpers import CREDIT, consume, counts, entries, hold, new_org

TOPUP = TransactionType.TOPUP_PURCHASE


async def test_stampede_of_equal_holds_grants_exactly_what_fits(pool: asyncpg.Pool) -> None:
    org = await new_org(pool, "pro")
    before = await balances.get_balance(pool, org.id)
    budget = before.available_micro + before.overdraft_limit_micro
    assert budget == 535 * CREDIT  # 500 monthly + 25 welcome bonus + 10 overdraft
    a = 1_500_000
    results = await asyncio.gather(
        *(hold(pool, org.id, f"stampede-{i}", a, a) for i in range(500)),
        return_exceptions=True,
    )
    granted = [r for r in results if isinstance(r, Reservation)]
    refused = [r for r in results if not isinstance(r, Reservation)]
    assert len(granted) == budget // a == 356
    assert all(isinstance(e, InsufficientCredits) for e in refused) and len(refused) == 144
    assert {r.amount_micro for r in granted} == {a} and len({r.id for r in granted}) == 356
    after = await balances.get_balance(pool, org.id)
    assert after.reserved_credits_micro == 356 * a
    assert after.available_micro == before.available_micro  # holds do not spend
    assert after.spendable_micro == budget - 356 * a == CREDIT
    assert len(await reservations.list_pending(pool, org.id)) == 356
    assert await counts(pool, org.id) == (2, 500)  # refusals are remembered


async def test_stampede_of_random_holds_never_exceeds_the_balance(pool: asyncpg.Pool) -> None:
    org = await new_org(pool, "pro")
    budget = 535 * CREDIT
    rng = random.Random(20240611)
    asks = [
        (m, m + rng.randint(0, 3 * CREDIT))
        for m in (rng.randint(1, 3 * CREDIT) for _ in range(500))
    ]
    results = await asyncio.gather(
        *(hold(pool, org.id, f"random-{i}", lo, hi) for i, (lo, hi) in enumerate(asks)),
        return_exceptions=True,
    )
    held = 0
    partial = 0
    final = await balances.get_balance(pool, org.id)
    for (lo, hi), result in zip(asks, results, strict=True):
        if isinstance(result, Reservation):
            assert lo <= result.amount_micro <= hi
            held += result.amount_micro
            partial += result.amount_micro < hi
        else:
            assert isinstance(result, InsufficientCredits), result
            assert result.spendable_micro < lo  # refused only when the minimum did not fit
            assert final.spendable_micro < lo  # and it never fitted later either
    assert 0 < held <= budget
    assert partial <= 1  # a clamped hold takes everything that is left
    assert final.reserved_credits_micro == held
    assert final.spendable_micro == budget - held >= 0
    granted = [r for r in results if isinstance(r, Reservation)]
    assert len(granted) < 500 and len({r.id for r in granted}) == len(granted)
    assert budget - held < 3 * CREDIT  # refusals only once no minimum up to 3 credits fitted


async def test_settle_release_and_expire_race_with_one_winner(pool: asyncpg.Pool) -> None:
    org = await new_org(pool, "team")
    start = await balances.get_balance(pool, org.id)
    holds = await asyncio.gather(
        *(hold(pool, org.id, f"race-{i}", 2 * CREDIT, 2 * CREDIT) for i in range(50))
    )
    far = datetime.now(UTC) + timedelta(days=365)
    rng = random.Random(7)
    calls: list[tuple[str, uuid.UUID, Awaitable[Settlement | Release]]] = []
    for h in holds:
        ops: list[tuple[str, uuid.UUID, Awaitable[Settlement | Release]]] = [
            ("settled", h.id, reservations.settle(pool, org.id, h.id, CREDIT)),
            ("released", h.id, reservations.release(pool, org.id, h.id, "failed")),
            ("expired", h.id, reservations.expire(pool, org.id, h.id, now=far)),
        ]
        rng.shuffle(ops)
        calls.extend(ops)
    results = await asyncio.gather(*(c for _, _, c in calls))
    winners: dict[uuid.UUID, str] = {}
    for (kind, hold_id, _), result in zip(calls, results, strict=True):
        if result.applied:
            assert hold_id not in winners, "two calls resolved the same hold"
            winners[hold_id] = kind
    assert len(winners) == 50
    assert set(winners.values()) == {"settled", "released", "expired"}  # the order is shuffled
    rows = await pool.fetch(
        "SELECT id, status FROM credit_reservations WHERE organization_id = $1", org.id
    )
    final = {row["id"]: row["status"] for row in rows}
    assert final == winners
    for (_, hold_id, _), result in zip(calls, results, strict=True):
        assert result.status == winners[hold_id]  # losers report how the hold ended
    settled = sum(kind == "settled" for kind in winners.values())
    assert len(await entries(pool, org.id, TransactionType.CONSUMPTION)) == settled
    end = await balances.get_balance(pool, org.id)
    assert end.reserved_credits_micro == 0
    assert end.available_micro == start.available_micro - settled * CREDIT


async def test_same_reservation_key_fifty_times_holds_once(pool: asyncpg.Pool) -> None:
    org = await new_org(pool, "pro")
    results = await asyncio.gather(
        *(hold(pool, org.id, "storm", CREDIT, 5 * CREDIT) for _ in range(50))
    )
    assert len({r.id for r in results}) == 1
    assert sorted(r.replayed for r in results) == [False] + [True] * 49
    assert {r.amount_micro for r in results} == {5 * CREDIT}
    assert (await balances.get_balance(pool, org.id)).reserved_credits_micro == 5 * CREDIT
    assert await counts(pool, org.id) == (2, 1)
    with pytest.raises(IdempotencyConflict):
        await hold(pool, org.id, "storm", CREDIT, 6 * CREDIT)
    with pytest.raises(IdempotencyConflict):
        await hold(pool, org.id, "storm", 2 * CREDIT, 5 * CREDIT)


async def test_refused_key_stays_refused_after_a_top_up(pool: asyncpg.Pool) -> None:
    org = await new_org(pool, "free")  # 20 credits, no overdraft
    with pytest.raises(InsufficientCredits) as refused:
        await hold(pool, org.id, "too-big", 25 * CREDIT, 25 * CREDIT)
    refusal = refused.value
    assert (refusal.required_micro, refusal.spendable_micro) == (25 * CREDIT, 20 * CREDIT)
    await transactions.post(pool, org.id, TOPUP, 50 * CREDIT, "topup-1")
    with pytest.raises(InsufficientCredits) as again:
        await hold(pool, org.id, "too-big", 25 * CREDIT, 25 * CREDIT)
    assert again.value.spendable_micro == 70 * CREDIT
    fresh = await hold(pool, org.id, "too-big-retry", 25 * CREDIT, 25 * CREDIT)
    assert fresh.amount_micro == 25 * CREDIT and fresh.spendable_micro == 45 * CREDIT


async def test_settle_is_idempotent_by_reservation(pool: asyncpg.Pool) -> None:
    org = await new_org(pool, "pro")
    held = await hold(pool, org.id, "settle-twice", 4 * CREDIT, 4 * CREDIT)
    results = await asyncio.gather(
        *(reservations.settle(pool, org.id, held.id, 3 * CREDIT) for _ in range(50))
    )
    first = results[0]
    assert sum(r.applied for r in results) == 1
    assert {(r.status, r.transaction_id, r.charged_micro) for r in results} == {
        (ReservationStatus.SETTLED, results[0].transaction_id, 3 * CREDIT)
    }
    again = await reservations.settle(pool, org.id, held.id, 3 * CREDIT)
    assert not again.applied and again.transaction_id == first.transaction_id
    with pytest.raises(IdempotencyConflict):
        await reservations.settle(pool, org.id, held.id, 2 * CREDIT)
    late = await reservations.release(pool, org.id, held.id)
    assert (late.status, late.applied) == (ReservationStatus.SETTLED, False)
    balance = await balances.get_balance(pool, org.id)
    assert balance.available_micro == 522 * CREDIT and balance.reserved_credits_micro == 0
    assert len(await entries(pool, org.id, TransactionType.CONSUMPTION)) == 1


async def test_same_post_key_fifty_times_books_once(pool: asyncpg.Pool) -> None:
    org = await new_org(pool, "free")
    posts = await asyncio.gather(
        *(transactions.post(pool, org.id, TOPUP, 7 * CREDIT, "pay-1") for _ in range(50))
    )
    assert len({p.transaction.id for p in posts}) == 1
    assert sorted(p.replayed for p in posts) == [False] + [True] * 49
    assert len(await entries(pool, org.id, TOPUP)) == 1
    assert (await balances.get_balance(pool, org.id)).bonus_credits_micro == 17 * CREDIT
    with pytest.raises(IdempotencyConflict):
        await transactions.post(pool, org.id, TOPUP, 8 * CREDIT, "pay-1")
    with pytest.raises(IdempotencyConflict):
        await transactions.post(pool, org.id, TransactionType.PROMO_BONUS, 7 * CREDIT, "pay-1")


async def test_settle_below_the_hold_gives_back_the_rest(pool: asyncpg.Pool) -> None:
    org = await new_org(pool, "team")
    held = await hold(pool, org.id, "under", 10 * CREDIT, 10 * CREDIT)
    assert held.spendable_micro == 2090 * CREDIT
    done = await reservations.settle(pool, org.id, held.id, 4 * CREDIT)
    assert (done.applied, done.charged_micro) == (True, 4 * CREDIT)
    assert (done.available_micro, done.spendable_micro) == (2046 * CREDIT, 2096 * CREDIT)
    [txn] = await entries(pool, org.id, TransactionType.CONSUMPTION)
    assert (txn.id, txn.amount_micro, txn.monthly_micro, txn.bonus_micro) == (
        done.transaction_id, -4 * CREDIT, -4 * CREDIT, 0)  # fmt: skip
    assert (txn.reserved_micro, txn.overage_micro, txn.reservation_id) == (10 * CREDIT, 0, held.id)
    assert (await balances.get_balance(pool, org.id)).reserved_credits_micro == 0


async def test_settle_above_the_hold_books_the_overage(pool: asyncpg.Pool) -> None:
    org = await new_org(pool, "free")  # 10 monthly + 10 bonus, no overdraft
    done = await consume(pool, org.id, 23 * CREDIT, hold_micro=20 * CREDIT)
    assert (done.charged_micro, done.available_micro, done.spendable_micro) == (
        23 * CREDIT, -3 * CREDIT, -3 * CREDIT)  # fmt: skip
    [txn] = await entries(pool, org.id, TransactionType.CONSUMPTION)
    assert (txn.amount_micro, txn.monthly_micro, txn.bonus_micro, txn.overdraft_micro) == (
        -23 * CREDIT, -10 * CREDIT, -10 * CREDIT, -3 * CREDIT)  # fmt: skip
    assert (txn.reserved_micro, txn.overage_micro) == (20 * CREDIT, 3 * CREDIT)
    balance = await balances.get_balance(pool, org.id)
    assert (balance.monthly_remaining_micro, balance.bonus_credits_micro) == (0, 0)
    assert (balance.overdraft_used_micro, balance.used_this_period_micro) == (
        3 * CREDIT,
        23 * CREDIT,
    )
    with pytest.raises(InsufficientCredits):
        await hold(pool, org.id, "after-overage", 0, CREDIT)


async def test_hold_is_clamped_to_spendable(pool: asyncpg.Pool) -> None:
    org = await new_org(pool, "pro")
    first = await hold(pool, org.id, "first", 100 * CREDIT, 100 * CREDIT)
    assert first.spendable_micro == 435 * CREDIT
    clamped = await hold(pool, org.id, "greedy", CREDIT, 10_000 * CREDIT)
    assert (clamped.amount_micro, clamped.spendable_micro) == (435 * CREDIT, 0)
    assert (await balances.get_balance(pool, org.id)).reserved_credits_micro == 535 * CREDIT
    with pytest.raises(InsufficientCredits):
        await hold(pool, org.id, "nothing-left", 1, 1)


async def test_expire_due_only_expires_holds_past_their_ttl(pool: asyncpg.Pool) -> None:
    org = await new_org(pool, "pro")
    held: dict[int, Reservation] = {}
    for ttl in (1, 60, 300, 900, 3600):
        held[ttl] = await hold(pool, org.id, f"ttl-{ttl}", ttl * 1000, ttl * 1000, ttl_s=ttl)
    now = datetime.now(UTC) + timedelta(seconds=600)
    early = await reservations.expire(pool, org.id, held[900].id, now=now)
    assert (early.status, early.applied) == (ReservationStatus.PENDING, False)
    # Every other hold in this module's database has a ttl of TTL_S, so only ours are due.
    assert await reservations.expire_due(pool, now=now, limit=1) == 1
    assert await reservations.expire_due(pool, now=now) == 2
    assert await reservations.expire_due(pool, now=now) == 0
    rows = await pool.fetch(
        "SELECT id, status FROM credit_reservations WHERE organization_id = $1", org.id
    )
    status = {row["id"]: row["status"] for row in rows}
    expected = ["expired"] * 3 + ["pending"] * 2
    assert [status[held[t].id] for t in (1, 60, 300, 900, 3600)] == expected
    pending = {p.id for p in await reservations.list_pending(pool, org.id)}
    assert pending == {held[900].id, held[3600].id}
    assert (await balances.get_balance(pool, org.id)).reserved_credits_micro == 4_500_000


async def test_bad_input_raises_typed_errors_and_writes_nothing(pool: asyncpg.Pool) -> None:
    org = await new_org(pool, "pro")
    other = await new_org(pool, "pro")
    foreign = await hold(pool, other.id, "foreign", CREDIT, CREDIT)
    missing = uuid.uuid4()
    post, inv, types = transactions.post, InvalidArgument, TransactionType
    cases: list[tuple[Callable[[], Awaitable[object]], type[LedgerError]]] = [
        (lambda: hold(pool, org.id, "k", 0, 0), inv),
        (lambda: hold(pool, org.id, "k", -1, 2), inv),
        (lambda: hold(pool, org.id, "k", 1, -2), inv),
        (lambda: hold(pool, org.id, "k", 3, 2), inv),  # minimum above requested
        (lambda: hold(pool, org.id, "k", 1, 2, ttl_s=0), inv),
        (lambda: hold(pool, org.id, "k", 1, 2, ttl_s=-5), inv),
        (lambda: hold(pool, org.id, "", 1, 2), inv),
        (lambda: hold(pool, org.id, "k" * 256, 1, 2), inv),
        (lambda: hold(pool, org.id, "k", 1, 2, capability="no_such_thing"), UnknownCatalogEntry),
        (lambda: hold(pool, org.id, "k", 1, 2, quality="no_such_level"), UnknownCatalogEntry),
        (lambda: hold(pool, missing, "k", 1, 2), UnknownOrganization),
        (lambda: post(pool, missing, TOPUP, CREDIT, "k"), UnknownOrganization),
        (lambda: balances.get_balance(pool, missing), UnknownOrganization),
        (lambda: reservations.settle(pool, org.id, missing, 1), UnknownReservation),
        (lambda: reservations.settle(pool, org.id, foreign.id, 1), UnknownReservation),
        (lambda: reservations.release(pool, org.id, missing), UnknownReservation),
        (lambda: reservations.expire(pool, org.id, foreign.id), UnknownReservation),
        (lambda: reservations.settle(pool, org.id, foreign.id, -1), inv),
        (lambda: post(pool, org.id, types.CONSUMPTION, -CREDIT, "k"), inv),
        (lambda: post(pool, org.id, types.PLAN_ALLOCATION, CREDIT, "k"), inv),
        (lambda: post(pool, org.id, TOPUP, 0, "k"), inv),
        (lambda: post(pool, org.id, TOPUP, -CREDIT, "k"), inv),
        (lambda: post(pool, org.id, types.REFUND, CREDIT, "k"), inv),
        (lambda: post(pool, org.id, types.ADMIN_ADJUSTMENT, 0, "k"), inv),
        (lambda: post(pool, org.id, TOPUP, CREDIT, ""), inv),
        (lambda: post(pool, org.id, TOPUP, 2**63, "k"), inv),
    ]
    before = await counts(pool, org.id), await counts(pool, other.id)
    balance = await balances.get_balance(pool, org.id)
    for call, error in cases:
        with pytest.raises(error):
            await call()
    for kind in ("consumption", "plan_allocation", "monthly_expiry"):  # the SQL guard itself
        with pytest.raises(asyncpg.PostgresError) as raw:
            await pool.fetch("SELECT * FROM credit_post($1, $2, -1, 'raw')", org.id, kind)
        assert raw.value.sqlstate == "GL001"
    assert (await counts(pool, org.id), await counts(pool, other.id)) == before
    assert await balances.get_balance(pool, org.id) == balance
    assert (await hold(pool, org.id, "k" * 255, 1, 2)).amount_micro == 2  # longest key is fine


async def test_database_refuses_to_rewrite_history(pool: asyncpg.Pool) -> None:
    org = await new_org(pool, "pro")
    await consume(pool, org.id, 2 * CREDIT)
    pending = await hold(pool, org.id, "pending", CREDIT, CREDIT)
    released = await hold(pool, org.id, "released", CREDIT, CREDIT)
    await reservations.release(pool, org.id, released.id)
    history = "SELECT * FROM credit_transactions WHERE organization_id = $1 ORDER BY id"
    snapshot = await pool.fetch(history, org.id)
    statements = [
        ("UPDATE credit_transactions SET credits_amount_micro = 0 WHERE id > 0", None),
        ("UPDATE credit_transactions SET description = 'x' WHERE organization_id = $1", org.id),
        ("DELETE FROM credit_transactions WHERE organization_id = $1", org.id),
        ("UPDATE credit_reservations SET release_reason = 'x' WHERE id = $1", released.id),
        ("UPDATE credit_reservations SET status = 'settled' WHERE id = $1", released.id),
        ("UPDATE credit_reservations SET resolved_at = NULL WHERE id = $1", released.id),
        ("UPDATE credit_reservations SET amount_micro = 1 WHERE id = $1", pending.id),
        ("DELETE FROM credit_reservations WHERE id = $1", pending.id),
    ]  # fmt: skip
    for sql, arg in statements:
        args = () if arg is None else (arg,)
        with pytest.raises(asyncpg.PostgresError) as raised:
            await pool.execute(sql, *args)
        assert raised.value.sqlstate == "GL008", sql
        with pytest.raises(LedgerImmutable), db.translated():
            await pool.execute(sql, *args)
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            with pytest.raises(asyncpg.PostgresError) as truncated:
                await conn.execute("TRUNCATE credit_transactions")
            assert truncated.value.sqlstate == "GL008"
        finally:
            await tx.rollback()
    assert await pool.fetch(history, org.id) == snapshot
    assert [p.id for p in await reservations.list_pending(pool, org.id)] == [pending.id]
