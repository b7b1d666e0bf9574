"""The harness of the ledger's state machine: one new organization per example on the real
PL/pgSQL ledger, its own connection and event loop, the model of it beside it, and the checks
after every step that the ledger's balance is the model's and the ledger is sound."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant

from ledger import accounts, balances
from ledger.check import check_ledger
from tests.ledger.model import PLANS, Model

T = TypeVar("T")

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


class LedgerHarness(RuleBasedStateMachine):
    """One organization and its model; the rules that drive them are the subclass's."""

    database_url = ""
    names = itertools.count()

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
