"""Billing periods and plans: bucket order, the monthly reset, plan changes and the overdraft
(SPEC §4 "Credits"). Time moves by passing `now=`, never by sleeping."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from ledger import accounts, balances, periods, reservations, transactions
from ledger.errors import (
    InsufficientCredits,
    InvalidArgument,
    PlanChangeNotAllowed,
    UnknownOrganization,
    UnknownPlan,
)
from ledger.periods import PlanChangeKind
from ledger.transactions import TransactionType
from tests.ledger.helpers import CREDIT, TTL_S, add_months, consume, counts, entries, new_org

ALLOCATION = TransactionType.PLAN_ALLOCATION
EXPIRY = TransactionType.MONTHLY_EXPIRY


def _buckets(t: transactions.Transaction) -> tuple[int, int, int, int]:
    return t.amount_micro, t.monthly_micro, t.bonus_micro, t.overdraft_micro


async def test_consumption_takes_monthly_first_and_bonus_survives_the_reset(
    pool: asyncpg.Pool,
) -> None:
    start = datetime.now(UTC)
    org = await new_org(pool, "pro", now=start)  # 500 monthly + 25 bonus
    await consume(pool, org.id, 100 * CREDIT)
    await consume(pool, org.id, 410 * CREDIT)
    second, first = await entries(pool, org.id, TransactionType.CONSUMPTION)
    assert _buckets(first) == (-100 * CREDIT, -100 * CREDIT, 0, 0)
    assert _buckets(second) == (-410 * CREDIT, -400 * CREDIT, -10 * CREDIT, 0)
    balance = await balances.get_balance(pool, org.id)
    assert (balance.monthly_remaining_micro, balance.bonus_credits_micro) == (0, 15 * CREDIT)
    assert balance.used_this_period_micro == 510 * CREDIT
    assert (balance.period_start, balance.period_end) == (start, add_months(start, 1))

    reset = await periods.reset_period(pool, org.id, now=start + timedelta(days=40))
    assert (reset.reset, reset.expired_micro, reset.allocated_micro, reset.plan) == (
        True, 0, 500 * CREDIT, "pro")  # fmt: skip
    assert (reset.period_start, reset.period_end) == (add_months(start, 1), add_months(start, 2))
    after = await balances.get_balance(pool, org.id)
    assert (after.monthly_remaining_micro, after.bonus_credits_micro) == (500 * CREDIT, 15 * CREDIT)
    assert after.used_this_period_micro == 0  # last period's consumption is not this period's
    assert await entries(pool, org.id, EXPIRY) == []  # nothing was left to expire
    allocations = await entries(pool, org.id, ALLOCATION)
    assert [_buckets(a) for a in allocations] == [(500 * CREDIT, 500 * CREDIT, 0, 0)] * 2


async def test_leftover_monthly_credits_expire_at_the_reset(pool: asyncpg.Pool) -> None:
    start = datetime.now(UTC)
    org = await new_org(pool, "pro", now=start)
    await consume(pool, org.id, 120 * CREDIT)
    reset = await periods.reset_period(pool, org.id, now=start + timedelta(days=40))
    assert (reset.expired_micro, reset.allocated_micro) == (380 * CREDIT, 500 * CREDIT)
    [expiry] = await entries(pool, org.id, EXPIRY)
    assert _buckets(expiry) == (-380 * CREDIT, -380 * CREDIT, 0, 0)
    latest = (await entries(pool, org.id))[0]
    assert latest.type is ALLOCATION and latest.amount_micro == 500 * CREDIT
    balance = await balances.get_balance(pool, org.id)
    assert (balance.monthly_remaining_micro, balance.bonus_credits_micro) == (
        500 * CREDIT,
        25 * CREDIT,
    )
    assert balance.available_micro == 525 * CREDIT


async def test_used_this_period_counts_this_periods_consumption_only(pool: asyncpg.Pool) -> None:
    anchor = datetime.now(UTC) - timedelta(days=20)  # the current period began 20 days ago
    org = await new_org(pool, "team", now=anchor)
    await consume(pool, org.id, 3 * CREDIT)
    await consume(pool, org.id, 4 * CREDIT, hold_micro=9 * CREDIT)
    await transactions.post(pool, org.id, TransactionType.REFUND, -2 * CREDIT, "refund-1")
    await reservations.reserve(
        pool, org.id, "open", minimum_micro=CREDIT, requested_micro=CREDIT, ttl_s=TTL_S
    )
    assert (await balances.get_balance(pool, org.id)).used_this_period_micro == 7 * CREDIT
    await periods.reset_period(pool, org.id, now=datetime.now(UTC) + timedelta(days=15))
    balance = await balances.get_balance(pool, org.id)
    assert balance.period_start == add_months(anchor, 1)
    assert balance.used_this_period_micro == 0
    assert balance.reserved_credits_micro == CREDIT  # pending holds carry over


async def test_reset_is_idempotent_and_never_early(pool: asyncpg.Pool) -> None:
    start = datetime.now(UTC)
    org = await new_org(pool, "pro", now=start)
    end = add_months(start, 1)
    for at in (start + timedelta(days=1), end - timedelta(microseconds=1)):
        early = await periods.reset_period(pool, org.id, now=at)
        assert (early.reset, early.expired_micro, early.allocated_micro) == (False, 0, 0)
        assert (early.period_start, early.period_end) == (start, end)
    assert org.id not in await periods.due_for_reset(pool, now=end - timedelta(microseconds=1))
    assert org.id in await periods.due_for_reset(pool, now=end)
    assert await counts(pool, org.id) == (2, 0)
    storm = await asyncio.gather(*(periods.reset_period(pool, org.id, now=end) for _ in range(20)))
    [first] = [r for r in storm if r.reset]  # due exactly at period_end, and reset once
    assert first.period_start == end
    assert await counts(pool, org.id) == (4, 0)  # one expiry, one allocation
    balance = await balances.get_balance(pool, org.id)
    for days in (0, 5, 20):  # still inside the next period, however short the month
        again = await periods.reset_period(pool, org.id, now=end + timedelta(days=days))
        assert (again.reset, again.expired_micro, again.allocated_micro) == (False, 0, 0)
        assert (again.period_start, again.period_end) == (end, add_months(start, 2))
    assert await counts(pool, org.id) == (4, 0)
    assert await balances.get_balance(pool, org.id) == balance
    assert org.id not in await periods.due_for_reset(pool, now=end + timedelta(days=20))


async def test_reset_after_several_months_lands_in_the_current_period(pool: asyncpg.Pool) -> None:
    start = datetime.now(UTC)
    org = await new_org(pool, "pro", now=start)
    now = start + timedelta(days=200)
    n = max(k for k in range(12) if add_months(start, k) <= now)
    assert n == 6
    reset = await periods.reset_period(pool, org.id, now=now)
    assert (reset.period_start, reset.period_end) == (
        add_months(start, n),
        add_months(start, n + 1),
    )
    assert reset.period_start <= now < reset.period_end
    assert [e.amount_micro for e in await entries(pool, org.id, ALLOCATION)] == [500 * CREDIT] * 2
    assert [e.amount_micro for e in await entries(pool, org.id, EXPIRY)] == [-500 * CREDIT]
    assert not (await periods.reset_period(pool, org.id, now=now)).reset


async def test_upgrade_applies_at_once_with_the_difference(pool: asyncpg.Pool) -> None:
    start = datetime.now(UTC)
    org = await new_org(pool, "pro", now=start)
    await consume(pool, org.id, 100 * CREDIT)
    storm = await asyncio.gather(
        *(periods.change_plan(pool, org.id, "team", direction="upgrade") for _ in range(10)),
        return_exceptions=True,
    )
    [change] = [c for c in storm if isinstance(c, periods.PlanChange)]
    assert all(isinstance(c, PlanChangeNotAllowed) for c in storm if c is not change)
    assert (change.kind, change.plan, change.adjustment_micro) == (
        PlanChangeKind.UPGRADED, "team", 1500 * CREDIT)  # fmt: skip
    [adjustment] = await entries(pool, org.id, TransactionType.PLAN_CHANGE_ADJUSTMENT)
    assert adjustment.id == change.transaction_id
    assert _buckets(adjustment) == (1500 * CREDIT, 1500 * CREDIT, 0, 0)
    balance = await balances.get_balance(pool, org.id)
    assert (balance.plan, balance.monthly_credits_micro) == ("team", 2000 * CREDIT)
    assert (balance.monthly_remaining_micro, balance.bonus_credits_micro) == (
        1900 * CREDIT,
        25 * CREDIT,
    )
    assert balance.overdraft_limit_micro == 50 * CREDIT
    assert balance.spendable_micro == (1925 + 50) * CREDIT
    assert (await accounts.get_organization(pool, org.id)).plan == "team"
    reset = await periods.reset_period(pool, org.id, now=start + timedelta(days=40))
    assert (reset.expired_micro, reset.allocated_micro) == (1900 * CREDIT, 2000 * CREDIT)


async def test_downgrade_is_scheduled_for_the_reset(pool: asyncpg.Pool) -> None:
    start = datetime.now(UTC)
    org = await new_org(pool, "team", now=start)
    balance = await balances.get_balance(pool, org.id)
    change = await periods.change_plan(pool, org.id, "free", direction="downgrade")
    assert (change.kind, change.effective_at, change.transaction_id) == (
        PlanChangeKind.DOWNGRADE_SCHEDULED, add_months(start, 1), None)  # fmt: skip
    scheduled = await accounts.get_organization(pool, org.id)
    assert (scheduled.plan, scheduled.pending_plan) == ("team", "free")
    assert scheduled.pending_change_at == add_months(start, 1)
    assert await balances.get_balance(pool, org.id) == balance  # nothing else changed
    assert await counts(pool, org.id) == (2, 0)

    reset = await periods.reset_period(pool, org.id, now=start + timedelta(days=40))
    assert (reset.plan, reset.expired_micro, reset.allocated_micro) == (
        "free",
        2000 * CREDIT,
        10 * CREDIT,
    )
    applied = await accounts.get_organization(pool, org.id)
    assert (applied.plan, applied.pending_plan, applied.pending_change_at) == ("free", None, None)
    after = await balances.get_balance(pool, org.id)
    assert (after.monthly_credits_micro, after.monthly_remaining_micro) == (
        10 * CREDIT,
        10 * CREDIT,
    )
    assert (after.bonus_credits_micro, after.overdraft_limit_micro) == (50 * CREDIT, 0)


async def test_refused_plan_changes_write_nothing(pool: asyncpg.Pool) -> None:
    org = await new_org(pool, "pro")
    balance = await balances.get_balance(pool, org.id)
    with pytest.raises(PlanChangeNotAllowed):
        await periods.change_plan(pool, org.id, "pro")
    with pytest.raises(UnknownPlan):
        await periods.change_plan(pool, org.id, "enterprise")
    with pytest.raises(PlanChangeNotAllowed):
        await periods.change_plan(pool, org.id, "team", direction="downgrade")
    with pytest.raises(PlanChangeNotAllowed):
        await periods.change_plan(pool, org.id, "free", direction="upgrade")
    with pytest.raises(UnknownOrganization):
        await periods.change_plan(pool, uuid.uuid4(), "team")
    assert await balances.get_balance(pool, org.id) == balance
    assert await counts(pool, org.id) == (2, 0)
    unchanged = await accounts.get_organization(pool, org.id)
    assert (unchanged.plan, unchanged.pending_plan) == ("pro", None)


async def test_choosing_the_current_plan_cancels_a_pending_downgrade(pool: asyncpg.Pool) -> None:
    start = datetime.now(UTC)
    org = await new_org(pool, "team", now=start)
    await periods.change_plan(pool, org.id, "pro")
    assert (await accounts.get_organization(pool, org.id)).pending_plan == "pro"
    with pytest.raises(PlanChangeNotAllowed):  # a direction makes it a move, not a cancel
        await periods.change_plan(pool, org.id, "team", direction="upgrade")
    cancel = await periods.change_plan(pool, org.id, "team")
    assert (cancel.kind, cancel.plan, cancel.adjustment_micro) == (
        PlanChangeKind.DOWNGRADE_CANCELLED, "team", 0)  # fmt: skip
    assert (await accounts.get_organization(pool, org.id)).pending_plan is None
    reset = await periods.reset_period(pool, org.id, now=start + timedelta(days=40))
    assert (reset.plan, reset.allocated_micro) == ("team", 2000 * CREDIT)

    other = await new_org(pool, "pro")  # an upgrade drops a scheduled downgrade too
    await periods.change_plan(pool, other.id, "free")
    await periods.change_plan(pool, other.id, "team")
    upgraded = await accounts.get_organization(pool, other.id)
    assert (upgraded.plan, upgraded.pending_plan) == ("team", None)


async def test_overdraft_is_drawn_last_and_repaid_first(pool: asyncpg.Pool) -> None:
    org = await new_org(pool, "pro")  # 525 available + 10 overdraft
    await consume(pool, org.id, 530 * CREDIT)
    [txn] = await entries(pool, org.id, TransactionType.CONSUMPTION)
    assert _buckets(txn) == (-530 * CREDIT, -500 * CREDIT, -25 * CREDIT, -5 * CREDIT)
    balance = await balances.get_balance(pool, org.id)
    assert balance.overdraft_used_micro == 5 * CREDIT
    assert (balance.available_micro, balance.spendable_micro) == (-5 * CREDIT, 5 * CREDIT)
    with pytest.raises(InsufficientCredits):
        await reservations.reserve(
            pool,
            org.id,
            "beyond",
            minimum_micro=6 * CREDIT,
            requested_micro=6 * CREDIT,
            ttl_s=TTL_S,
        )
    topup = await transactions.post(pool, org.id, TransactionType.TOPUP_PURCHASE, 20 * CREDIT, "t1")
    assert _buckets(topup.transaction) == (20 * CREDIT, 0, 15 * CREDIT, 5 * CREDIT)
    after = await balances.get_balance(pool, org.id)
    assert (after.overdraft_used_micro, after.bonus_credits_micro) == (0, 15 * CREDIT)
    assert (after.available_micro, after.spendable_micro) == (15 * CREDIT, 25 * CREDIT)


async def test_the_next_allocation_repays_the_overdraft(pool: asyncpg.Pool) -> None:
    start = datetime.now(UTC)
    org = await new_org(pool, "pro", now=start)
    await consume(pool, org.id, 533 * CREDIT)
    reset = await periods.reset_period(pool, org.id, now=start + timedelta(days=40))
    assert (reset.expired_micro, reset.allocated_micro) == (0, 500 * CREDIT)
    allocation = (await entries(pool, org.id, ALLOCATION))[0]
    assert _buckets(allocation) == (500 * CREDIT, 492 * CREDIT, 0, 8 * CREDIT)
    balance = await balances.get_balance(pool, org.id)
    assert (balance.overdraft_used_micro, balance.monthly_remaining_micro) == (0, 492 * CREDIT)
    assert balance.available_micro == 492 * CREDIT


async def test_plan_change_direction_must_be_known(pool: asyncpg.Pool) -> None:
    org = await accounts.create_organization(pool, "direction", "pro")
    with pytest.raises(InvalidArgument):
        await periods.change_plan(pool, org.id, "team", direction="sideways")
    assert (await accounts.get_organization(pool, org.id)).plan == "pro"


async def test_plan_change_after_period_end_resets_first(pool: asyncpg.Pool) -> None:
    org = await accounts.create_organization(pool, "late upgrade", "pro")
    later = org.created_at + timedelta(days=40)
    change = await periods.change_plan(pool, org.id, "team", now=later)
    assert change.adjustment_micro == 1500 * CREDIT
    balance = await balances.get_balance(pool, org.id)
    assert balance.period_start <= later < balance.period_end
    # the new period's pro allocation plus the upgrade's difference, nothing expired since
    assert balance.monthly_remaining_micro == 2000 * CREDIT
