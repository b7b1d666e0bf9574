"""Scheduled jobs: period resets and reservation expiry. Each job holds a PostgreSQL advisory
lock while it runs, so with many instances each runs in one place at a time; every unit of
work is one atomic ledger call, so a crash half-way leaves nothing half-done."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime

import asyncpg

from gateway.config import Config
from ledger import periods, reservations

log = logging.getLogger(__name__)

JOB_INTERVAL_S = 30.0  # how often `jobs` (and serve's job loop) looks for work
# advisory lock ids, one per job
RESET_LOCK_ID = 0x6A6F_6201
EXPIRE_LOCK_ID = 0x6A6F_6202


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


async def run_once(conn: asyncpg.Connection, now: datetime | None = None) -> dict[str, int | None]:
    return {
        "periods_reset": await _locked(conn, RESET_LOCK_ID, lambda: reset_periods(conn, now)),
        "reservations_expired": await _locked(
            conn, EXPIRE_LOCK_ID, lambda: reservations.expire_due(conn, now)
        ),
    }


async def run_jobs(database_url: str, config: Config, *, once: bool) -> dict[str, int | None]:
    conn = await asyncpg.connect(database_url)
    try:
        while True:
            result = await run_once(conn)
            log.info("jobs: %s", result)
            if once:
                return result
            await asyncio.sleep(JOB_INTERVAL_S)
    finally:
        await conn.close()
