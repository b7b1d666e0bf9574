"""The gateway under test: the real app on this module's database, its providers either the
sandbox simulator (sandbox mode) or a recording simulator the test controls; and what the
scheduled jobs run with."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.config import Config
from gateway.upstream.sandbox import API_BASE_PATHS, RecordedRequest, create_simulator_app
from ledger import accounts, balances, transactions
from ledger.balances import Balance
from ledger.transactions import Transaction, TransactionType

ADMIN_KEY = "test-admin-key"
PROVIDER_KEYS = {"openai": "sk-openai-test", "anthropic": "sk-ant-test", "google": "g-test"}


@dataclass(frozen=True)
class Org:
    id: uuid.UUID
    key: str


@dataclass(frozen=True)
class Upstream:
    """A recording simulator standing in for every provider."""

    url: str
    recorded: list[RecordedRequest]


@dataclass(frozen=True)
class Gateway:
    url: str
    app: web.Application

    @property
    def v1(self) -> str:
        return self.url + "/v1"


async def start(app: web.Application) -> TestServer:
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


@pytest.fixture(scope="module")
async def upstream() -> AsyncIterator[Upstream]:
    recorded: list[RecordedRequest] = []
    server = await start(create_simulator_app(recorded))
    try:
        yield Upstream(str(server.make_url("")).rstrip("/"), recorded)
    finally:
        await server.close()


def pointed_at(config: Config, upstream: Upstream) -> Config:
    """The config with every provider's api_base on the recording simulator."""
    providers = {
        name: p.model_copy(update={"api_base": upstream.url + API_BASE_PATHS[p.kind]})
        for name, p in config.providers.items()
    }
    return config.model_copy(update={"providers": providers})


@pytest.fixture(scope="module")
async def gateway(
    database_url: str, redis_url: str, test_config: Config, upstream: Upstream, pool: asyncpg.Pool
) -> AsyncIterator[Gateway]:
    """The gateway with real provider clients aimed at the recording simulator."""
    app = create_app(
        pointed_at(test_config, upstream),
        database_url=database_url,
        redis_url=redis_url,
        admin_key=ADMIN_KEY,
    )
    with pytest.MonkeyPatch.context() as env:
        for name, provider in test_config.providers.items():
            env.setenv(provider.api_key_env, PROVIDER_KEYS[name])
        server = await start(app)
    try:
        yield Gateway(str(server.make_url("")).rstrip("/"), app)
    finally:
        await server.close()


def sandbox_app(config: Config, database_url: str, redis_url: str) -> web.Application:
    """The real app in sandbox mode: the product's own simulator behind every provider."""
    return create_app(
        config, database_url=database_url, redis_url=redis_url, admin_key=ADMIN_KEY, sandbox=True
    )


@pytest.fixture(scope="module")
async def sandbox_gateway(
    database_url: str, redis_url: str, test_config: Config, pool: asyncpg.Pool
) -> AsyncIterator[Gateway]:
    """The gateway in sandbox mode: the product's own simulator behind every provider."""
    app = sandbox_app(test_config, database_url, redis_url)
    server = await start(app)
    try:
        yield Gateway(str(server.make_url("")).rstrip("/"), app)
    finally:
        await server.close()


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


async def new_org(pool: asyncpg.Pool, plan: str = "pro", name: str = "org") -> Org:
    org = await accounts.create_organization(pool, name, plan)
    key = await accounts.create_api_key(pool, org.id)
    return Org(org.id, key.key)


async def consumption(pool: asyncpg.Pool, org: Org) -> list[Transaction]:
    page = await transactions.list_transactions(
        pool, org.id, limit=500, types=frozenset({TransactionType.CONSUMPTION})
    )
    return page.data


async def reservation_rows(pool: asyncpg.Pool, org: Org) -> list[asyncpg.Record]:
    return await pool.fetch(
        """SELECT status, amount_micro, charged_micro, request_id
             FROM credit_reservations WHERE organization_id = $1""",
        org.id,
    )


async def drain_to(pool: asyncpg.Pool, org: Org, available_micro: int) -> Balance:
    """Take credits away with an admin adjustment until `available_micro` are left."""
    before = await balances.get_balance(pool, org.id)
    amount = before.available_micro - available_micro
    await transactions.post(
        pool, org.id, TransactionType.ADMIN_ADJUSTMENT, -amount, f"drain-{uuid.uuid4()}"
    )
    after = await balances.get_balance(pool, org.id)
    assert after.available_micro == available_micro
    return after
