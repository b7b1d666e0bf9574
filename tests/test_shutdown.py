"""SIGTERM to `llm-gateway serve` (SPEC §2, §7): streams in flight finish, calls that outlive
the shutdown timeout have their holds released, and workers still starting are stopped at
once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import aiohttp
import asyncpg
import psutil  # type: ignore[import-untyped]
import pytest

from gateway.config import Config
from ledger import reservations
from ledger.check import check_ledger
from tests.processes import GatewayProcess, running_gateway, started_gateway
from tests.serving import (
    ADMIN_KEY,
    BODY,
    CHAT,
    WAIT_S,
    Org,
    Reply,
    consumption,
    eventually,
    fresh_connections,
    listening_pids,
    new_org,
    reservation_statuses,
    serving_pids,
)

STREAMS = 20
STREAM_DELAY_MS = 4000  # each stream's upstream answers after this: long enough to be caught
SHUTDOWN_TIMEOUT_S = 20.0


def with_shutdown_timeout(config: Config, seconds: float) -> Config:
    server = config.server.model_copy(update={"shutdown_timeout_s": seconds})
    return config.model_copy(update={"server": server})


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
