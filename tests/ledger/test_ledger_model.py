"""The credit ledger against a model: a Hypothesis state machine drives the real PL/pgSQL
ledger on PostgreSQL for one new organization per example, and after every step compares its
balance with a small, exact, pure-Python model of that organization (SPEC §4).

The model is tests/ledger/model.py; the organization, its connection and the checks after
every step are tests/ledger/harness.py; the steps (posted entries, holds, the clock with its
period resets, plan changes) are here."""

from __future__ import annotations

import uuid
from collections.abc import Coroutine
from datetime import datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    MultipleResults,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from ledger import periods, reservations
from ledger.errors import IdempotencyConflict, InsufficientCredits, PlanChangeNotAllowed
from ledger.reservations import ReservationStatus
from ledger.transactions import TransactionType, post
from tests.ledger.harness import LedgerHarness
from tests.ledger.model import MICRO, PLANS, Hold, Split, add_months, other_type

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


class LedgerMachine(LedgerHarness):
    """Drives the ledger of one new organization per example; see make_machine."""

    holds: Bundle[uuid.UUID] = Bundle("holds")

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


def make_machine(database_url: str) -> type[LedgerMachine]:
    class BoundLedgerMachine(LedgerMachine):
        pass

    BoundLedgerMachine.database_url = database_url
    return BoundLedgerMachine


def test_ledger_matches_model(database_url: str) -> None:
    run_state_machine_as_test(make_machine(database_url), settings=SETTINGS)
