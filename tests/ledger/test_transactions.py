"""Reading the ledger: keyset pagination newest first, filters, cursors and limits; and how
posted entries move the balance's buckets (SPEC §4 "Credits")."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from ledger import accounts, balances, transactions
from ledger.errors import InvalidArgument
from ledger.transactions import Transaction, TransactionType, encode_cursor, list_transactions
from tests.ledger.helpers import CREDIT, consume, entries, new_org

TOPUP = TransactionType.TOPUP_PURCHASE
PROMO = TransactionType.PROMO_BONUS
REFUND = TransactionType.REFUND


async def _post(pool: asyncpg.Pool, org: uuid.UUID, kind: TransactionType, credits: int) -> int:
    posted = await transactions.post(pool, org, kind, credits * CREDIT, f"{kind}-{uuid.uuid4()}")
    assert not posted.replayed
    return posted.transaction.id


async def test_pages_neither_skip_nor_repeat_while_entries_are_appended(
    pool: asyncpg.Pool,
) -> None:
    org = await new_org(pool, "pro")
    for i in range(10):
        await _post(pool, org.id, PROMO, i + 1)
    existing = [t.id for t in await entries(pool, org.id)]
    assert len(existing) == 12 and existing == sorted(existing, reverse=True)
    seen: list[int] = []
    appended: list[int] = []
    cursor: str | None = None
    pages = 0
    while True:
        page = await list_transactions(pool, org.id, limit=4, cursor=cursor)
        pages += 1
        assert len(page.data) == 4
        seen.extend(t.id for t in page.data)
        cursor = page.next_cursor
        if cursor is None:
            break
        appended += [await _post(pool, org.id, TOPUP, 1), await _post(pool, org.id, TOPUP, 2)]
    assert pages == 3
    assert seen == existing  # each existing entry exactly once, newest first
    assert not set(appended) & set(seen) and min(appended) > max(existing)
    newest = await list_transactions(pool, org.id, limit=500)
    assert [t.id for t in newest.data] == sorted(appended, reverse=True) + existing


async def test_a_short_last_page_and_a_single_entry_page(pool: asyncpg.Pool) -> None:
    org = await new_org(pool, "free")
    for _ in range(3):
        await _post(pool, org.id, TOPUP, 1)
    every = [t.id for t in await entries(pool, org.id)]
    first = await list_transactions(pool, org.id, limit=3)
    assert [t.id for t in first.data] == every[:3] and first.next_cursor == encode_cursor(every[2])
    second = await list_transactions(pool, org.id, limit=3, cursor=first.next_cursor)
    assert [t.id for t in second.data] == every[3:] and second.next_cursor is None
    one = await list_transactions(pool, org.id, limit=1)
    assert [t.id for t in one.data] == every[:1] and one.next_cursor is not None


async def test_filter_by_type(pool: asyncpg.Pool) -> None:
    org = await new_org(pool, "pro")
    topups = [await _post(pool, org.id, TOPUP, n) for n in (5, 6, 7)]
    refunds = [await _post(pool, org.id, REFUND, -n) for n in (1, 2)]
    settlement = await consume(pool, org.id, 3 * CREDIT)

    def ids(data: list[Transaction]) -> list[int]:
        return [t.id for t in data]

    only = await list_transactions(pool, org.id, types=frozenset({TOPUP}))
    assert ids(only.data) == topups[::-1] and only.next_cursor is None
    assert {t.type for t in only.data} == {TOPUP}
    assert [t.amount_micro for t in only.data] == [7 * CREDIT, 6 * CREDIT, 5 * CREDIT]
    mixed = await list_transactions(pool, org.id, types=frozenset({PROMO, REFUND}))
    assert [(t.type, t.amount_micro) for t in mixed.data] == [
        (REFUND, -2 * CREDIT),
        (REFUND, -CREDIT),
        (PROMO, 25 * CREDIT),
    ]
    assert ids(mixed.data)[:2] == refunds[::-1]
    [used] = (
        await list_transactions(pool, org.id, types=frozenset({TransactionType.CONSUMPTION}))
    ).data
    assert (used.id, used.type) == (settlement.transaction_id, TransactionType.CONSUMPTION)
    paged = await list_transactions(pool, org.id, limit=2, types=frozenset({TOPUP}))
    assert ids(paged.data) == topups[:0:-1] and paged.next_cursor is not None
    rest = await list_transactions(
        pool, org.id, limit=2, cursor=paged.next_cursor, types=frozenset({TOPUP})
    )
    assert ids(rest.data) == topups[:1] and rest.next_cursor is None
    none = await list_transactions(pool, org.id, types=frozenset({TransactionType.MONTHLY_EXPIRY}))
    assert none.data == [] and none.next_cursor is None


async def test_filter_by_time_window(pool: asyncpg.Pool) -> None:
    org = await new_org(pool, "pro")
    for n in range(1, 9):
        await _post(pool, org.id, TOPUP, n)
    posted = (await entries(pool, org.id, TOPUP))[::-1]  # oldest first
    stamps = [t.created_at for t in posted]
    assert stamps == sorted(stamps) and len(set(stamps)) == 8  # one transaction each
    since, until = stamps[2], stamps[6]
    window = await list_transactions(pool, org.id, since=since, until=until)
    assert [t.id for t in window.data] == [t.id for t in posted[2:6]][::-1]  # since <= t < until
    after = await list_transactions(pool, org.id, since=stamps[5])
    assert [t.amount_micro for t in after.data] == [8 * CREDIT, 7 * CREDIT, 6 * CREDIT]
    before = await list_transactions(pool, org.id, until=stamps[0], types=frozenset({TOPUP}))
    assert before.data == []
    future = datetime.now(UTC) + timedelta(days=1)
    assert (await list_transactions(pool, org.id, since=future)).data == []
    both = await list_transactions(pool, org.id, since=since, until=until, limit=3)
    rest = await list_transactions(pool, org.id, since=since, until=until, cursor=both.next_cursor)
    assert [t.id for t in both.data + rest.data] == [t.id for t in window.data]


async def test_invalid_cursor_and_limit_bounds(pool: asyncpg.Pool) -> None:
    org = await new_org(pool, "pro")
    for bad in (
        "not a cursor!",
        "%%%",
        base64.urlsafe_b64encode(b"x12").decode(),
        base64.urlsafe_b64encode(b"tabc").decode(),
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
        encode_cursor(2**70),
    ):
        with pytest.raises(InvalidArgument):
            await list_transactions(pool, org.id, cursor=bad)
    for limit in (0, -1, 501, 10_000):
        with pytest.raises(InvalidArgument):
            await list_transactions(pool, org.id, limit=limit)
    assert len((await list_transactions(pool, org.id, limit=1)).data) == 1
    full = await list_transactions(pool, org.id, limit=500)
    assert len(full.data) == 2 and full.next_cursor is None
    assert (await list_transactions(pool, uuid.uuid4())).data == []


async def test_posted_entries_move_the_right_buckets(pool: asyncpg.Pool) -> None:
    org = await new_org(pool, "pro")  # 500 monthly + 25 bonus + 10 overdraft
    refund = await transactions.post(pool, org.id, REFUND, -30 * CREDIT, "refund-1")
    t = refund.transaction
    assert (t.amount_micro, t.monthly_micro, t.bonus_micro, t.overdraft_micro) == (
        -30 * CREDIT, -5 * CREDIT, -25 * CREDIT, 0)  # fmt: skip
    adjust = TransactionType.ADMIN_ADJUSTMENT
    debit = (await transactions.post(pool, org.id, adjust, -497 * CREDIT, "adj-1")).transaction
    assert (debit.monthly_micro, debit.bonus_micro, debit.overdraft_micro) == (
        -495 * CREDIT, 0, -2 * CREDIT)  # fmt: skip
    credit = (await transactions.post(pool, org.id, adjust, 12 * CREDIT, "adj-2")).transaction
    assert (credit.monthly_micro, credit.bonus_micro, credit.overdraft_micro) == (
        0, 10 * CREDIT, 2 * CREDIT)  # fmt: skip
    balance = await balances.get_balance(pool, org.id)
    assert (balance.monthly_remaining_micro, balance.bonus_credits_micro) == (0, 10 * CREDIT)
    assert balance.overdraft_used_micro == 0 and balance.available_micro == 10 * CREDIT
    assert balance.used_this_period_micro == 0  # debits other than consumption are not usage


@pytest.mark.parametrize(
    "key",
    [
        "welcome_bonus",
        "plan_allocation:2024-02-15T00:00:00.000000Z",
        "monthly_expiry:2024-02-15T00:00:00.000000Z",
        "consumption:x",
        "plan_change:a->b:c",
    ],
)
async def test_ledger_keys_are_reserved(pool: asyncpg.Pool, key: str) -> None:
    org = await accounts.create_organization(pool, "reserved keys", "pro")
    with pytest.raises(InvalidArgument):
        await transactions.post(pool, org.id, TransactionType.PROMO_BONUS, CREDIT, key)
