"""`llm-gateway serve` as a whole process (SPEC §2, §7): N workers on one port serving one set
of metrics (a dead worker replaced, its counts kept), SIGTERM while streams are in flight or
while the workers start, and two instances sharing one PostgreSQL and one Redis: one balance,
one rate limit, nothing charged twice."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psutil  # type: ignore[import-untyped]
import pytest
from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import Config
from gateway.metrics import MULTIPROC_ENV
from ledger import accounts, balances, reservations, transactions
from ledger.check import check_ledger
from ledger.transactions import Transaction, TransactionType
from tests.processes import GatewayProcess, running_gateway, started_gateway

ADMIN_KEY = "test-admin-key"
CHAT = "/chat/completions"
BODY: dict[str, Any] = {"messages": [{"role": "user", "content": "Suggest a question."}]}
POLL_S = 0.05
WAIT_S = 30.0  # bound on every wait for something the gateway processes do
STREAMS = 20
STREAM_DELAY_MS = 4000  # each stream's upstream answers after this: long enough to be caught
SHUTDOWN_TIMEOUT_S = 20.0
PRO_RPM = 30


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


def requests_counted(text: str, status: str = "200") -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gateway_requests_total" and sample.labels["status"] == status:
                total += sample.value
    return total


def requests_by_worker(pids: set[int]) -> dict[int, float]:
    """gateway_requests_total{status="200"} as each worker counted it, from its own file."""
    counts = {}
    for pid in pids:
        directory = Path(psutil.Process(pid).environ()[MULTIPROC_ENV])
        with tempfile.TemporaryDirectory(prefix="gateway-worker-metrics-") as alone:
            shutil.copy(directory / f"counter_{pid}.db", alone)
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=alone)  # type: ignore[no-untyped-call]
            counts[pid] = sum(
                sample.value
                for metric in registry.collect()
                for sample in metric.samples
                if sample.name == "gateway_requests_total" and sample.labels["status"] == "200"
            )
    return counts


def with_shutdown_timeout(config: Config, seconds: float) -> Config:
    server = config.server.model_copy(update={"shutdown_timeout_s": seconds})
    return config.model_copy(update={"server": server})


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


async def test_workers_serve_one_port_and_one_set_of_metrics(
    database_url: str, redis_url: str, test_config: Config, pool: asyncpg.Pool
) -> None:
    org = await new_org(pool, "team")  # no rate limits
    requests = 24
    async with running_gateway(
        test_config,
        database_url=database_url,
        redis_url=redis_url,
        admin_key=ADMIN_KEY,
        args=("--sandbox", "--workers", "2"),
    ) as gw:
        workers = await serving_pids(gw, 2)
        async with fresh_connections() as http:
            replies = await asyncio.gather(*(chat(http, gw.v1, org) for _ in range(requests)))
            assert [r.status for r in replies] == [200] * requests
            for _ in range(6):  # each scrape may land on either worker
                async with http.get(gw.url + "/metrics") as response:
                    assert response.status == 200
                    assert requests_counted(await response.text()) == requests
        by_worker = requests_by_worker(workers)
    assert sum(by_worker.values()) == requests
    assert all(count > 0 for count in by_worker.values()), by_worker  # both served
    assert len(await consumption(pool, org)) == requests


async def scraped_requests(http: aiohttp.ClientSession, gw: GatewayProcess) -> float:
    async with http.get(gw.url + "/metrics") as response:
        assert response.status == 200
        return requests_counted(await response.text())


async def test_a_worker_that_dies_is_replaced_and_its_counts_are_kept(
    database_url: str, redis_url: str, test_config: Config, pool: asyncpg.Pool
) -> None:
    org = await new_org(pool, "team")
    batch = 10
    async with running_gateway(
        test_config,
        database_url=database_url,
        redis_url=redis_url,
        admin_key=ADMIN_KEY,
        args=("--sandbox", "--workers", "2"),
    ) as gw:
        victim = min(await serving_pids(gw, 2))
        async with fresh_connections() as http:
            replies = await asyncio.gather(*(chat(http, gw.v1, org) for _ in range(batch)))
            os.kill(victim, signal.SIGKILL)

            async def replaced() -> bool:
                pids = listening_pids(gw)
                return len(pids) == 2 and victim not in pids

            await eventually(replaced, "the dead worker replaced")
            replies += await asyncio.gather(*(chat(http, gw.v1, org) for _ in range(batch)))
            assert [r.status for r in replies] == [200] * 2 * batch
            for _ in range(6):
                assert await scraped_requests(http, gw) == 2 * batch  # the dead one's too
        gw.signal(signal.SIGTERM)
        exit_code = await gw.wait(WAIT_S)
        log = gw.log()
    assert exit_code == 0, log
    assert len(await consumption(pool, org)) == 2 * batch


async def stream(http: aiohttp.ClientSession, gw: GatewayProcess, org: Org) -> list[str]:
    """A streamed call whose upstream takes a while; the SSE `data:` payloads it got."""
    headers = {"Authorization": f"Bearer {org.key}", "X-Sandbox-Delay-Ms": str(STREAM_DELAY_MS)}
    body = {**BODY, "stream": True, "stream_options": {"include_usage": True}}
    async with http.post(gw.v1 + CHAT, json=body, headers=headers) as response:
        assert response.status == 200, await response.text()
        text = await response.text()
    return [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]


async def stop(gw: GatewayProcess, workers: set[int], *, everyone: bool) -> None:
    """SIGTERM to the server; with `everyone`, to every process of it, workers first, as
    systemd's default KillMode=control-group (or a terminal's Ctrl-C, with SIGINT) does."""
    if everyone:
        for pid in workers:
            os.kill(pid, signal.SIGTERM)

        async def stopped_listening() -> bool:
            return not listening_pids(gw)

        await eventually(stopped_listening, "the workers began to shut down")
    gw.signal(signal.SIGTERM)


@pytest.mark.parametrize(
    ("workers", "everyone"),
    [(1, False), (2, False), (2, True)],
    ids=["1-worker", "2-workers", "2-workers-every-process-signalled"],
)
async def test_sigterm_lets_in_flight_streams_finish(
    workers: int,
    everyone: bool,
    database_url: str,
    redis_url: str,
    test_config: Config,
    pool: asyncpg.Pool,
) -> None:
    org = await new_org(pool, "team")
    config = with_shutdown_timeout(test_config, SHUTDOWN_TIMEOUT_S)
    async with running_gateway(
        config,
        database_url=database_url,
        redis_url=redis_url,
        admin_key=ADMIN_KEY,
        args=("--sandbox", "--workers", str(workers)),
    ) as gw:
        pids = await serving_pids(gw, workers)
        async with fresh_connections() as http:
            calls = [asyncio.create_task(stream(http, gw, org)) for _ in range(STREAMS)]
            try:

                async def all_in_flight() -> bool:
                    return len(await reservations.list_pending(pool, org.id)) == STREAMS

                await eventually(all_in_flight, f"{STREAMS} holds pending")
                await stop(gw, pids, everyone=everyone)
                outcomes = await asyncio.gather(*calls, return_exceptions=True)
            finally:
                for call in calls:
                    call.cancel()
                await asyncio.gather(*calls, return_exceptions=True)
        exit_code = await gw.wait(SHUTDOWN_TIMEOUT_S + 15)
        log = gw.log()  # the log goes with the gateway's directory

    completed = [o for o in outcomes if isinstance(o, list) and o and o[-1] == "[DONE]"]
    assert len(completed) == STREAMS, (outcomes, log)  # the shutdown waited for every one
    assert exit_code == 0, log
    assert await reservations.list_pending(pool, org.id) == []
    assert await reservation_statuses(pool, org) == {"settled": STREAMS}
    assert len(await consumption(pool, org)) == STREAMS
    assert await check_ledger(pool, org.id) == []


async def test_two_instances_share_one_balance_and_one_rate_limit(
    database_url: str, redis_url: str, test_config: Config, pool: asyncpg.Pool
) -> None:
    org = await new_org(pool, "pro")  # rpm 30
    before = await balances.get_balance(pool, org.id)
    async with contextlib.AsyncExitStack() as stack:
        instances = [
            await stack.enter_async_context(
                running_gateway(
                    test_config,
                    database_url=database_url,
                    redis_url=redis_url,
                    admin_key=ADMIN_KEY,
                )
            )
            for _ in range(2)
        ]
        async with fresh_connections() as http:
            replies = await asyncio.gather(
                *(chat(http, instances[i % 2].v1, org) for i in range(PRO_RPM + 10))
            )
            await idempotent_once_across_instances(pool, http, instances)
    assert Counter(r.status for r in replies) == {200: PRO_RPM, 429: 10}
    entries = await consumption(pool, org)
    assert len(entries) == PRO_RPM
    after = await balances.get_balance(pool, org.id)
    assert before.available_micro - after.available_micro == -sum(e.amount_micro for e in entries)
    assert after.reserved_credits_micro == 0
    assert await reservation_statuses(pool, org) == {"settled": PRO_RPM}


async def idempotent_once_across_instances(
    pool: asyncpg.Pool, http: aiohttp.ClientSession, instances: list[GatewayProcess]
) -> None:
    """One Idempotency-Key sent to both instances at once is charged once."""
    org = await new_org(pool, "team")
    headers = {"Idempotency-Key": f"same-{uuid.uuid4()}", "X-Sandbox-Delay-Ms": "1500"}
    first, second = await asyncio.gather(*(chat(http, gw.v1, org, headers) for gw in instances))
    replies = sorted([first, second], key=lambda r: (r.status, "Idempotent-Replayed" in r.headers))
    original = replies[0]
    assert original.status == 200 and "Idempotent-Replayed" not in original.headers
    if replies[1].status == 409:
        assert '"duplicate_request"' in replies[1].text
    else:
        assert replies[1].status == 200
        assert replies[1].headers["Idempotent-Replayed"] == "true"
        assert replies[1].text == original.text
    for gw in instances:  # a retry on either instance gets the original answer back
        again = await chat(http, gw.v1, org, headers)
        assert (again.status, again.headers.get("Idempotent-Replayed")) == (200, "true")
        assert again.text == original.text
    assert len(await consumption(pool, org)) == 1
    assert await reservation_statuses(pool, org) == {"settled": 1}


async def hanging_call(http: aiohttp.ClientSession, gw: GatewayProcess, org: Org) -> Reply | None:
    """A streamed call whose upstream never answers; None when the connection was dropped."""
    headers = {"Authorization": f"Bearer {org.key}", "X-Sandbox-Fault": "timeout"}
    try:
        async with http.post(gw.v1 + CHAT, json={**BODY, "stream": True}, headers=headers) as r:
            return Reply(r.status, r.headers, await r.text())
    except aiohttp.ClientError:
        return None


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_releases_the_holds_of_calls_that_outlive_the_shutdown_timeout(
    workers: int, database_url: str, redis_url: str, test_config: Config, pool: asyncpg.Pool
) -> None:
    org = await new_org(pool, "team")
    calls_count = 4
    async with running_gateway(
        with_shutdown_timeout(test_config, 1.0),
        database_url=database_url,
        redis_url=redis_url,
        admin_key=ADMIN_KEY,
        args=("--sandbox", "--workers", str(workers)),
    ) as gw:
        await serving_pids(gw, workers)
        async with fresh_connections() as http:
            calls = [asyncio.create_task(hanging_call(http, gw, org)) for _ in range(calls_count)]
            try:

                async def all_in_flight() -> bool:
                    return len(await reservations.list_pending(pool, org.id)) == calls_count

                await eventually(all_in_flight, f"{calls_count} holds pending")
                gw.signal(signal.SIGTERM)
                outcomes = await asyncio.gather(*calls)
            finally:
                for call in calls:
                    call.cancel()
                await asyncio.gather(*calls, return_exceptions=True)
        exit_code = await gw.wait(WAIT_S)
        log = gw.log()

    assert exit_code == 0, log
    assert all(o is None or o.status >= 500 for o in outcomes), outcomes
    assert await reservations.list_pending(pool, org.id) == [], log
    assert await reservation_statuses(pool, org) == {"released": calls_count}
    assert await check_ledger(pool, org.id) == []


def spawned_workers(gw: GatewayProcess) -> list[int]:
    try:
        children = psutil.Process(gw.process.pid).children()
    except psutil.NoSuchProcess:
        return []
    pids = []
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if "spawn_main" in " ".join(child.cmdline()):
                pids.append(child.pid)
    return pids


async def test_sigterm_while_the_workers_start_stops_them_all_at_once(
    database_url: str, redis_url: str, test_config: Config
) -> None:
    async with started_gateway(
        with_shutdown_timeout(test_config, 1.0),
        database_url=database_url,
        redis_url=redis_url,
        admin_key=ADMIN_KEY,
        args=("--sandbox", "--workers", "4"),
    ) as gw:
        deadline = asyncio.get_running_loop().time() + WAIT_S
        while not spawned_workers(gw):  # the first worker is there, the others are coming
            assert asyncio.get_running_loop().time() < deadline, gw.log()
            await asyncio.sleep(0.001)
        gw.signal(signal.SIGTERM)
        try:
            exit_code = await gw.wait(8.0)
        except TimeoutError:
            pytest.fail(f"a worker spawned as SIGTERM came was never told to stop:\n{gw.log()}")
        log = gw.log()
    assert exit_code == 0, log
