"""Rate limits through the real app on a real Redis (SPEC §6): the headers, one limit shared
by every instance, quota taken only by requests that reach an upstream, a Redis outage under
each policy and the recovery after it, and an unreachable Redis at start-up."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis

from gateway.app import create_app
from gateway.config import Config, RedisErrorPolicy
from gateway.resources import METRICS, StartupError
from ledger import balances, transactions
from ledger.transactions import TransactionType
from policies import rate_limit
from tests.gateway import conftest as gw
from tests.gateway.conftest import Gateway, Org, new_org
from tests.relay import Relay

CHAT = "/v1/chat/completions"
BODY: dict[str, Any] = {"messages": [{"role": "user", "content": "Suggest a question."}]}
CAPABILITY = "question_generation"  # the default capability
PRO_RPM = 30
DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
HEADERS = ("limit", "remaining", "reset")


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Mapping[str, str]
    text: str

    def limits(self) -> tuple[str | None, ...]:
        return tuple(self.headers.get(f"x-ratelimit-{name}-requests") for name in HEADERS)

    def code(self) -> str:
        code: str = json.loads(self.text)["error"]["code"]
        return code


async def send(
    session: aiohttp.ClientSession,
    base: str,
    org: Org,
    body: Mapping[str, Any] = BODY,
    headers: Mapping[str, str] | None = None,
) -> Reply:
    sent = {"Authorization": f"Bearer {org.key}", **(headers or {})}
    async with session.post(base + CHAT, json=body, headers=sent) as response:
        return Reply(response.status, response.headers, await response.text())


def duration_ms(text: str) -> int:
    """OpenAI's duration format (`1m30s`, `59s`, `450ms`) in milliseconds."""
    if text.endswith("ms") and text[:-2].isdigit():
        return int(text[:-2])
    match = DURATION.fullmatch(text)
    assert text and match, f"not an OpenAI duration: {text!r}"
    hours, minutes, seconds = (int(part or 0) for part in match.groups())
    return ((hours * 60 + minutes) * 60 + seconds) * 1000


@pytest.fixture(scope="module")
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
        yield client


@pytest.fixture(scope="module")
def upstream_config(test_config: Config, upstream: gw.Upstream) -> Config:
    return gw.pointed_at(test_config, upstream)


async def logged(redis: Redis, config: Config, org: Org) -> tuple[int, int]:
    """How many requests the org's minute and day logs hold."""
    minute, day = rate_limit.keys(config.rate_limits.key_prefix, org.id, CAPABILITY)
    return await redis.zcard(minute), await redis.zcard(day)


@contextlib.asynccontextmanager
async def serving(config: Config, database_url: str, redis_url: str) -> AsyncIterator[Gateway]:
    """Another instance of the real app on the recording upstream."""
    app = create_app(config, database_url=database_url, redis_url=redis_url, admin_key=gw.ADMIN_KEY)
    with pytest.MonkeyPatch.context() as env:
        for name, provider in config.providers.items():
            env.setenv(provider.api_key_env, gw.PROVIDER_KEYS[name])
        server = await gw.start(app)
    try:
        yield Gateway(str(server.make_url("")).rstrip("/"), app)
    finally:
        await server.close()


async def test_headers_name_the_tighter_window(
    gateway: Gateway, pool: asyncpg.Pool, session: aiohttp.ClientSession
) -> None:
    pro = await new_org(pool, "pro")  # 30 a minute, 500 a day: the minute is tighter
    first = await send(session, gateway.url, pro)
    assert first.status == 200, first.text
    assert first.limits() == ("30", "29", "1m")  # its own request leaves in a minute
    second = await send(session, gateway.url, pro)
    limit, remaining, reset = second.limits()
    assert (limit, remaining) == ("30", "28")
    assert reset is not None and 0 < duration_ms(reset) <= 60_000
    streamed = await send(session, gateway.url, pro, {**BODY, "stream": True})
    assert streamed.status == 200 and streamed.limits()[:2] == ("30", "27")
    team = await new_org(pool, "team")  # no limits: no headers
    unlimited = await send(session, gateway.url, team)
    assert unlimited.status == 200, unlimited.text
    assert unlimited.limits() == (None, None, None)
    assert not any(name.lower().startswith("x-ratelimit") for name in unlimited.headers)


@pytest.mark.parametrize("text", ["1m", "59s", "450ms", "1m30s", "1h2m", "0ms"])
def test_duration_parser(text: str) -> None:
    expected = {"1m": 60_000, "59s": 59_000, "450ms": 450, "1m30s": 90_000, "1h2m": 3_720_000}
    assert duration_ms(text) == expected.get(text, 0)


async def test_two_instances_share_one_limit(
    pool: asyncpg.Pool,
    upstream_config: Config,
    database_url: str,
    redis_url: str,
    upstream: gw.Upstream,
    redis: Redis,
    session: aiohttp.ClientSession,
) -> None:
    org = await new_org(pool, "pro")
    sent = len(upstream.recorded)
    async with (
        serving(upstream_config, database_url, redis_url) as one,
        serving(upstream_config, database_url, redis_url) as two,
    ):
        urls = [one.url, two.url]
        replies = await asyncio.gather(*(send(session, urls[i % 2], org) for i in range(200)))
    passed = [reply for reply in replies if reply.status == 200]
    limited = [reply for reply in replies if reply.status == 429]
    assert (len(passed), len(limited)) == (PRO_RPM, 200 - PRO_RPM), [r.status for r in replies]
    for reply in limited:
        assert reply.code() == "rate_limit_exceeded"
        retry_ms = int(reply.headers["retry-after-ms"])
        assert 0 < retry_ms <= 60_000
        assert int(reply.headers["Retry-After"]) == max(1, -(-retry_ms // 1000))
    assert sorted(int(reply.limits()[1] or -1) for reply in passed) == list(range(PRO_RPM))
    types = frozenset({TransactionType.CONSUMPTION})
    page = await transactions.list_transactions(pool, org.id, limit=500, types=types)
    assert len(page.data) == PRO_RPM
    assert len(upstream.recorded) - sent == PRO_RPM
    assert await logged(redis, upstream_config, org) == (PRO_RPM, PRO_RPM)


async def test_requests_refused_before_the_upstream_take_no_quota(
    gateway: Gateway,
    sandbox_gateway: Gateway,
    pool: asyncpg.Pool,
    upstream_config: Config,
    redis: Redis,
    session: aiohttp.ClientSession,
) -> None:
    org = await new_org(pool, "pro")
    assert (await send(session, gateway.url, org)).limits()[1] == "29"
    refusals = [
        (403, "quality_not_allowed", BODY, {"X-Quality-Level": "premium"}),
        (400, "invalid_request", {**BODY, "max_tokens": "10"}, {}),
        (400, "unknown_capability", BODY, {"X-Capability": "mind_reading"}),
        (404, "model_not_found", {**BODY, "model": "gpt-5-imaginary"}, {}),
    ]
    for status, code, body, headers in refusals:
        reply = await send(session, gateway.url, org, body, headers)
        assert (reply.status, reply.code()) == (status, code), reply.text
    assert await logged(redis, upstream_config, org) == (1, 1)
    assert (await send(session, gateway.url, org)).limits()[1] == "28"
    spendable = (await balances.get_balance(pool, org.id)).spendable_micro
    drain = spendable - 1000
    adjust = TransactionType.ADMIN_ADJUSTMENT
    await transactions.post(pool, org.id, adjust, -drain, f"drain-{org.id}")
    broke = await send(session, gateway.url, org)  # the unit is taken, then given back
    assert (broke.status, broke.code()) == (402, "insufficient_credits"), broke.text
    assert await logged(redis, upstream_config, org) == (2, 2)
    await transactions.post(pool, org.id, adjust, drain, f"refill-{org.id}")
    assert (await send(session, gateway.url, org)).limits()[1] == "27"
    fault = {"X-Sandbox-Fault": "error_500@gpt-4o-mini"}  # the first model fails, one falls back
    fell_back = await send(session, sandbox_gateway.url, org, headers=fault)
    assert fell_back.status == 200, fell_back.text
    assert fell_back.headers["X-Gateway-Model"] != "gpt-4o-mini"
    assert fell_back.limits()[1] == "26"
    assert await logged(redis, upstream_config, org) == (4, 4)


def rate_limit_errors(gateway: Gateway) -> float:
    registry = gateway.app[METRICS].registry
    return registry.get_sample_value("gateway_rate_limit_errors_total") or 0.0


@pytest.mark.parametrize("policy", list(RedisErrorPolicy))
async def test_redis_outage_then_recovery_without_restart(
    policy: RedisErrorPolicy,
    pool: asyncpg.Pool,
    upstream_config: Config,
    database_url: str,
    redis_url: str,
    redis: Redis,
    session: aiohttp.ClientSession,
) -> None:
    org = await new_org(pool, "pro")
    limits = upstream_config.rate_limits.model_copy(update={"on_redis_error": policy})
    amended = upstream_config.model_copy(update={"rate_limits": limits})
    async with Relay(redis_url) as relay:
        relayed = await relay.open()
        async with serving(amended, database_url, relayed) as instance:
            assert (await send(session, instance.url, org)).limits()[1] == "29"
            await relay.cut()
            before = rate_limit_errors(instance)
            for _ in range(3):
                started = time.monotonic()
                reply = await send(session, instance.url, org)
                elapsed = time.monotonic() - started
                if policy is RedisErrorPolicy.FAIL_OPEN:  # served, unlimited: no headers
                    assert (reply.status, reply.limits()) == (200, (None,) * 3), reply.text
                else:
                    assert reply.status == 503, reply.text
                    assert reply.code() == "rate_limiter_unavailable"
                    assert relayed not in reply.text
                assert elapsed < 2.0, f"a dead Redis took {elapsed:.1f} s to notice"
            assert rate_limit_errors(instance) >= before + 3
            await relay.restore()
            statuses = []
            for _ in range(PRO_RPM + 5):  # the minute log fills up again, then it refuses
                reply = await send(session, instance.url, org)
                statuses.append(reply.status)
                if reply.status != 200:
                    break
            assert reply.code() == "rate_limit_exceeded", reply.text
    assert statuses == [200] * (PRO_RPM - 1) + [429]
    assert await logged(redis, upstream_config, org) == (PRO_RPM, PRO_RPM)


async def test_unreachable_redis_at_start_up_is_a_startup_error(
    upstream_config: Config, database_url: str
) -> None:
    url = "redis://:secret@127.0.0.1:1/0"  # nothing listens on port 1
    app: web.Application = create_app(
        upstream_config, database_url=database_url, redis_url=url, admin_key=gw.ADMIN_KEY
    )
    server = TestServer(app, host="127.0.0.1")
    try:
        with pytest.raises(StartupError) as caught:
            await server.start_server()
    finally:
        await server.close()
    message = str(caught.value)
    assert "Redis at redis://:***@127.0.0.1:1/0 is unreachable" in message
    assert "REDIS_URL" in message
    assert "secret" not in message
