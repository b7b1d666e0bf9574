"""The ledger tables refuse rows that break their rules, each rule on its own: with the rules
folded into one function per table (sql/0010) and, after rolling 0010 back, with the
original CHECK constraints. Every case breaks exactly one rule, so a rule that went missing
lets its case through."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from gateway.config import Config
from ledger import catalog_sync, migrations
from tests.ledger.helpers import new_org

RESERVATION = {
    "idempotency_key": "'k'",
    "status": "'pending'",
    "minimum_micro": "1",
    "requested_micro": "2",
    "amount_micro": "2",
    "charged_micro": "NULL",
    "resolved_at": "NULL",
    "expires_at": "now() + interval '1 hour'",
}
RESOLVED = {"resolved_at": "now()"}
BAD_RESERVATIONS = [
    {"status": "'lost'", **RESOLVED},
    {"idempotency_key": "''"},
    {"idempotency_key": "repeat('k', 256)"},
    {"minimum_micro": "-1"},
    {"status": "'rejected'", **RESOLVED, "minimum_micro": "0", "amount_micro": "0",
     "requested_micro": "0"},
    {"status": "'settled'", **RESOLVED, "charged_micro": "-1"},
    {"status": "'rejected'", **RESOLVED, "minimum_micro": "3", "amount_micro": "0"},
    {"amount_micro": "3"},
    {"minimum_micro": "2", "amount_micro": "1"},
    {"status": "'rejected'", **RESOLVED, "amount_micro": "1"},
    RESOLVED,
    {"status": "'released'"},
    {"status": "'settled'", **RESOLVED},
    {"charged_micro": "1"},
    {"expires_at": "now() - interval '1 second'"},
]  # fmt: skip

TRANSACTION = {
    "transaction_type": "'topup_purchase'",
    "credits_amount_micro": "5",
    "monthly_micro": "0",
    "bonus_micro": "5",
    "overdraft_micro": "0",
    "idempotency_key": "'t'",
    "reservation_id": "NULL",
    "prompt_tokens": "NULL",
    "completion_tokens": "NULL",
    "reserved_micro": "NULL",
    "estimated_credits_micro": "NULL",
}
DEBIT = {"credits_amount_micro": "-5", "monthly_micro": "-5", "bonus_micro": "0"}
BAD_TRANSACTIONS = [
    {"transaction_type": "'gift'"},
    {"idempotency_key": "''"},
    {"prompt_tokens": "-1"},
    {"completion_tokens": "-1"},
    {"reserved_micro": "-1"},
    {"estimated_credits_micro": "-1"},
    {"credits_amount_micro": "6"},
    {"transaction_type": "'consumption'", **DEBIT},
    {"reservation_id": f"'{uuid.uuid4()}'"},
    {"transaction_type": "'refund'"},
    {"transaction_type": "'monthly_expiry'", **DEBIT, "monthly_micro": "-3", "bonus_micro": "-2"},
    {"monthly_micro": "10", "bonus_micro": "-5"},
    {"transaction_type": "'admin_adjustment'", "credits_amount_micro": "0", "bonus_micro": "0"},
]  # fmt: skip

BAD_BALANCES = [
    "bonus_credits_micro = -1",
    "reserved_credits_micro = -1",
    "overdraft_limit_micro = -1",
    "overdraft_used_micro = -1",
    "monthly_remaining_micro = -1",
    "monthly_remaining_micro = monthly_credits_micro + 1",
    "period_end = period_start",
]


def _insert(table: str, org: uuid.UUID, columns: dict[str, str]) -> str:
    return (
        f"INSERT INTO {table} (organization_id, {', '.join(columns)}) "
        f"VALUES ('{org}', {', '.join(columns.values())})"
    )


async def _outcome(conn: asyncpg.Connection, sql: str) -> str | None:
    """The SQLSTATE `sql` fails with (None if it passes); rolled back either way."""
    tx = conn.transaction()
    await tx.start()
    try:
        await conn.execute(sql)
    except asyncpg.PostgresError as exc:
        return str(exc.sqlstate)
    finally:
        await tx.rollback()
    return None


async def _assert_rules(conn: asyncpg.Connection, org: uuid.UUID) -> None:
    assert await _outcome(conn, _insert("credit_reservations", org, RESERVATION)) is None
    for case in BAD_RESERVATIONS:
        sql = _insert("credit_reservations", org, RESERVATION | case)
        assert await _outcome(conn, sql) == "23514", case
    assert await _outcome(conn, _insert("credit_transactions", org, TRANSACTION)) is None
    for case in BAD_TRANSACTIONS:
        sql = _insert("credit_transactions", org, TRANSACTION | case)
        assert await _outcome(conn, sql) == "23514", case
    update = "UPDATE organization_credit_balances SET {} WHERE organization_id = '" + f"{org}'"
    assert await _outcome(conn, update.format("bonus_credits_micro = 0")) is None
    for change in BAD_BALANCES:
        assert await _outcome(conn, update.format(change)) == "23514", change


async def test_every_rule_is_enforced_before_and_after_0010(
    empty_db: asyncpg.Connection, config: Config
) -> None:
    await migrations.up(empty_db)
    await catalog_sync.seed(empty_db, config)
    org = (await new_org(empty_db, "pro")).id
    await _assert_rules(empty_db, org)

    rolled_back = await migrations.down(empty_db, 3)  # 0012, 0011, then 0010
    assert [m.version for m in rolled_back] == [12, 11, 10]
    rules = await empty_db.fetchval(
        "SELECT count(*) FROM pg_constraint WHERE conname LIKE '%\\_rules' AND contype = 'c'"
    )
    assert rules == 0  # the original constraints are back
    await _assert_rules(empty_db, org)

    await migrations.up(empty_db)
    await _assert_rules(empty_db, org)


async def test_a_refused_row_names_the_rule(empty_db: asyncpg.Connection, config: Config) -> None:
    await migrations.up(empty_db)
    await catalog_sync.seed(empty_db, config)
    org = (await new_org(empty_db, "pro")).id
    sql = _insert("credit_transactions", org, TRANSACTION | {"transaction_type": "'refund'"})
    with pytest.raises(asyncpg.CheckViolationError, match="wrong sign for refund"):
        await empty_db.execute(sql)
