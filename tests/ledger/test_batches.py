"""Holds and settlements in batches (sql/0007_credit_batches.up.sql, 0011): one statement per
batch, each item's outcome its own and equal to the single operation's (migrations 0007 to
0012 down and up: test_batch_migrations.py). GroupCommit, which batches concurrent callers,
is tested in test_group_commit.py."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from ledger import balances, db, reservations
from ledger.db import Conn
from ledger.errors import (
    IdempotencyConflict,
    InsufficientCredits,
    InvalidArgument,
    LedgerError,
    UnknownCatalogEntry,
    UnknownOrganization,
    UnknownReservation,
)
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
PENDING, SETTLED = ReservationStatus.PENDING, ReservationStatus.SETTLED

_RESERVE_BATCH = "SELECT * FROM credit_reserve_batch($1, $2, $3, $4, $5, $6, $7, $8, $9)"
_SETTLE_BATCH = (
    "SELECT * FROM credit_settle_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
)


async def _alone(conn: Conn, r: HoldRequest) -> Reservation | LedgerError:
    """What `reservations.reserve` gives for one request: its hold or its error."""
    try:
        return await reservations.reserve_request(conn, r)
    except LedgerError as exc:
        return exc


def _shape(outcome: Reservation | LedgerError) -> tuple[object, ...]:
    """An outcome without what differs between two organizations (ids, times)."""
    if isinstance(outcome, Reservation):
        return (outcome.status, outcome.amount_micro, outcome.spendable_micro, outcome.replayed)
    return (type(outcome), str(outcome))


async def _described(conn: Conn, org: uuid.UUID) -> dict[str, tuple[str | None, ...]]:
    """An organization's holds by key: capability, quality level, model, request id."""
    rows = await conn.fetch(
        """SELECT r.idempotency_key, c.unique_name, q.unique_name, r.model, r.request_id
             FROM credit_reservations r
             LEFT JOIN ai_capabilities c ON c.id = r.ai_capability_id
             LEFT JOIN quality_levels q ON q.id = r.quality_level_id
            WHERE r.organization_id = $1""",
        org,
    )
    return {row[0]: tuple(row[1:]) for row in rows}


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
    refusal = await reservation_row(pool, free.id, "b-big")
    assert (refusal["status"], refusal["amount_micro"]) == ("rejected", 0)
    stored = (await _described(pool, pro.id))["a1"]
    assert stored == ("question_generation", "fast", "gpt-4o-mini", "req-a1")
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


async def test_a_batch_names_each_hold_its_own_capability_and_quality(pool: asyncpg.Pool) -> None:
    """The batch looks each name up once and reuses it while the items repeat it; an item
    without one, or with an unknown one, changes nothing for the items after it."""
    org = await new_org(pool, "pro")
    names = [
        ("question_generation", "fast"),
        (None, None),
        ("question_generation", "fast"),
        ("no_such_thing", "fast"),
        ("question_generation", "enhanced"),
        ("question_generation", "no_such_level"),
        ("question_generation", "enhanced"),
        ("testimonial_assembly", None),
        (None, "fast"),
        ("testimonial_assembly", "fast"),
    ]
    requests = [
        HoldRequest(org.id, f"n{i}", 1, 1, TTL_S, capability=c, quality=q)
        for i, (c, q) in enumerate(names)
    ]
    results = await reservations.reserve_batch(pool, requests)

    unknown = {3: "unknown capability no_such_thing", 5: "unknown quality level no_such_level"}
    for i, outcome in enumerate(results):
        if i in unknown:
            assert isinstance(outcome, UnknownCatalogEntry) and str(outcome) == unknown[i]
        else:
            assert isinstance(outcome, Reservation) and not outcome.replayed
    stored = {key: (c, q) for key, (c, q, _, _) in (await _described(pool, org.id)).items()}
    assert stored == {f"n{i}": pair for i, pair in enumerate(names) if i not in unknown}


async def test_a_batch_replays_the_holds_taken_before_it(pool: asyncpg.Pool) -> None:
    org, twin = await new_org(pool, "pro"), await new_org(pool, "pro")
    before = await hold(pool, org.id, "old", 2 * CREDIT, 3 * CREDIT)
    await hold(pool, twin.id, "old", 2 * CREDIT, 3 * CREDIT)
    for o in (org, twin):
        await hold(pool, o.id, "other", CREDIT, CREDIT)

    def requests(o: uuid.UUID) -> list[HoldRequest]:
        return [
            HoldRequest(o, "new", CREDIT, CREDIT, TTL_S),
            HoldRequest(o, "old", 2 * CREDIT, 3 * CREDIT, TTL_S),  # the same: replayed
            HoldRequest(o, "other", 5 * CREDIT, 5 * CREDIT, TTL_S),  # different: refused
            HoldRequest(o, "old", 2 * CREDIT, 3 * CREDIT, TTL_S),  # again
        ]

    results = await reservations.reserve_batch(pool, requests(org.id))
    singles = [await _alone(pool, r) for r in requests(twin.id)]

    assert [_shape(r) for r in results] == [_shape(r) for r in singles]
    new, old, other, again = results
    assert isinstance(new, Reservation) and not new.replayed
    assert isinstance(other, IdempotencyConflict)
    for replay in (old, again):
        assert isinstance(replay, Reservation) and replay.replayed
        assert (replay.id, replay.status, replay.amount_micro, replay.expires_at) == (
            before.id, PENDING, 3 * CREDIT, before.expires_at)  # fmt: skip
    balance = await balances.get_balance(pool, org.id)
    assert balance.reserved_credits_micro == 5 * CREDIT  # old 3, other 1, new 1


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
    assert await reservation_row(pool, pro.id, "h1") == {
        "status": "settled", "amount_micro": 10 * CREDIT, "charged_micro": 7 * CREDIT,
        "release_reason": None}  # fmt: skip
    assert (await reservation_row(pool, pro.id, "h2"))["charged_micro"] == 3 * CREDIT

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
