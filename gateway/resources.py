"""Long-lived resources of the app, one cleanup context each, set up beside their teardown."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
from aiohttp import web

from gateway.config import Config

CONFIG = web.AppKey("config", Config)
DATABASE_URL = web.AppKey("database_url", str)
DB_POOL = web.AppKey("db_pool", asyncpg.Pool)


async def postgres_pool(app: web.Application) -> AsyncIterator[None]:
    server = app[CONFIG].server
    pool = await asyncpg.create_pool(
        app[DATABASE_URL], min_size=server.db_pool_min, max_size=server.db_pool_max
    )
    app[DB_POOL] = pool
    yield
    await pool.close()
