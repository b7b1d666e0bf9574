"""Fixtures: real PostgreSQL and Redis (the local ones, else embedded), a database per test
module cloned from a migrated and seeded template, and the ledger invariant after every test
that touched the ledger."""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis

from gateway.config import Config, load_config
from gateway.embedded import EmbeddedPostgres, EmbeddedRedis
from ledger import catalog_sync, migrations
from ledger.check import check_ledger
from tests.support import (
    REPO,
    RUN_ID,
    create_database,
    drop_database,
    env_url,
    postgres_reachable,
    redis_reachable,
)

_module_numbers = itertools.count()


@pytest.fixture(scope="session")
def config() -> Config:
    return load_config(REPO / "config.yaml")


@pytest.fixture(scope="session")
def embedded_home() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="gateway-test-") as home:
        yield Path(home)


@pytest.fixture(scope="session")
async def postgres_server_url(embedded_home: Path) -> AsyncIterator[str]:
    """A PostgreSQL server this run may create databases on."""
    url = env_url("DATABASE_URL")
    if url and await postgres_reachable(url):
        yield url
        return
    server = EmbeddedPostgres(embedded_home / "pg").start()
    try:
        yield server.dsn
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_url(embedded_home: Path) -> Iterator[str]:
    url = env_url("REDIS_URL")
    if url and redis_reachable(url):
        yield url
        return
    server = EmbeddedRedis(embedded_home / "redis").start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
async def redis_prefix(redis_url: str) -> AsyncIterator[str]:
    """This run's Redis key prefix; its keys are deleted at the end of the run."""
    prefix = f"gwt:{RUN_ID}:"
    yield prefix
    client: Redis = Redis.from_url(redis_url)
    try:
        async for key in client.scan_iter(match=f"{prefix}*", count=500):
            await client.delete(key)
    finally:
        await client.aclose()


@pytest.fixture(scope="module")
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    """A client of the test Redis."""
    client: Redis = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
def test_config(config: Config, redis_prefix: str) -> Config:
    """The default config with this run's Redis key prefix."""
    limits = config.rate_limits.model_copy(update={"key_prefix": redis_prefix})
    return config.model_copy(update={"rate_limits": limits})


@pytest.fixture(scope="session")
async def template_database(postgres_server_url: str, config: Config) -> AsyncIterator[str]:
    """A migrated and seeded database that each module's database is cloned from."""
    name = f"gwt_{RUN_ID}_template"
    url = await create_database(postgres_server_url, name)
    conn = await asyncpg.connect(url)
    try:
        await migrations.up(conn)
        await catalog_sync.seed(conn, config)
    finally:
        await conn.close()
    try:
        yield name
    finally:
        await drop_database(postgres_server_url, name)


@pytest.fixture(scope="module")
async def database_url(postgres_server_url: str, template_database: str) -> AsyncIterator[str]:
    """A fresh database for this test module, migrated and seeded."""
    name = f"gwt_{RUN_ID}_{next(_module_numbers)}"
    url = await create_database(postgres_server_url, name, template=template_database)
    try:
        yield url
    finally:
        await drop_database(postgres_server_url, name)


@pytest.fixture(scope="module")
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=20)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture(autouse=True)
async def _ledger_invariant(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """After every test that used the database: each balance equals its entries."""
    yield
    if "pool" not in request.fixturenames:
        return
    pool: asyncpg.Pool = request.getfixturevalue("pool")
    violations = await check_ledger(pool)
    assert violations == [], f"ledger invariant broken: {violations}"


def pytest_report_header() -> list[str]:
    where = os.environ.get("DATABASE_URL") or "embedded PostgreSQL"
    return [f"database server: {where}; run id {RUN_ID}"]
