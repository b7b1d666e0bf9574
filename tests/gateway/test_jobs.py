"""The scheduled jobs (SPEC §4): period resets with scheduled downgrades, expiry of holds left
by a killed gateway, the same work from two processes at once done once, and low-balance
notifications recorded once a day and delivered with retries. Time moves by `now=` or by
moving timestamps in the database, never by sleeping."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from gateway import jobs
from gateway.config import Config
from gateway.jobs import JobResult, run_once
from gateway.metrics import Metrics
from gateway.notifications import Notifier, deliver
from ledger import accounts, balances, periods, reservations, transactions
from ledger.errors import LedgerUnavailable
from ledger.periods import PlanChangeKind
from ledger.reservations import ReservationStatus, Settlement
from ledger.transactions import TransactionType
from tests.gateway.conftest import ADMIN_KEY, Gateway, Org, new_org, start
from tests.ledger.helpers import CREDIT, add_months, consume, entries
from tests.processes import running_gateway, write_config

ALLOCATION = TransactionType.PLAN_ALLOCATION
EXPIRY = TransactionType.MONTHLY_EXPIRY
CHAT = "/v1/chat/completions"
BODY: dict[str, Any] = {"messages": [{"role": "user", "content": "Suggest a question."}]}
POLL_S = 0.05
WAIT_S = 20.0  # bound on every wait for something another process does
JOBS_TIMEOUT_S = 60.0


@pytest.fixture
async def job_conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A dedicated connection, as the jobs want (advisory locks are per session)."""
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {WAIT_S} s: {what}")
        await asyncio.sleep(POLL_S)


async def org_on(pool: asyncpg.Pool, plan: str, *, now: datetime | None = None) -> uuid.UUID:
    org = await accounts.create_organization(pool, f"jobs-{uuid.uuid4().hex[:12]}", plan, now=now)
    return org.id


async def move_period_back(pool: asyncpg.Pool, org_id: uuid.UUID) -> tuple[datetime, datetime]:
    """Move the organization's clock a month back: its billing anchor, its period (which
    ended a minute ago) and a scheduled plan change (due at that end). Returns (start, end)."""
    start = add_months(datetime.now(UTC) - timedelta(minutes=1), -1)
    end = add_months(start, 1)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            """UPDATE organization_credit_balances
                  SET billing_anchor = $2, period_start = $2, period_end = $3
                WHERE organization_id = $1""",
            org_id,
            start,
            end,
        )
        await conn.execute(
            """UPDATE organization_plans SET pending_change_at = $2
                WHERE organization_id = $1 AND pending_change_at IS NOT NULL""",
            org_id,
            end,
        )
    return start, end


async def schedule_downgrade(pool: asyncpg.Pool, org_id: uuid.UUID, plan: str) -> None:
    change = await periods.change_plan(pool, org_id, plan, direction="downgrade")
    assert (change.kind, change.plan) == (PlanChangeKind.DOWNGRADE_SCHEDULED, plan)
    assert (await accounts.get_organization(pool, org_id)).pending_plan == plan


async def assert_reset_and_downgraded(
    pool: asyncpg.Pool,
    org_id: uuid.UUID,
    *,
    plan: str,
    expired_micro: int,
    allocated_micro: int,
    bonus_micro: int,
    period: tuple[datetime, datetime],
) -> None:
    balance = await balances.get_balance(pool, org_id)
    assert balance.plan == plan
    assert (balance.period_start, balance.period_end) == period
    assert balance.monthly_credits_micro == allocated_micro
    assert balance.monthly_remaining_micro == allocated_micro
    assert balance.bonus_credits_micro == bonus_micro  # bonus credits persist
    organization = await accounts.get_organization(pool, org_id)
    assert (organization.plan, organization.pending_plan) == (plan, None)
    [expiry] = await entries(pool, org_id, EXPIRY)
    assert (expiry.amount_micro, expiry.monthly_micro, expiry.bonus_micro) == (
        -expired_micro,
        -expired_micro,
        0,
    )
    newest, _first = await entries(pool, org_id, ALLOCATION)
    assert newest.amount_micro == allocated_micro
    assert newest.idempotency_key.startswith("plan_allocation:")


async def test_a_period_moved_into_the_past_is_reset_with_its_downgrade(
    pool: asyncpg.Pool, job_conn: asyncpg.Connection, session: aiohttp.ClientSession, config: Config
) -> None:
    org_id = await org_on(pool, "pro")  # 500 monthly + 25 welcome bonus
    await consume(pool, org_id, 120 * CREDIT)
    await transactions.post(pool, org_id, TransactionType.PROMO_BONUS, 7 * CREDIT, "promo-jobs")
    await schedule_downgrade(pool, org_id, "free")
    start, end = await move_period_back(pool, org_id)
    assert await periods.due_for_reset(pool) == [org_id]

    result = await run_once(job_conn, config, session)
    assert result["periods_reset"] == 1
    await assert_reset_and_downgraded(
        pool,
        org_id,
        plan="free",
        expired_micro=380 * CREDIT,
        allocated_micro=10 * CREDIT,
        bonus_micro=32 * CREDIT,
        period=(end, add_months(start, 2)),
    )
    assert (await balances.get_balance(pool, org_id)).overdraft_limit_micro == 0  # free's
    assert (await run_once(job_conn, config, session))["periods_reset"] == 0  # done once


async def test_run_once_with_a_later_now_resets_and_downgrades(
    pool: asyncpg.Pool, job_conn: asyncpg.Connection, session: aiohttp.ClientSession, config: Config
) -> None:
    start = datetime.now(UTC)
    org_id = await org_on(pool, "team", now=start)  # 2000 monthly + 50 welcome bonus
    await consume(pool, org_id, 300 * CREDIT)
    await schedule_downgrade(pool, org_id, "pro")
    later = start + timedelta(days=40)
    due = await periods.due_for_reset(job_conn, later)
    assert org_id in due

    result = await run_once(job_conn, config, session, now=later)
    assert result["periods_reset"] == len(due)
    await assert_reset_and_downgraded(
        pool,
        org_id,
        plan="pro",
        expired_micro=1700 * CREDIT,
        allocated_micro=500 * CREDIT,
        bonus_micro=50 * CREDIT,
        period=(add_months(start, 1), add_months(start, 2)),
    )
    assert (await balances.get_balance(pool, org_id)).overdraft_limit_micro == 10 * CREDIT
    assert (await run_once(job_conn, config, session, now=later))["periods_reset"] == 0


async def hanging_stream(gateway_v1: str, org: Org) -> None:
    """A streamed call whose upstream never answers."""
    headers = {"Authorization": f"Bearer {org.key}", "X-Sandbox-Fault": "timeout"}
    async with aiohttp.ClientSession() as http:
        async with http.post(
            gateway_v1 + "/chat/completions", json={**BODY, "stream": True}, headers=headers
        ) as response:
            await response.read()


async def test_a_hold_left_by_a_killed_gateway_is_expired_by_the_jobs(
    pool: asyncpg.Pool,
    job_conn: asyncpg.Connection,
    session: aiohttp.ClientSession,
    database_url: str,
    redis_url: str,
    test_config: Config,
) -> None:
    org = await new_org(pool, "pro")
    before = await balances.get_balance(pool, org.id)
    async with running_gateway(
        test_config, database_url=database_url, redis_url=redis_url, admin_key=ADMIN_KEY
    ) as gw:
        call = asyncio.create_task(hanging_stream(gw.v1, org))
        try:
            await eventually(
                lambda: _has_pending(pool, org.id), "the call's hold is pending in PostgreSQL"
            )
            os.killpg(gw.process.pid, signal.SIGKILL)
            assert await gw.wait(WAIT_S) == -signal.SIGKILL
            with pytest.raises(aiohttp.ClientError):
                await asyncio.wait_for(call, WAIT_S)
        finally:
            call.cancel()
            await asyncio.gather(call, return_exceptions=True)

    [hold] = await reservations.list_pending(pool, org.id)  # nobody was left to release it
    held = await balances.get_balance(pool, org.id)
    assert held.reserved_credits_micro == hold.amount_micro > 0

    early = await run_once(
        job_conn, test_config, session, now=hold.expires_at - timedelta(seconds=1)
    )
    assert early["reservations_expired"] == 0
    assert await reservations.list_pending(pool, org.id) == [hold]

    due = await run_once(job_conn, test_config, session, now=hold.expires_at + timedelta(seconds=1))
    assert due["reservations_expired"] == 1
    status = await pool.fetchval(
        "SELECT status FROM credit_reservations WHERE organization_id = $1 AND id = $2",
        org.id,
        hold.id,
    )
    assert status == ReservationStatus.EXPIRED
    after = await balances.get_balance(pool, org.id)
    assert after.reserved_credits_micro == 0
    assert after.available_micro == before.available_micro  # nothing charged
    assert await entries(pool, org.id, TransactionType.CONSUMPTION) == []


async def _has_pending(pool: asyncpg.Pool, org_id: uuid.UUID) -> bool:
    return bool(await reservations.list_pending(pool, org_id))


@dataclass
class DueWork:
    """Organizations whose period has ended and holds past their ttl, made for one test."""

    next_period_start: datetime  # of the organizations' new period
    orgs: list[uuid.UUID] = field(default_factory=list)
    holds: list[tuple[uuid.UUID, uuid.UUID]] = field(default_factory=list)  # (org, hold)


async def prepare_due_work(pool: asyncpg.Pool, count: int) -> DueWork:
    past = add_months(datetime.now(UTC) - timedelta(minutes=1), -1)
    work = DueWork(next_period_start=add_months(past, 1))
    for _ in range(count):
        work.orgs.append(await org_on(pool, "pro", now=past))
        holder = await org_on(pool, "pro")
        hold = await reservations.reserve(
            pool,
            holder,
            f"hold-{uuid.uuid4()}",
            minimum_micro=CREDIT,
            requested_micro=CREDIT,
            ttl_s=600,
        )
        work.holds.append((holder, hold.id))
    await pool.execute(  # the holds were taken an hour ago: their ttl has run out
        """UPDATE credit_reservations
              SET created_at = created_at - interval '1 hour',
                  expires_at = expires_at - interval '1 hour'
            WHERE id = ANY($1::uuid[])""",
        [hold for _, hold in work.holds],
    )
    assert set(await periods.due_for_reset(pool)) == set(work.orgs)
    assert await _due_holds(pool) == len(work.holds)
    return work


async def _due_holds(pool: asyncpg.Pool) -> int:
    count: int = await pool.fetchval(
        "SELECT count(*) FROM credit_reservations WHERE status = 'pending' AND expires_at <= now()"
    )
    return count


async def assert_done_once(pool: asyncpg.Pool, work: DueWork, results: list[JobResult]) -> None:
    for result in results:
        assert all(v is None or isinstance(v, int) for v in result.values()), result
    assert sum(r["periods_reset"] or 0 for r in results) == len(work.orgs)
    assert sum(r["reservations_expired"] or 0 for r in results) == len(work.holds)
    for org_id in work.orgs:
        allocations = await entries(pool, org_id, ALLOCATION)
        assert [a.amount_micro for a in allocations] == [500 * CREDIT] * 2  # first, then one
        assert [e.amount_micro for e in await entries(pool, org_id, EXPIRY)] == [-500 * CREDIT]
        balance = await balances.get_balance(pool, org_id)
        assert balance.period_start == work.next_period_start
    for org_id, hold_id in work.holds:
        status = await pool.fetchval(
            "SELECT status FROM credit_reservations WHERE organization_id = $1 AND id = $2",
            org_id,
            hold_id,
        )
        assert status == ReservationStatus.EXPIRED
        assert (await balances.get_balance(pool, org_id)).reserved_credits_micro == 0
    assert await periods.due_for_reset(pool) == []
    assert await _due_holds(pool) == 0


async def jobs_once(config_path: Path, database_url: str) -> JobResult:
    """`llm-gateway jobs --once` in its own process; its printed result."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "jobs",
        "--once",
        "--config",
        str(config_path),
        env={**os.environ, "DATABASE_URL": database_url, "GATEWAY_HOME": str(config_path.parent)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), JOBS_TIMEOUT_S)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode == 0, err.decode(errors="replace")
    result: JobResult = json.loads(out)
    return result


async def test_two_jobs_processes_at_once_do_each_piece_of_work_once(
    pool: asyncpg.Pool, database_url: str, config: Config
) -> None:
    work = await prepare_due_work(pool, 6)
    with tempfile.TemporaryDirectory(prefix="gateway-jobs-") as tmp:
        path = write_config(config, Path(tmp))
        results = await asyncio.gather(*(jobs_once(path, database_url) for _ in range(2)))
    await assert_done_once(pool, work, list(results))


async def test_two_job_passes_on_two_connections_do_each_piece_of_work_once(
    pool: asyncpg.Pool, database_url: str, config: Config, session: aiohttp.ClientSession
) -> None:
    work = await prepare_due_work(pool, 6)
    first, second = await asyncio.gather(
        asyncpg.connect(database_url), asyncpg.connect(database_url)
    )
    try:
        results = await asyncio.gather(
            run_once(first, config, session), run_once(second, config, session)
        )
        await assert_done_once(pool, work, list(results))
        # without the advisory locks too: each unit of work is atomic and idempotent
        work = await prepare_due_work(pool, 6)
        resets = await asyncio.gather(jobs.reset_periods(first), jobs.reset_periods(second))
        expiries = await asyncio.gather(
            reservations.expire_due(first), reservations.expire_due(second)
        )
    finally:
        await asyncio.gather(first.close(), second.close())
    unlocked: list[JobResult] = [
        {"periods_reset": reset, "reservations_expired": expired}
        for reset, expired in zip(resets, expiries, strict=True)
    ]
    await assert_done_once(pool, work, unlocked)


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
