"""Every error a client can cause (SPEC §5): its status and stable code, OpenAI's
ErrorResponse envelope, nothing leaked, and a refused call neither sent upstream nor charged."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import aiohttp
import asyncpg
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from gateway.app import create_app
from gateway.config import Config, RedisErrorPolicy
from ledger import accounts, balances, reservations, transactions
from ledger.transactions import TransactionType
from policies.pricing import Rate, charge_micro, credits_number
from policies.tokens import count_chat_prompt_tokens
from tests.gateway import conftest as gw
from tests.gateway.conftest import Gateway, Org, new_org
from tests.openapi import validate
from tests.relay import Relay

CHAT = "/v1/chat/completions"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Suggest a question."}]
BODY: dict[str, Any] = {"messages": [{"role": "user", "content": "Suggest a question."}]}
LEAKS = (gw.ADMIN_KEY, *gw.PROVIDER_KEYS.values(), "Traceback", 'File "', "postgresql://")
GPT_4O_MINI_FAST = Rate(Decimal("0.15"), Decimal("0.60"), Decimal(100), Decimal("1.0"))


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Mapping[str, str]
    text: str


async def send(
    base: str,
    path: str = CHAT,
    *,
    key: str | None = None,
    body: Any = BODY,
    data: bytes | None = None,
    method: str = "POST",
    headers: Mapping[str, str] | None = None,
) -> Reply:
    sent = {"Content-Type": "application/json", **(headers or {})}
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    payload = data if data is not None else json.dumps(body).encode()
    async with aiohttp.ClientSession() as session:
        async with session.request(method, base + path, data=payload, headers=sent) as response:
            return Reply(response.status, response.headers, await response.text())


def refused(reply: Reply, status: int, code: str, *secrets: str) -> dict[str, Any]:
    """The error envelope, checked: status, code, OpenAPI shape, no trace and no secret."""
    assert reply.status == status, reply.text
    body = json.loads(reply.text)
    validate("ErrorResponse", body)
    assert body["error"]["code"] == code, body
    for leak in (*LEAKS, *secrets):
        assert leak not in reply.text
    error: dict[str, Any] = body["error"]
    return error


@dataclass(frozen=True)
class Rig:
    """The gateway on its recording upstream, the ledger behind it, and how to start others."""

    gateway: Gateway
    upstream: gw.Upstream
    pool: asyncpg.Pool
    config: Config  # pointed at the recording upstream
    database_url: str
    redis_url: str

    @contextlib.asynccontextmanager
    async def untouched(self, org: Org, *, upstream: bool = True) -> AsyncIterator[None]:
        """Nothing reached the upstream, nothing was charged, no hold is left pending."""
        sent, before = len(self.upstream.recorded), await balances.get_balance(self.pool, org.id)
        yield
        if upstream:
            assert len(self.upstream.recorded) == sent, "a refused call reached the upstream"
        after = await balances.get_balance(self.pool, org.id)
        assert (after.available_micro, after.reserved_credits_micro) == (before.available_micro, 0)
        assert await reservations.list_pending(self.pool, org.id) == []

    @contextlib.asynccontextmanager
    async def serving(
        self, config: Config, *, db: str = "", redis: str = "", sandbox: bool = False
    ) -> AsyncIterator[str]:
        """Another instance of the real app, for settings the shared fixtures lack."""
        db, redis = db or self.database_url, redis or self.redis_url
        app = create_app(
            config, database_url=db, redis_url=redis, admin_key=gw.ADMIN_KEY, sandbox=sandbox
        )
        with pytest.MonkeyPatch.context() as env:
            for name, provider in config.providers.items():
                env.setenv(provider.api_key_env, gw.PROVIDER_KEYS[name])
            server = await gw.start(app)
        try:
            yield str(server.make_url("")).rstrip("/")
        finally:
            await server.close()

    async def holds(self, org: Org) -> list[str]:
        query = "SELECT status FROM credit_reservations WHERE organization_id = $1"
        return [row["status"] for row in await self.pool.fetch(query, org.id)]

    async def consumptions(self, org: Org) -> int:
        types = frozenset({TransactionType.CONSUMPTION})
        return len((await transactions.list_transactions(self.pool, org.id, types=types)).data)


@pytest.fixture(scope="module")
def rig(
    gateway: Gateway,
    upstream: gw.Upstream,
    pool: asyncpg.Pool,
    test_config: Config,
    database_url: str,
    redis_url: str,
) -> Rig:
    config = gw.pointed_at(test_config, upstream)
    return Rig(gateway, upstream, pool, config, database_url, redis_url)


@pytest.fixture(scope="module")
async def pro(pool: asyncpg.Pool) -> Org:
    return await new_org(pool, "pro")


def amended(config: Config, section: str, **update: Any) -> Config:
    """`config` with some keys of one section changed."""
    return config.model_copy(update={section: getattr(config, section).model_copy(update=update)})


BAD_FIELDS = [("max_tokens", "10"), ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", 1.5)]
BAD_FIELDS += [("max_tokens", True), ("max_completion_tokens", "x"), ("n", "2"), ("n", 0)]
BAD_FIELDS += [("n", 129), ("n", False), ("stream", "yes"), ("model", 42)]
BAD_MESSAGES = (b"{}", b'{"messages": []}', b'{"messages": "hi"}', b'{"messages": [1]}')


@pytest.mark.parametrize(
    ("data", "headers", "code", "param"),
    [
        *[(raw, {}, "invalid_request", None) for raw in (b"{no", b"\xff{}", b"", b"[1]", b'"x"')],
        *[(raw, {}, "invalid_request", "messages") for raw in BAD_MESSAGES],
        *[(json.dumps({**BODY, f: v}).encode(), {}, "invalid_request", f) for f, v in BAD_FIELDS],
        (None, {"X-Capability": "mind_reading"}, "unknown_capability", None),
        (None, {"X-Quality-Level": "ludicrous"}, "unknown_quality_level", None),
        (None, {"X-Capability": "embeddings"}, "invalid_request", None),  # no chat models
        (None, {"Idempotency-Key": "k" * 256}, "invalid_request", None),
        (None, {"Idempotency-Key": ""}, "invalid_request", None),
    ],
)
async def test_bad_requests_are_400(
    rig: Rig, pro: Org, data: bytes | None, headers: dict[str, str], code: str, param: str | None
) -> None:
    async with rig.untouched(pro):
        reply = await send(rig.gateway.url, key=pro.key, data=data, headers=headers)
    assert refused(reply, 400, code, pro.key)["param"] == param


ROUTES = [("POST", CHAT), ("POST", "/v1/embeddings"), ("GET", "/v1/models")]
ROUTES += [("GET", "/v1/credits/balance"), ("GET", "/v1/credits/packages")]
ROUTES += [("POST", "/v1/access-check")]


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer  ", "Basic {key}", "Bearer sk-gw-no-such-key", "Bearer {revoked}"],
)
async def test_missing_unknown_or_revoked_key_is_401(
    rig: Rig, authorization: str | None, method: str, path: str
) -> None:
    org = await new_org(rig.pool)
    fresh = await accounts.create_api_key(rig.pool, org.id)
    assert await accounts.revoke_api_key(rig.pool, fresh.id)  # before its first use: not cached
    headers = {} if authorization is None else {"Authorization": authorization}
    headers = {k: v.format(key=org.key, revoked=fresh.key) for k, v in headers.items()}
    async with rig.untouched(org):
        reply = await send(rig.gateway.url, path, method=method, headers=headers)
    refused(reply, 401, "invalid_api_key", org.key, fresh.key)
    live = await send(rig.gateway.url, "/v1/credits/balance", method="GET", key=org.key)
    assert live.status == 200  # only the revoked key stopped working


CAPABILITY, QUALITY, UP = "X-Capability", "X-Quality-Level", ["pro", "team"]


@pytest.mark.parametrize(
    ("plan", "headers", "model", "status", "code", "upgrade_plans"),
    [
        ("free", {CAPABILITY: "testimonial_polish"}, "auto", 403, "capability_not_allowed", UP),
        ("free", {QUALITY: "enhanced"}, "auto", 403, "quality_not_allowed", UP),
        ("pro", {QUALITY: "premium"}, "auto", 403, "quality_not_allowed", ["team"]),
        ("free", {}, "gpt-4o", 403, "model_not_allowed", []),  # gpt-4o is never a fast model
        ("pro", {}, "gpt-5-imaginary", 404, "model_not_found", None),
    ],
)
async def test_plan_refusals_through_the_sdk(
    rig: Rig, plan: str, headers: dict[str, str], model: str, status: int, code: str,
    upgrade_plans: list[str] | None,
) -> None:  # fmt: skip
    org = await new_org(rig.pool, plan)
    sdk = openai.AsyncOpenAI(base_url=rig.gateway.v1, api_key=org.key, max_retries=0)
    async with rig.untouched(org), sdk:
        with pytest.raises(openai.APIStatusError) as caught:
            await sdk.chat.completions.create(model=model, messages=MESSAGES, extra_headers=headers)
    response = caught.value.response
    error = refused(Reply(response.status_code, response.headers, response.text), status, code)
    assert error.get("upgrade_plans") == upgrade_plans
    assert error["param"] == ("model" if status == 404 else None)


async def test_insufficient_credits_is_402(rig: Rig) -> None:
    org = await new_org(rig.pool, "free")
    left = (await balances.get_balance(rig.pool, org.id)).available_micro - 1000
    await transactions.post(
        rig.pool, org.id, TransactionType.ADMIN_ADJUSTMENT, -left, f"drain-{org.id}"
    )
    async with rig.untouched(org):
        reply = await send(rig.gateway.url, key=org.key, body={**BODY, "max_tokens": 1_000_000})
    error = refused(reply, 402, "insufficient_credits", org.key)
    assert reply.headers["x-should-retry"] == "false"
    worst = charge_micro(GPT_4O_MINI_FAST, count_chat_prompt_tokens(BODY["messages"]), 16384)
    assert (error["required"], error["spendable"]) == (credits_number(worst), 0.001)
    assert error["topup_url"] == rig.gateway.url + "/v1/credits/packages"
    assert (await send(error["topup_url"], "", method="GET", key=org.key)).status == 200


async def test_rate_limit_is_429_with_the_true_reset(rig: Rig) -> None:
    org = await new_org(rig.pool, "free")  # 10 requests a minute
    for _ in range(10):
        assert (await send(rig.gateway.url, key=org.key)).status == 200
    async with rig.untouched(org):
        reply = await send(rig.gateway.url, key=org.key)
    refused(reply, 429, "rate_limit_exceeded", org.key)
    retry_ms = int(reply.headers["retry-after-ms"])
    assert 0 < retry_ms <= 60_000
    assert int(reply.headers["Retry-After"]) == max(1, -(-retry_ms // 1000))


async def test_body_over_max_body_bytes_is_413(rig: Rig, pro: Org) -> None:
    limit = 4096
    padded = json.dumps({"pad": "x" * (limit - len('{"pad": ""}'))}).encode()
    assert len(padded) == limit
    small = amended(rig.config, "server", max_body_bytes=limit)
    async with rig.serving(small) as url, rig.untouched(pro):
        at_limit = await send(url, key=pro.key, data=padded)
        over = await send(url, key=pro.key, data=padded + b" ")
    refused(at_limit, 400, "invalid_request")  # read whole, then refused for its content
    refused(over, 413, "request_too_large", pro.key)


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v1/no-such-route", 404, "not_found"),
        ("POST", "/nope", 404, "not_found"),
        ("GET", CHAT, 405, "method_not_allowed"),
        ("DELETE", "/v1/credits/balance", 405, "method_not_allowed"),
    ],
)
async def test_unknown_route_and_wrong_method(
    rig: Rig, pro: Org, method: str, path: str, status: int, code: str
) -> None:
    reply = await send(rig.gateway.url, path, method=method, key=pro.key)
    refused(reply, status, code, pro.key)
    if status == 405:  # RFC 9110 §15.5.6: a 405 names the methods the route does allow
        assert "Allow" in reply.headers


@pytest.mark.parametrize("stream", [False, True])
async def test_idempotent_retry_replays_and_charges_once(rig: Rig, stream: bool) -> None:
    org = await new_org(rig.pool)
    sent = len(rig.upstream.recorded)
    body, headers = {**BODY, "stream": stream}, {"Idempotency-Key": "k" * 255}  # the longest
    first = await send(rig.gateway.url, key=org.key, body=body, headers=headers)
    after_first = await balances.get_balance(rig.pool, org.id)
    again = await send(rig.gateway.url, key=org.key, body=body, headers=headers)
    assert (first.status, again.status) == (200, 200)
    assert "Idempotent-Replayed" not in first.headers
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.text == first.text
    assert again.headers["Content-Type"].startswith(first.headers["Content-Type"].split(";")[0])
    if stream:  # the stored SSE transcript, to its end
        assert first.text.startswith("data: {") and first.text.endswith("data: [DONE]\n\n")
    assert len(rig.upstream.recorded) == sent + 1
    assert await rig.consumptions(org) == 1
    assert await balances.get_balance(rig.pool, org.id) == after_first
    async with rig.untouched(org):  # the same key with another body
        reply = await send(rig.gateway.url, key=org.key, body={**body, "n": 2}, headers=headers)
    refused(reply, 422, "idempotency_key_reused", org.key)


async def test_idempotency_key_in_flight_is_409(rig: Rig, sandbox_gateway: Gateway) -> None:
    org, url = await new_org(rig.pool), sandbox_gateway.url
    headers = {"Idempotency-Key": "slow-1"}
    slow = {**headers, "X-Sandbox-Delay-Ms": "1500"}
    first = asyncio.create_task(send(url, key=org.key, headers=slow))
    claimed = "SELECT state FROM request_idempotency WHERE organization_id = $1"
    deadline = time.monotonic() + 5
    while await rig.pool.fetchval(claimed, org.id) != "in_flight":
        assert time.monotonic() < deadline and not first.done(), "the first call never claimed"
        await asyncio.sleep(0.02)
    duplicate = await send(url, key=org.key, headers=headers)
    assert not first.done()
    refused(duplicate, 409, "duplicate_request", org.key)
    assert (await first).status == 200
    replay = await send(url, key=org.key, headers=headers)
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert await rig.consumptions(org) == 1


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [("error_500", 502, "upstream_error"), ("timeout", 504, "upstream_timeout")],
)
async def test_every_model_failing_releases_the_hold(
    rig: Rig, test_config: Config, stream: bool, fault: str, status: int, code: str
) -> None:
    org = await new_org(rig.pool)
    impatient = amended(test_config, "server", upstream_timeout_s=0.5)
    body, headers = {**BODY, "stream": stream}, {"X-Sandbox-Fault": fault}
    async with rig.serving(impatient, sandbox=True) as url, rig.untouched(org, upstream=False):
        started = time.monotonic()
        reply = await send(url, key=org.key, body=body, headers=headers)
        elapsed = time.monotonic() - started
    refused(reply, status, code, org.key)
    assert elapsed < 10, "the upstream timeout was not applied"
    assert (await rig.holds(org), await rig.consumptions(org)) == (["released"], 0)


async def test_ledger_unreachable_is_503_and_nothing_goes_upstream(rig: Rig) -> None:
    org = await new_org(rig.pool)
    unused = await accounts.create_api_key(rig.pool, org.id)
    link = Relay(rig.database_url)
    relayed = await link.open()
    sent = len(rig.upstream.recorded)
    async with rig.serving(rig.config, db=relayed) as url:
        assert (await send(url, "/v1/credits/balance", method="GET", key=org.key)).status == 200
        await link.cut()
        cached_key = await send(url, key=org.key)  # authenticated from the cache, then reserve
        uncached_key = await send(url, key=unused.key)  # the key lookup itself fails
    for reply in (cached_key, uncached_key):
        refused(reply, 503, "ledger_unavailable", org.key, unused.key, relayed)
    assert len(rig.upstream.recorded) == sent, "an unmetered call reached the upstream"


async def test_redis_unreachable_under_fail_closed_is_503(rig: Rig) -> None:
    org = await new_org(rig.pool)
    link = Relay(rig.redis_url)
    relayed = await link.open()
    policy = RedisErrorPolicy.FAIL_CLOSED
    closed = amended(rig.config, "rate_limits", on_redis_error=policy)
    async with rig.serving(closed, redis=relayed) as url, rig.untouched(org):
        await link.cut()
        reply = await send(url, key=org.key)
    refused(reply, 503, "rate_limiter_unavailable", org.key, relayed)
