"""`llm-gateway serve` as a whole process (SPEC §2, §7): N workers on one port serving one set
of metrics (a dead worker replaced, its counts kept), and two instances sharing one PostgreSQL
and one Redis: one balance, one rate limit, nothing charged twice."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import shutil
import signal
import tempfile
import uuid
from collections import Counter
from pathlib import Path

import aiohttp
import asyncpg
import psutil  # type: ignore[import-untyped]
from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client.parser import text_string_to_metric_families

from gateway import server
from gateway.config import Config
from gateway.metrics import MULTIPROC_ENV
from ledger import balances
from tests.processes import GatewayProcess, running_gateway
from tests.serving import (
    ADMIN_KEY,
    WAIT_S,
    chat,
    consumption,
    eventually,
    fresh_connections,
    listening_pids,
    new_org,
    reservation_statuses,
    serving_pids,
)

PRO_RPM = 30


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


def test_a_serving_worker_freezes_its_start_up_heap_and_collects_less_often() -> None:
    before = gc.get_threshold()
    try:
        server._settle_heap()
        assert gc.get_freeze_count() > 1000  # the modules' objects, at least
        assert gc.get_threshold() == (server.GC_YOUNG_THRESHOLD, *before[1:])
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
