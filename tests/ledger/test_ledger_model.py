"""The credit ledger against a model: a Hypothesis state machine drives the real PL/pgSQL
ledger on PostgreSQL for one new organization per example, and after every step compares its
balance with a small, exact, pure-Python model of that organization (SPEC §4).

The model keeps the three buckets (monthly remaining, bonus, overdraft used), the holds, the
plan and its pending downgrade, and the billing period on a model clock that starts at the
organization's creation and only moves forward, in the reset rule."""

from __future__ import annotations

import asyncio
import calendar
import itertools
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import asyncpg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    MultipleResults,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from ledger import accounts, balances, periods, reservations
from ledger.check import check_ledger
from ledger.errors import IdempotencyConflict, InsufficientCredits, PlanChangeNotAllowed
from ledger.periods import PlanChangeKind
from ledger.reservations import ReservationStatus
from ledger.transactions import TransactionType, post

T = TypeVar("T")

MICRO = 1_000_000


@dataclass(frozen=True)
class Terms:
    order: int  # a later plan is an upgrade
    monthly: int
    welcome: int
    overdraft: int


PLANS: dict[str, Terms] = {
    "free": Terms(0, 10 * MICRO, 10 * MICRO, 0),
    "pro": Terms(1, 500 * MICRO, 25 * MICRO, 10 * MICRO),
    "team": Terms(2, 2000 * MICRO, 50 * MICRO, 50 * MICRO),
}

# Billing anchors: None is the real clock (reservation ttls then matter on the model clock);
# the others end months (day clamping), a year, a leap day, or lie in the future.
ANCHORS = st.one_of(
    st.none(),
    st.sampled_from(
        [
            datetime(2024, 1, 31, 12, 0, tzinfo=UTC),
            datetime(2023, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
            datetime(2024, 2, 29, 0, 0, tzinfo=UTC),
            datetime(2031, 5, 31, 8, 30, 15, 250000, tzinfo=UTC),
        ]
    ),
)
AMOUNTS = st.one_of(
    st.integers(1, 1000),
    st.integers(1, 3000).map(lambda credits: credits * MICRO),
    st.integers(1, 3000 * MICRO),
)
SMALL_AMOUNTS = st.one_of(
    st.just(0), st.integers(1, 1000), st.integers(1, 60).map(lambda credits: credits * MICRO)
)
TTLS = st.one_of(st.integers(1, 120), st.integers(1, 40 * 86400))
CLOCK_STEPS = st.sampled_from(["tick", "end", "past_end", "months", "expiry"])
SETTINGS = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def add_months(t: datetime, n: int) -> datetime:
    """PostgreSQL's `t + interval 'n months'` in UTC: the day is clamped to the month's end."""
    months = t.month - 1 + n
    year, month = t.year + months // 12, months % 12 + 1
    return t.replace(year=year, month=month, day=min(t.day, calendar.monthrange(year, month)[1]))


def period_containing(anchor: datetime, now: datetime) -> tuple[datetime, datetime]:
    n = (now.year - anchor.year) * 12 + now.month - anchor.month
    while add_months(anchor, n) > now:
        n -= 1
    while add_months(anchor, n + 1) <= now:
        n += 1
    return add_months(anchor, n), add_months(anchor, n + 1)


@dataclass(frozen=True)
class Split:
    """How one entry moved each bucket, signed as the ledger records it (overdraft > 0 is
    overdraft repaid, < 0 overdraft drawn)."""

    monthly: int = 0
    bonus: int = 0
    overdraft: int = 0


@dataclass
class Hold:
    key: str
    minimum: int
    requested: int
    amount: int
    expires_at: datetime
    status: ReservationStatus = ReservationStatus.PENDING
    charged: int | None = None


@dataclass
class Model:
    """One organization's balance, exactly, in integer micro-credits."""

    plan: str
    anchor: datetime
    now: datetime
    period_start: datetime
    period_end: datetime
    monthly_credits: int
    overdraft_limit: int
    monthly_remaining: int = 0
    bonus: int = 0
    reserved: int = 0
    overdraft_used: int = 0
    pending_plan: str | None = None
    pending_change_at: datetime | None = None
    posts: dict[str, tuple[TransactionType, int]] = field(default_factory=dict)
    holds: dict[uuid.UUID, Hold] = field(default_factory=dict)
    refused: dict[str, tuple[int, int]] = field(default_factory=dict)

    @classmethod
    def create(cls, plan: str, now: datetime) -> Model:
        terms = PLANS[plan]
        model = cls(plan, now, now, now, add_months(now, 1), terms.monthly, terms.overdraft)
        model.credit(terms.monthly, to_monthly=True)
        model.credit(terms.welcome, to_monthly=False)
        return model

    @property
    def available(self) -> int:
        return self.monthly_remaining + self.bonus - self.overdraft_used

    @property
    def spendable(self) -> int:
        return self.available - self.reserved + self.overdraft_limit

    def credit(self, amount: int, *, to_monthly: bool) -> Split:
        """Repay the overdraft in use first, then fill the monthly or the bonus bucket."""
        repaid = min(self.overdraft_used, amount)
        self.overdraft_used -= repaid
        rest = amount - repaid
        if to_monthly:
            self.monthly_remaining += rest
            return Split(monthly=rest, overdraft=repaid)
        self.bonus += rest
        return Split(bonus=rest, overdraft=repaid)

    def debit(self, amount: int, *, monthly_first: bool) -> Split:
        """Take `amount` >= 0: consumption takes monthly then bonus, other debits bonus then
        monthly; whatever is left is drawn on the overdraft, limit or not."""
        if monthly_first:
            from_monthly = min(self.monthly_remaining, amount)
            from_bonus = min(self.bonus, amount - from_monthly)
        else:
            from_bonus = min(self.bonus, amount)
            from_monthly = min(self.monthly_remaining, amount - from_bonus)
        drawn = amount - from_monthly - from_bonus
        self.monthly_remaining -= from_monthly
        self.bonus -= from_bonus
        self.overdraft_used += drawn
        return Split(-from_monthly, -from_bonus, -drawn)

    def post(self, amount: int) -> Split:
        if amount > 0:
            return self.credit(amount, to_monthly=False)
        return self.debit(-amount, monthly_first=False)

    def reserve(self, minimum: int, requested: int) -> int | None:
        """The hold granted, or None when even the minimum is not spendable."""
        if self.spendable < minimum:
            return None
        amount = min(requested, self.spendable)
        self.reserved += amount
        return amount

    def settle(self, hold: Hold, charge: int) -> None:
        hold.status, hold.charged = ReservationStatus.SETTLED, charge
        self.reserved -= hold.amount
        self.debit(charge, monthly_first=True)

    def release(self, hold: Hold, status: ReservationStatus) -> None:
        hold.status = status
        self.reserved -= hold.amount

    def reset(self) -> tuple[int, int] | None:
        """(expired, allocated) when the period is over by `now`, else None."""
        if self.period_end > self.now:
            return None
        expired, self.monthly_remaining = self.monthly_remaining, 0
        if self.pending_plan is not None:
            self.plan, self.pending_plan, self.pending_change_at = self.pending_plan, None, None
        terms = PLANS[self.plan]
        self.period_start, self.period_end = period_containing(self.anchor, self.now)
        self.monthly_credits, self.overdraft_limit = terms.monthly, terms.overdraft
        self.credit(terms.monthly, to_monthly=True)
        return expired, terms.monthly

    def change_plan(
        self, plan: str, direction: str | None
    ) -> tuple[PlanChangeKind, datetime, int] | None:
        """(kind, effective at, adjustment), or None when the change is not allowed."""
        current, new = PLANS[self.plan], PLANS[plan]
        if plan == self.plan:
            if self.pending_plan is None or direction is not None:
                return None
            self.pending_plan = self.pending_change_at = None
            return PlanChangeKind.DOWNGRADE_CANCELLED, self.now, 0
        if new.order > current.order:
            if direction == "downgrade":
                return None
            self.plan, self.pending_plan, self.pending_change_at = plan, None, None
            self.overdraft_limit = new.overdraft
            diff = new.monthly - current.monthly
            if diff > 0:
                self.monthly_credits += diff
                self.credit(diff, to_monthly=True)
            return PlanChangeKind.UPGRADED, self.now, max(diff, 0)
        if direction == "upgrade":
            return None
        self.pending_plan, self.pending_change_at = plan, self.period_end
        return PlanChangeKind.DOWNGRADE_SCHEDULED, self.period_end, 0


def other_type(kind: TransactionType, amount: int) -> TransactionType:
    """Another postable type for the same signed amount: an idempotency conflict."""
    if amount < 0:
        return (
            TransactionType.ADMIN_ADJUSTMENT
            if kind is TransactionType.REFUND
            else TransactionType.REFUND
        )
    return {
        TransactionType.PROMO_BONUS: TransactionType.TOPUP_PURCHASE,
        TransactionType.TOPUP_PURCHASE: TransactionType.ADMIN_ADJUSTMENT,
        TransactionType.ADMIN_ADJUSTMENT: TransactionType.PROMO_BONUS,
    }[kind]


class LedgerMachine(RuleBasedStateMachine):
    """Drives the ledger of one new organization per example; see make_machine."""

    database_url = ""
    names = itertools.count()
    holds: Bundle[uuid.UUID] = Bundle("holds")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.conn = self.loop.run_until_complete(asyncpg.connect(self.database_url))
        self.keys = itertools.count()
        self._model: Model | None = None
        self._org: uuid.UUID | None = None

    def teardown(self) -> None:
        try:
            self.loop.run_until_complete(self.conn.close())
        finally:
            self.loop.close()

    def run(self, call: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(call)

    @property
    def m(self) -> Model:
        assert self._model is not None
        return self._model

    @property
    def org(self) -> uuid.UUID:
        assert self._org is not None
        return self._org

    def key(self, prefix: str) -> str:
        return f"{prefix}-{next(self.keys)}"

    @initialize(plan=st.sampled_from(sorted(PLANS)), anchor=ANCHORS)
    def create(self, plan: str, anchor: datetime | None) -> None:
        now = anchor or datetime.now(UTC)
        name = f"model-{next(self.names)}"
        org = self.run(accounts.create_organization(self.conn, name, plan, now=now))
        assert (org.plan, org.pending_plan, org.created_at) == (plan, None, now)
        self._org, self._model = org.id, Model.create(plan, now)

    # -- posted entries ---------------------------------------------------------------

    def _post(self, kind: TransactionType, amount: int) -> None:
        key = self.key(kind.value)
        split = self.m.post(amount)
        self.m.posts[key] = (kind, amount)
        posted = self.run(post(self.conn, self.org, kind, amount, key))
        entry = posted.transaction
        assert not posted.replayed
        assert (entry.type, entry.amount_micro, entry.idempotency_key) == (kind, amount, key)
        assert Split(entry.monthly_micro, entry.bonus_micro, entry.overdraft_micro) == split

    @rule(
        kind=st.sampled_from([TransactionType.PROMO_BONUS, TransactionType.TOPUP_PURCHASE]),
        amount=AMOUNTS,
    )
    def grant(self, kind: TransactionType, amount: int) -> None:
        self._post(kind, amount)

    @rule(amount=AMOUNTS, credit=st.booleans())
    def adjust(self, amount: int, credit: bool) -> None:
        self._post(TransactionType.ADMIN_ADJUSTMENT, amount if credit else -amount)

    @rule(amount=AMOUNTS)
    def refund(self, amount: int) -> None:
        self._post(TransactionType.REFUND, -amount)

    @precondition(lambda self: self._model is not None and bool(self._model.posts))
    @rule(data=st.data(), change=st.sampled_from([None, "amount", "type"]))
    def replay_post(self, data: st.DataObject, change: str | None) -> None:
        key = data.draw(st.sampled_from(sorted(self.m.posts)), label="key")
        kind, amount = self.m.posts[key]
        if change is not None:
            if change == "amount":
                amount += 1 if amount > 0 else -1
            else:
                kind = other_type(kind, amount)
            with pytest.raises(IdempotencyConflict):
                self.run(post(self.conn, self.org, kind, amount, key))
            return
        posted = self.run(post(self.conn, self.org, kind, amount, key))
        entry = posted.transaction
        assert posted.replayed
        assert (entry.type, entry.amount_micro, entry.idempotency_key) == (kind, amount, key)

    # -- holds ------------------------------------------------------------------------

    def _reserve(self, minimum: int, requested: int, ttl_s: int) -> MultipleResults[uuid.UUID]:
        key = self.key("hold")
        spendable = self.m.spendable
        amount = self.m.reserve(minimum, requested)
        if amount is None:
            self.m.refused[key] = (minimum, requested)
            with pytest.raises(InsufficientCredits) as refused:
                self.run(self._reserve_call(key, minimum, requested, ttl_s))
            assert refused.value.spendable_micro == spendable
            return multiple()
        held = self.run(self._reserve_call(key, minimum, requested, ttl_s))
        assert (held.status, held.replayed) == (ReservationStatus.PENDING, False)
        assert (held.amount_micro, held.spendable_micro) == (amount, spendable - amount)
        assert held.spendable_micro >= 0, "a hold took spendable below zero"
        self.m.holds[held.id] = Hold(key, minimum, requested, amount, held.expires_at)
        return multiple(held.id)

    def _reserve_call(
        self, key: str, minimum: int, requested: int, ttl_s: int = 60
    ) -> Coroutine[Any, Any, reservations.Reservation]:
        return reservations.reserve(
            self.conn,
            self.org,
            key,
            minimum_micro=minimum,
            requested_micro=requested,
            ttl_s=ttl_s,
        )

    @rule(
        target=holds,
        minimum=st.one_of(SMALL_AMOUNTS, AMOUNTS),
        extra=st.one_of(st.integers(1, 3), AMOUNTS),
        ttl_s=TTLS,
    )
    def reserve(self, minimum: int, extra: int, ttl_s: int) -> MultipleResults[uuid.UUID]:
        return self._reserve(minimum, minimum + extra, ttl_s)

    @rule(
        target=holds,
        edge=st.sampled_from(["minimum", "requested"]),
        offset=st.integers(-3, 3),
        other=st.one_of(st.integers(0, 3), AMOUNTS),
        ttl_s=TTLS,
    )
    def reserve_at_edge(
        self, edge: str, offset: int, other: int, ttl_s: int
    ) -> MultipleResults[uuid.UUID]:
        """A minimum, or a requested amount, within a few micro-credits of the spendable."""
        near = self.m.spendable + offset
        if edge == "minimum":
            minimum = max(0, near)
            return self._reserve(minimum, minimum + max(other, 1), ttl_s)
        requested = max(1, near)
        return self._reserve(min(other, requested), requested, ttl_s)

    def _hold_keys(self) -> dict[str, tuple[int, int, uuid.UUID | None]]:
        keys: dict[str, tuple[int, int, uuid.UUID | None]] = {
            key: (minimum, requested, None) for key, (minimum, requested) in self.m.refused.items()
        }
        for rid, hold in self.m.holds.items():
            keys[hold.key] = (hold.minimum, hold.requested, rid)
        return keys

    @precondition(
        lambda self: self._model is not None and bool(self._model.holds or self._model.refused)
    )
    @rule(data=st.data(), conflict=st.booleans())
    def replay_reserve(self, data: st.DataObject, conflict: bool) -> None:
        keys = self._hold_keys()
        key = data.draw(st.sampled_from(sorted(keys)), label="key")
        minimum, requested, rid = keys[key]
        if conflict:
            with pytest.raises(IdempotencyConflict):
                self.run(self._reserve_call(key, minimum, requested + 1))
            return
        if rid is None:
            with pytest.raises(InsufficientCredits) as refused:
                self.run(self._reserve_call(key, minimum, requested))
            assert refused.value.spendable_micro == self.m.spendable
            return
        hold = self.m.holds[rid]
        held = self.run(self._reserve_call(key, minimum, requested))
        assert (held.id, held.replayed, held.status) == (rid, True, hold.status)
        assert (held.amount_micro, held.spendable_micro) == (hold.amount, self.m.spendable)

    def _settle(self, rid: uuid.UUID, charge: int) -> None:
        hold = self.m.holds[rid]
        if hold.status is ReservationStatus.SETTLED and hold.charged != charge:
            with pytest.raises(IdempotencyConflict):
                self.run(reservations.settle(self.conn, self.org, rid, charge))
            return
        applied = hold.status is ReservationStatus.PENDING
        if applied:
            self.m.settle(hold, charge)
        done = self.run(reservations.settle(self.conn, self.org, rid, charge))
        assert (done.applied, done.status, done.charged_micro) == (
            applied,
            hold.status,
            hold.charged,
        )
        assert (done.transaction_id is not None) == (hold.status is ReservationStatus.SETTLED)
        assert (done.available_micro, done.spendable_micro, done.monthly_credits_micro) == (
            self.m.available,
            self.m.spendable,
            self.m.monthly_credits,
        )

    @rule(
        rid=holds,
        how=st.sampled_from(["zero", "below", "equal", "above", "any"]),
        delta=AMOUNTS,
    )
    def settle(self, rid: uuid.UUID, how: str, delta: int) -> None:
        """Charge nothing, less than, exactly, or more than the hold (an overage)."""
        held = self.m.holds[rid].amount
        charges = {
            "zero": 0,
            "below": max(0, held - delta),
            "equal": held,
            "above": held + delta,
            "any": delta,
        }
        self._settle(rid, charges[how])

    @precondition(
        lambda self: (
            self._model is not None
            and any(h.status is ReservationStatus.SETTLED for h in self._model.holds.values())
        )
    )
    @rule(data=st.data())
    def replay_settle(self, data: st.DataObject) -> None:
        settled = sorted(
            rid for rid, h in self.m.holds.items() if h.status is ReservationStatus.SETTLED
        )
        rid = data.draw(st.sampled_from(settled), label="reservation")
        charged = self.m.holds[rid].charged
        assert charged is not None
        self._settle(rid, charged)

    def _release(self, rid: uuid.UUID, *, expire: bool) -> None:
        hold, now = self.m.holds[rid], self.m.now
        applied = hold.status is ReservationStatus.PENDING and (
            not expire or hold.expires_at <= now
        )
        if applied:
            status = ReservationStatus.EXPIRED if expire else ReservationStatus.RELEASED
            self.m.release(hold, status)
        if expire:
            done = self.run(reservations.expire(self.conn, self.org, rid, now))
        else:
            done = self.run(reservations.release(self.conn, self.org, rid))
        assert (done.applied, done.status, done.amount_micro) == (applied, hold.status, hold.amount)
        assert (done.available_micro, done.spendable_micro) == (self.m.available, self.m.spendable)

    @rule(rid=holds)
    def release(self, rid: uuid.UUID) -> None:
        self._release(rid, expire=False)

    @rule(rid=holds)
    def expire(self, rid: uuid.UUID) -> None:
        """Expires the hold only if its ttl has run out by the model clock."""
        self._release(rid, expire=True)

    # -- periods and plans --------------------------------------------------------------

    def _advance(self, step: str, amount: int) -> datetime:
        m = self.m
        if step == "tick":
            return m.now + timedelta(seconds=amount % 7200)
        if step == "end":
            return max(m.now, m.period_end)
        if step == "past_end":
            return max(m.now, m.period_end + timedelta(microseconds=amount))
        if step == "months":
            return max(m.now, add_months(m.period_end, amount % 4) + timedelta(seconds=amount))
        # "expiry": exactly when one of the pending holds yet to expire does
        ahead = sorted(
            h.expires_at
            for h in m.holds.values()
            if h.status is ReservationStatus.PENDING and h.expires_at > m.now
        )
        return ahead[amount % len(ahead)] if ahead else m.now

    @rule(step=CLOCK_STEPS, amount=st.integers(0, 10**7))
    def reset(self, step: str, amount: int) -> None:
        """Move the clock forward (maybe past the period's end) and run the period reset."""
        self.m.now = self._advance(step, amount)
        outcome = self.m.reset()
        done = self.run(periods.reset_period(self.conn, self.org, self.m.now))
        expired, allocated = outcome or (0, 0)
        assert (done.reset, done.expired_micro, done.allocated_micro) == (
            outcome is not None,
            expired,
            allocated,
        )
        assert (done.plan, done.period_start, done.period_end) == (
            self.m.plan,
            self.m.period_start,
            self.m.period_end,
        )

    @rule(
        plan=st.sampled_from(sorted(PLANS)),
        direction=st.sampled_from([None, None, None, "upgrade", "downgrade"]),
    )
    def change_plan(self, plan: str, direction: str | None) -> None:
        outcome = self.m.change_plan(plan, direction)
        now = self.m.now
        if outcome is None:
            with pytest.raises(PlanChangeNotAllowed):
                self.run(
                    periods.change_plan(self.conn, self.org, plan, direction=direction, now=now)
                )
            return
        kind, effective_at, adjustment = outcome
        done = self.run(
            periods.change_plan(self.conn, self.org, plan, direction=direction, now=now)
        )
        assert (done.kind, done.plan, done.effective_at, done.adjustment_micro) == (
            kind,
            plan,
            effective_at,
            adjustment,
        )
        assert (done.transaction_id is not None) == (adjustment > 0)

    # -- after every step ---------------------------------------------------------------

    @invariant()
    def balance_matches_model(self) -> None:
        if self._model is None:
            return
        m = self.m
        balance = self.run(balances.get_balance(self.conn, self.org))
        org = self.run(accounts.get_organization(self.conn, self.org))
        actual = {
            "plan": balance.plan,
            "pending_plan": org.pending_plan,
            "pending_change_at": org.pending_change_at,
            "monthly_credits": balance.monthly_credits_micro,
            "monthly_remaining": balance.monthly_remaining_micro,
            "bonus": balance.bonus_credits_micro,
            "reserved": balance.reserved_credits_micro,
            "overdraft_limit": balance.overdraft_limit_micro,
            "overdraft_used": balance.overdraft_used_micro,
            "period": (balance.period_start, balance.period_end),
        }
        expected = {
            "plan": m.plan,
            "pending_plan": m.pending_plan,
            "pending_change_at": m.pending_change_at,
            "monthly_credits": m.monthly_credits,
            "monthly_remaining": m.monthly_remaining,
            "bonus": m.bonus,
            "reserved": m.reserved,
            "overdraft_limit": m.overdraft_limit,
            "overdraft_used": m.overdraft_used,
            "period": (m.period_start, m.period_end),
        }
        assert actual == expected
        assert balance.spendable_micro == m.spendable

    @invariant()
    def ledger_is_sound(self) -> None:
        if self._org is not None:
            assert self.run(check_ledger(self.conn, self.org)) == []


def make_machine(database_url: str) -> type[LedgerMachine]:
    class BoundLedgerMachine(LedgerMachine):
        pass

    BoundLedgerMachine.database_url = database_url
    return BoundLedgerMachine


def test_ledger_matches_model(database_url: str) -> None:
    run_state_machine_as_test(make_machine(database_url), settings=SETTINGS)
