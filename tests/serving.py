"""What the tests of `llm-gateway serve` as a whole process share: organizations and calls
against a running gateway, its workers listening on its port, and what the calls left in the
ledger."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import psutil  # type: ignore[import-untyped]

from ledger import accounts, transactions
from ledger.transactions import Transaction, TransactionType
from tests.processes import GatewayProcess

ADMIN_KEY = "test-admin-key"
CHAT = "/chat/completions"
BODY: dict[str, Any] = {"messages": [{"role": "user", "content": "Suggest a question."}]}
POLL_S = 0.05
WAIT_S = 30.0  # bound on every wait for something the gateway processes do


@dataclass(frozen=True)
class Org:
    id: uuid.UUID
    key: str


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Mapping[str, str]
    text: str


async def new_org(pool: asyncpg.Pool, plan: str) -> Org:
    org = await accounts.create_organization(pool, f"server-{uuid.uuid4().hex[:12]}", plan)
    return Org(org.id, (await accounts.create_api_key(pool, org.id)).key)


def fresh_connections() -> aiohttp.ClientSession:
    """A client opening a new connection per request, so that requests spread over workers."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True, limit=0),
        timeout=aiohttp.ClientTimeout(total=WAIT_S * 2),
    )


async def chat(
    http: aiohttp.ClientSession, base: str, org: Org, headers: Mapping[str, str] | None = None
) -> Reply:
    send = {"Authorization": f"Bearer {org.key}", **(headers or {})}
    async with http.post(base + CHAT, json=BODY, headers=send) as response:
        return Reply(response.status, response.headers, await response.text())


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {WAIT_S} s: {what}")
        await asyncio.sleep(POLL_S)


def listening_pids(gw: GatewayProcess) -> set[int]:
    """The gateway's processes (itself, or its workers) listening on its port."""
    port = int(gw.url.rsplit(":", 1)[1])
    try:
        root = psutil.Process(gw.process.pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return set()
    pids = set()
    for process in family:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            for conn in process.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port:
                    pids.add(process.pid)
    return pids


async def serving_pids(gw: GatewayProcess, workers: int) -> set[int]:
    """Wait until every worker listens (the first one answering /readyz is not all)."""

    async def all_listening() -> bool:
        return len(listening_pids(gw)) == workers

    await eventually(all_listening, f"{workers} workers listening")
    return listening_pids(gw)


async def consumption(pool: asyncpg.Pool, org: Org) -> list[Transaction]:
    page = await transactions.list_transactions(
        pool, org.id, limit=500, types=frozenset({TransactionType.CONSUMPTION})
    )
    return page.data


async def reservation_statuses(pool: asyncpg.Pool, org: Org) -> Counter[str]:
    rows = await pool.fetch(
        "SELECT status FROM credit_reservations WHERE organization_id = $1", org.id
    )
    return Counter(row["status"] for row in rows)
