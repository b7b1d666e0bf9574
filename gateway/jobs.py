"""Scheduled jobs: period resets, reservation expiry, low-balance notification delivery and
expired Idempotency-Key records. They run inside `serve` every JOB_INTERVAL_S and as
`llm-gateway jobs`. Each job holds a PostgreSQL advisory lock while it runs, so with many
instances each runs in one place at a time; every unit of work is one atomic ledger call, so
a crash half-way leaves nothing half-done."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime

import aiohttp
import asyncpg
from aiohttp import web

from gateway.config import Config
from gateway.notifications import deliver
from ledger import idempotency, periods, reservations
from ledger.errors import LedgerError

log = logging.getLogger(__name__)

JOB_INTERVAL_S = 30.0  # how often the jobs look for work
# advisory lock ids, one per job
RESET_LOCK_ID = 0x6A6F_6201
EXPIRE_LOCK_ID = 0x6A6F_6202
NOTIFY_LOCK_ID = 0x6A6F_6203
PURGE_LOCK_ID = 0x6A6F_6204

JobResult = dict[str, int | None]


async def _locked(
    conn: asyncpg.Connection, lock_id: int, job: Callable[[], Awaitable[int]]
) -> int | None:
    """Run `job` if no other process holds its lock; None when skipped."""
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", lock_id):
        return None
    try:
        return await job()
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", lock_id)


async def reset_periods(conn: asyncpg.Connection, now: datetime | None = None) -> int:
    """Reset every organization whose period has ended; returns how many."""
    done = 0
    while due := await periods.due_for_reset(conn, now):
        progress = 0
        for organization_id in due:
            progress += (await periods.reset_period(conn, organization_id, now)).reset
        done += progress
        if not progress:  # only if another process got there first
            break
    return done


async def run_once(
    conn: asyncpg.Connection,
    config: Config,
    session: aiohttp.ClientSession,
    now: datetime | None = None,
) -> JobResult:
    """One pass of every job. `conn` is a dedicated connection (advisory locks are held
    per session), never one from the request pool."""
    url = config.credits.notify_webhook_url
    return {
        "periods_reset": await _locked(conn, RESET_LOCK_ID, lambda: reset_periods(conn, now)),
        "reservations_expired": await _locked(
            conn, EXPIRE_LOCK_ID, lambda: reservations.expire_due(conn, now)
        ),
        "notifications_delivered": await _locked(
            conn, NOTIFY_LOCK_ID, lambda: deliver(conn, session, url)
        ),
        "idempotency_records_purged": await _locked(
            conn, PURGE_LOCK_ID, lambda: idempotency.purge_expired(conn)
        ),
    }


async def run_jobs(database_url: str, config: Config, *, once: bool) -> JobResult:
    """`llm-gateway jobs [--once]`."""
    async with aiohttp.ClientSession() as session:
        while True:
            result = await _one_pass(database_url, config, session)
            if once:
                return result
            await asyncio.sleep(JOB_INTERVAL_S)


async def _one_pass(database_url: str, config: Config, session: aiohttp.ClientSession) -> JobResult:
    conn = await asyncpg.connect(database_url)
    try:
        result = await run_once(conn, config, session)
    finally:
        await conn.close()
    if any(result.values()):
        log.info("jobs: %s", result)
    return result


def job_loop(
    database_url_key: web.AppKey[str],
    config_key: web.AppKey[Config],
    session_key: web.AppKey[aiohttp.ClientSession],
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context running the jobs inside `serve`; the task is kept and awaited."""

    async def loop(app: web.Application) -> None:
        while True:
            await asyncio.sleep(JOB_INTERVAL_S)
            try:
                await _one_pass(app[database_url_key], app[config_key], app[session_key])
            except (LedgerError, OSError, asyncpg.PostgresError) as exc:
                log.warning("jobs: pass failed (%s); retrying in %s s", exc, JOB_INTERVAL_S)

    async def context(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(loop(app), name="gateway-jobs")
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    return context
