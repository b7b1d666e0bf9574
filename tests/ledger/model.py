"""The reference model the ledger state machine checks the real ledger against (SPEC §4): one
organization's balance, exactly, in integer micro-credits, in pure Python.

The model keeps the three buckets (monthly remaining, bonus, overdraft used), the holds, the
plan and its pending downgrade, and the billing period on a model clock that starts at the
organization's creation and only moves forward, in the reset rule."""

from __future__ import annotations

import calendar
import uuid
from dataclasses import dataclass, field
from datetime import datetime

from ledger.periods import PlanChangeKind
from ledger.reservations import ReservationStatus
from ledger.transactions import TransactionType

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
