"""Liveness and readiness."""

from __future__ import annotations

import asyncio

from aiohttp import web
from redis.exceptions import RedisError

from gateway.resources import DB_POOL, REDIS
from ledger import migrations
from ledger.errors import LedgerUnavailable

READY_CHECK_TIMEOUT_S = 2.0


async def healthz(request: web.Request) -> web.Response:
    """The process is alive and serving."""
    return web.json_response({"status": "ok"})


async def _postgres(request: web.Request) -> str:
    try:
        async with asyncio.timeout(READY_CHECK_TIMEOUT_S):
            async with request.app[DB_POOL].acquire() as conn:
                pending = await migrations.pending(conn)
    except (LedgerUnavailable, OSError, TimeoutError):
        return "unreachable"
    return "ok" if not pending else f"migrations pending: {pending}"


async def _redis(request: web.Request) -> str:
    try:
        async with asyncio.timeout(READY_CHECK_TIMEOUT_S):
            await request.app[REDIS].ping()
    except (RedisError, OSError, TimeoutError):
        return "unreachable"
    return "ok"


async def readyz(request: web.Request) -> web.Response:
    """PostgreSQL and Redis are reachable and the schema is current."""
    checks = {"postgres": await _postgres(request), "redis": await _redis(request)}
    ready = all(value == "ok" for value in checks.values())
    return web.json_response(
        {"status": "ok" if ready else "unavailable", "checks": checks}, status=200 if ready else 503
    )
