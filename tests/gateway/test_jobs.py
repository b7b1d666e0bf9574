"""The scheduled jobs (SPEC §4): period resets with scheduled downgrades, expiry of holds left
by a killed gateway, and the same work from two processes at once done once. Time moves by
`now=` or by moving timestamps in the database, never by sleeping."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from gateway import jobs
from gateway.config import Config
from gateway.jobs import JobResult, run_once
from ledger import accounts, balances, periods, reservations, transactions
from ledger.periods import PlanChangeKind
from ledger.reservations import ReservationStatus
from ledger.transactions import TransactionType
from tests.gateway.conftest import ADMIN_KEY, Org, new_org
from tests.ledger.helpers import CREDIT, add_months, consume, entries
from tests.processes import running_gateway, write_config

ALLOCATION = TransactionType.PLAN_ALLOCATION
EXPIRY = TransactionType.MONTHLY_EXPIRY
BODY: dict[str, Any] = {"messages": [{"role": "user", "content": "Suggest a question."}]}
POLL_S = 0.05
WAIT_S = 20.0  # bound on every wait for something another process does
JOBS_TIMEOUT_S = 60.0


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
