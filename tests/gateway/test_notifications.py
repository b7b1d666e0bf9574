"""Low-balance notifications (SPEC §4): recorded once per threshold and day, whichever worker
charges, delivered by the jobs to a webhook with retries, and recorded on a later charge when
PostgreSQL missed one. Time moves by moving timestamps in the database, never by sleeping."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from gateway import jobs
from gateway.metrics import Metrics
from gateway.notifications import Notifier, deliver
from ledger import balances, transactions
from ledger.errors import LedgerUnavailable
from ledger.reservations import ReservationStatus, Settlement
from ledger.transactions import TransactionType
from tests.gateway.conftest import Gateway, Org, new_org, start
from tests.ledger.helpers import CREDIT

BODY: dict[str, Any] = {"messages": [{"role": "user", "content": "Suggest a question."}]}


@dataclass
class Webhook:
    """A notification receiver that fails each notification's first delivery."""

    url: str = ""
    received: list[dict[str, Any]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        payload = await request.json()
        first = all(
            (p["organization_id"], p["type"]) != (payload["organization_id"], payload["type"])
            for p in self.received
        )
        self.received.append(payload)
        return web.json_response({}, status=500 if first else 200)


@pytest.fixture
async def webhook() -> AsyncIterator[Webhook]:
    hook = Webhook()
    app = web.Application()
    app.router.add_post("/hook", hook.handle)
    server = await start(app)
    try:
        hook.url = str(server.make_url("/hook"))
        yield hook
    finally:
        await server.close()


async def chat(gateway: Gateway, org: Org) -> None:
    headers = {"Authorization": f"Bearer {org.key}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.v1 + "/chat/completions", json=BODY, headers=headers) as r:
            assert r.status == 200, await r.text()


async def drain_to(pool: asyncpg.Pool, org: Org, available_micro: int) -> None:
    before = await balances.get_balance(pool, org.id)
    amount = before.available_micro - available_micro
    await transactions.post(
        pool, org.id, TransactionType.ADMIN_ADJUSTMENT, -amount, f"drain-{uuid.uuid4()}"
    )


async def notification_counts(gateway: Gateway) -> dict[str, float]:
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.url + "/metrics") as response:
            text = await response.text()
    counts = {"low_balance": 0.0, "depleted": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gateway_low_balance_notifications_total":
                counts[sample.labels["type"]] += sample.value
    return counts


async def notification_rows(pool: asyncpg.Pool, org: Org) -> dict[str, asyncpg.Record]:
    rows = await pool.fetch(
        """SELECT threshold, notified_on, payload, attempts, delivered_at
             FROM credit_notifications WHERE organization_id = $1""",
        org.id,
    )
    return {row["threshold"]: row for row in rows}


def notified(metrics: Metrics) -> dict[str, float]:
    """gateway_low_balance_notifications_total by type, from one process's registry."""
    return {
        sample.labels["type"]: sample.value
        for metric in metrics.notifications.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    }


def assert_payload(payload: dict[str, Any], org: Org, threshold: str) -> None:
    assert set(payload) == {
        "type",
        "organization_id",
        "available",
        "spendable",
        "monthly_credits",
        "at",
    }
    assert (payload["type"], payload["organization_id"]) == (threshold, str(org.id))
    assert payload["monthly_credits"] == 10  # the free plan's allocation
    for name in ("available", "spendable"):
        assert isinstance(payload[name], int | float)
    assert payload["at"].endswith("Z")
    at = datetime.fromisoformat(payload["at"].replace("Z", "+00:00"))
    assert abs(datetime.now(UTC) - at) < timedelta(minutes=5)


async def test_low_balance_is_notified_once_per_threshold_and_day(
    sandbox_gateway: Gateway,
    pool: asyncpg.Pool,
    job_conn: asyncpg.Connection,
    session: aiohttp.ClientSession,
) -> None:
    # the in-serve job loop stays out of the way: this test delivers by itself
    await job_conn.execute("SELECT pg_advisory_lock($1)", jobs.NOTIFY_LOCK_ID)
    org = await new_org(pool, "free")  # 10 monthly + 10 bonus; low below 2 credits
    counted = await notification_counts(sandbox_gateway)

    await drain_to(pool, org, 3 * CREDIT // 2)  # 1.5 credits: low, not yet depleted
    await chat(sandbox_gateway, org)
    after_first = await balances.get_balance(pool, org.id)
    for _ in range(2):
        await chat(sandbox_gateway, org)
    rows = await notification_rows(pool, org)
    assert set(rows) == {"low_balance"}
    low = json.loads(rows["low_balance"]["payload"])
    assert_payload(low, org, "low_balance")
    assert low["available"] == after_first.available_micro / CREDIT
    assert low["spendable"] == after_first.spendable_micro / CREDIT
    assert rows["low_balance"]["notified_on"] == datetime.now(UTC).date()

    await drain_to(pool, org, CREDIT // 2)  # spendable 0.5 credits: depleted
    for _ in range(3):
        await chat(sandbox_gateway, org)
    rows = await notification_rows(pool, org)
    assert set(rows) == {"low_balance", "depleted"}
    depleted = json.loads(rows["depleted"]["payload"])
    assert_payload(depleted, org, "depleted")
    assert depleted["spendable"] <= 1

    now = await notification_counts(sandbox_gateway)
    assert {k: now[k] - counted[k] for k in now} == {"low_balance": 1, "depleted": 1}

    # another worker (its own memory of what it notified) records nothing new either
    fresh = Metrics()
    low_settlement = Settlement(
        ReservationStatus.SETTLED, True, None, 0, CREDIT // 4, CREDIT // 4, 10 * CREDIT
    )
    await Notifier(Decimal("0.2"), fresh).after_charge(pool, org.id, low_settlement)
    assert len(await notification_rows(pool, org)) == 2
    assert notified(fresh) == {}
    # with no webhook configured, logging and counting was the delivery
    assert await deliver(job_conn, session, None) == 2
    assert all(r["delivered_at"] for r in (await notification_rows(pool, org)).values())
    await job_conn.execute("SELECT pg_advisory_unlock($1)", jobs.NOTIFY_LOCK_ID)


async def test_notifications_are_delivered_with_retries(
    pool: asyncpg.Pool,
    job_conn: asyncpg.Connection,
    session: aiohttp.ClientSession,
    webhook: Webhook,
    sandbox_gateway: Gateway,
) -> None:
    await job_conn.execute("SELECT pg_advisory_lock($1)", jobs.NOTIFY_LOCK_ID)
    await deliver(job_conn, session, None)  # whatever earlier tests left is out of the way
    org = await new_org(pool, "free")
    await drain_to(pool, org, CREDIT // 2)
    await chat(sandbox_gateway, org)  # both thresholds at once
    assert set(await notification_rows(pool, org)) == {"low_balance", "depleted"}
    undelivered: int = await pool.fetchval(
        "SELECT count(*) FROM credit_notifications WHERE delivered_at IS NULL"
    )
    assert undelivered == 2  # this organization's alone

    assert await deliver(job_conn, session, webhook.url) == 0  # the webhook fails: 500
    assert len(webhook.received) == 2
    rows = await notification_rows(pool, org)
    assert [(r["attempts"], r["delivered_at"]) for r in rows.values()] == [(1, None)] * 2

    assert await deliver(job_conn, session, webhook.url) == 0  # too soon to retry
    assert len(webhook.received) == 2
    await pool.execute(  # the retry falls due 30 s after the first attempt
        """UPDATE credit_notifications SET created_at = created_at - interval '31 seconds'
            WHERE organization_id = $1""",
        org.id,
    )
    assert await deliver(job_conn, session, webhook.url) == 2
    assert len(webhook.received) == 4
    for payload in webhook.received:
        assert_payload(payload, org, payload["type"])
    assert sorted(p["type"] for p in webhook.received) == ["depleted"] * 2 + ["low_balance"] * 2
    rows = await notification_rows(pool, org)
    for row in rows.values():
        assert row["attempts"] == 2
        assert row["delivered_at"] is not None
        assert json.loads(row["payload"]) in webhook.received

    assert await deliver(job_conn, session, webhook.url) == 0  # delivered ones are done
    assert len(webhook.received) == 4
    await job_conn.execute("SELECT pg_advisory_unlock($1)", jobs.NOTIFY_LOCK_ID)


async def test_a_notification_the_database_missed_is_recorded_on_a_later_charge(
    pool: asyncpg.Pool, database_url: str
) -> None:
    org = await new_org(pool, "free")
    metrics = Metrics()
    notifier = Notifier(Decimal("0.2"), metrics)
    low = Settlement(
        ReservationStatus.SETTLED, True, None, 0, CREDIT // 4, CREDIT // 4, 10 * CREDIT
    )
    gone = await asyncpg.connect(database_url)
    await gone.close()  # PostgreSQL out of reach for this one charge
    with pytest.raises(LedgerUnavailable):
        await notifier.after_charge(gone, org.id, low)
    await notifier.after_charge(pool, org.id, low)
    assert set(await notification_rows(pool, org)) == {"low_balance", "depleted"}
    assert notified(metrics) == {"low_balance": 1, "depleted": 1}
