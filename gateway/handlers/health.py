"""Liveness and readiness."""

from __future__ import annotations

from aiohttp import web

from gateway.resources import DB_POOL
from ledger import migrations
from ledger.errors import LedgerUnavailable


async def healthz(request: web.Request) -> web.Response:
    """The process is alive and serving."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """PostgreSQL is reachable and its schema is current."""
    checks: dict[str, str] = {}
    try:
        async with request.app[DB_POOL].acquire(timeout=2) as conn:
            pending = await migrations.pending(conn)
        checks["postgres"] = "ok" if not pending else f"migrations pending: {pending}"
    except (LedgerUnavailable, OSError, TimeoutError):
        checks["postgres"] = "unreachable"
    ready = all(value == "ok" for value in checks.values())
    return web.json_response(
        {"status": "ok" if ready else "unavailable", "checks": checks}, status=200 if ready else 503
    )
