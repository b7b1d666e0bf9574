"""Streamed calls of the metered proxy: an upstream breaking off, a client leaving, many
streams at once on a small balance, and what the upstream is asked for; checked on the ledger."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import aiohttp
import asyncpg
import openai
import pytest
from aiohttp import web
from openai.types.chat import ChatCompletionMessageParam

from gateway.app import create_app
from gateway.config import Config
from gateway.resources import METRICS
from ledger import balances, reservations
from ledger.transactions import Transaction
from policies.pricing import Rate, affordable_output_tokens, charge_micro, credits_text
from policies.tokens import count_chat_prompt_tokens, count_text_tokens
from tests.gateway.conftest import (
    ADMIN_KEY,
    Gateway,
    Org,
    Upstream,
    consumption,
    drain_to,
    new_org,
    pointed_at,
    reservation_rows,
    sandbox_app,
    start,
)

PER_USD, FAST = Decimal(100), Decimal("1.0")
GPT_4O_MINI = Rate(Decimal("0.15"), Decimal("0.60"), PER_USD, FAST)
GEMINI_FLASH = Rate(Decimal("0.10"), Decimal("0.40"), PER_USD, FAST)
QUESTION = "Stream me an answer."
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": QUESTION}]
PROMPT_TOKENS = count_chat_prompt_tokens([{"role": "user", "content": QUESTION}])
CREDIT = 1_000_000
POLL_S, POLL_LIMIT = 0.05, 400  # up to 20 s, beyond the gateway's 10 s drain after a disconnect


@pytest.fixture(scope="module")
async def uncancelled_gateway(
    database_url: str, redis_url: str, test_config: Config, pool: asyncpg.Pool
) -> AsyncIterator[Gateway]:
    """The sandbox gateway served as `llm-gateway serve` serves it (web.run_app): a client
    that leaves does not cancel its handler. (aiohttp's TestServer cancels it.)"""
    app = sandbox_app(test_config, database_url, redis_url)
    runner = web.AppRunner(app, handler_cancellation=False, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield Gateway(f"http://127.0.0.1:{runner.addresses[0][1]}", app)
    finally:
        await runner.cleanup()


@pytest.fixture(params=["cancelling", "uncancelled"])
def any_gateway(
    request: pytest.FixtureRequest, sandbox_gateway: Gateway, uncancelled_gateway: Gateway
) -> Gateway:
    """Either server mode: the handler cancelled when the client leaves, or left running."""
    return sandbox_gateway if request.param == "cancelling" else uncancelled_gateway


def sdk(gateway: Gateway, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.v1, api_key=key, max_retries=0)


async def raw_sse(
    gateway: Gateway, org: Org, body: dict[str, Any], headers: dict[str, str]
) -> tuple[aiohttp.ClientResponse, list[str]]:
    """POST a chat request and read the whole answer as SSE `data:` payloads."""
    send = {"Authorization": f"Bearer {org.key}", **headers}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            gateway.v1 + "/chat/completions", json=body, headers=send
        ) as response:
            text = await response.text()
    lines = text.splitlines()
    return response, [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


async def settled_alone(pool: asyncpg.Pool, org: Org) -> tuple[int, int]:
    """The one reservation of the org, settled, with its consumption entry: (hold, charge)."""
    assert await reservations.list_pending(pool, org.id) == []
    [row] = await reservation_rows(pool, org)
    [entry] = await consumption(pool, org)
    assert row["status"] == "settled"
    assert entry.amount_micro == -row["charged_micro"]
    after = await balances.get_balance(pool, org.id)
    assert after.reserved_credits_micro == 0
    return row["amount_micro"], row["charged_micro"]


def requests_counted(gateway: Gateway, status: str) -> float:
    total = 0.0
    for metric in gateway.app[METRICS].registry.collect():
        for sample in metric.samples:
            if sample.name == "gateway_requests_total" and sample.labels["status"] == status:
                total += sample.value
    return total


async def test_upstream_breaking_mid_stream_ends_with_one_error_event(
    sandbox_gateway: Gateway, pool: asyncpg.Pool
) -> None:
    org = await new_org(pool)
    body = {"messages": MESSAGES, "stream": True}
    response, events = await raw_sse(
        sandbox_gateway, org, body, {"X-Sandbox-Fault": "disconnect_mid_stream"}
    )
    assert response.status == 200
    assert response.headers["X-Gateway-Model"] == "gpt-4o-mini"
    *chunks, last = [json.loads(event) for event in events if event != "[DONE]"]
    assert "[DONE]" not in events
    assert last["error"]["code"] == "upstream_error" and set(last) == {"error"}
    assert chunks and all("error" not in chunk and chunk["choices"] for chunk in chunks)
    text = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks)
    hold, charge = await settled_alone(pool, org)
    # what was produced so far: the prompt and the output relayed before the break
    produced = count_text_tokens(text)
    assert charge == charge_micro(GPT_4O_MINI, PROMPT_TOKENS, produced)
    assert 0 < charge <= hold


async def settled_after_client_left(
    gateway: Gateway, pool: asyncpg.Pool, org: Org, disconnected: float
) -> Transaction:
    """Wait (bounded) for the gateway to notice the client left and settle; the entry."""
    for _ in range(POLL_LIMIT):
        pending = await reservations.list_pending(pool, org.id)
        if not pending and requests_counted(gateway, "client_disconnected") > disconnected:
            break
        await asyncio.sleep(POLL_S)
    assert await reservations.list_pending(pool, org.id) == []
    assert requests_counted(gateway, "client_disconnected") == disconnected + 1
    hold, charge = await settled_alone(pool, org)
    assert 0 < charge <= hold
    [entry] = await consumption(pool, org)
    assert entry.prompt_tokens == PROMPT_TOKENS
    assert entry.completion_tokens is not None
    assert charge == charge_micro(GPT_4O_MINI, entry.prompt_tokens, entry.completion_tokens)
    return entry


async def test_client_leaving_mid_stream_is_charged_and_nothing_stays_pending(
    any_gateway: Gateway, pool: asyncpg.Pool
) -> None:
    org = await new_org(pool)
    disconnected = requests_counted(any_gateway, "client_disconnected")
    # 128 answers of ~15 chunks each: far more than the sockets buffer, so the stream is
    # still being relayed when the client goes
    body = {"messages": MESSAGES, "stream": True, "n": 128}
    send = {"Authorization": f"Bearer {org.key}"}
    async with aiohttp.ClientSession() as session:
        response = await session.post(any_gateway.v1 + "/chat/completions", json=body, headers=send)
        read = 0
        while read < 2:
            line = await response.content.readline()
            assert line, "the stream ended before the client left"
            read += line.startswith(b"data: ")
        response.close()
    entry = await settled_after_client_left(any_gateway, pool, org, disconnected)
    assert entry.completion_tokens is not None and entry.completion_tokens > 0


async def test_client_leaving_before_the_first_byte_is_charged_for_the_answer(
    uncancelled_gateway: Gateway, pool: asyncpg.Pool
) -> None:
    """The client gives up while the upstream is slow to start. Served without handler
    cancellation (as in production) the gateway goes on, gets the upstream's first chunk and
    only then finds the client gone: that output was produced, so it is charged, not only
    the prompt."""
    org = await new_org(pool)
    disconnected = requests_counted(uncancelled_gateway, "client_disconnected")
    body = {"messages": MESSAGES, "stream": True}
    send = {"Authorization": f"Bearer {org.key}", "X-Sandbox-Delay-Ms": "400"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.1)) as session:
        with pytest.raises(TimeoutError):
            async with session.post(
                uncancelled_gateway.v1 + "/chat/completions", json=body, headers=send
            ) as response:
                await response.read()
    entry = await settled_after_client_left(uncancelled_gateway, pool, org, disconnected)
    assert entry.completion_tokens is not None and entry.completion_tokens > 0


async def _one_call(client: openai.AsyncOpenAI, stream: bool, n: int) -> tuple[int, bool] | None:
    """(charge as the client saw it, whether an answer was cut at the output limit), or None
    if the call was refused with 402."""
    try:
        if not stream:
            raw = await client.chat.completions.with_raw_response.create(
                model="auto", messages=MESSAGES, n=n
            )
            cut = any(choice.finish_reason == "length" for choice in raw.parse().choices)
            return int(Decimal(raw.headers["x-credits-used"]) * CREDIT), cut
        chunks = await client.chat.completions.create(
            model="auto",
            messages=MESSAGES,
            n=n,
            stream=True,
            stream_options={"include_usage": True},
        )
        async with chunks:
            received = [chunk async for chunk in chunks]
        assert received[-1].usage is not None
        extra = received[-1].usage.model_extra or {}
        finishes = {choice.finish_reason for chunk in received for choice in chunk.choices}
        return int(Decimal(str(extra["credits_used"])) * CREDIT), "length" in finishes
    except openai.APIStatusError as error:
        assert error.status_code == 402
        assert isinstance(error.body, dict) and error.body["code"] == "insufficient_credits"
        return None


@pytest.mark.parametrize(
    ("spendable_micro", "n"),
    [(50 * CREDIT + CREDIT // 20, 1), (CREDIT // 100, 8)],
    ids=["overdraft", "tight"],
)
@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
async def test_concurrent_calls_never_spend_beyond_the_overdraft(
    stream: bool, spendable_micro: int, n: int, sandbox_gateway: Gateway, pool: asyncpg.Pool
) -> None:
    """64 calls at once without max_tokens, on 0.05 credits plus the overdraft; and on 0.01
    credits with n=8, which one uncapped answer would exceed (the gateway must cut it short).
    On team: pro's 30 requests a minute would refuse some with 429 before credits count."""
    org = await new_org(pool, plan="team")
    limit = (await balances.get_balance(pool, org.id)).overdraft_limit_micro
    before = await drain_to(pool, org, spendable_micro - limit)
    assert before.spendable_micro == spendable_micro
    async with sdk(sandbox_gateway, org.key) as client:
        outcomes = await asyncio.gather(*(_one_call(client, stream, n) for _ in range(64)))
    answered = [outcome for outcome in outcomes if outcome is not None]
    charges = [charge for charge, _ in answered]
    assert answered and len(answered) < len(outcomes)
    if n > 1:
        assert any(cut for _, cut in answered)
    assert await reservations.list_pending(pool, org.id) == []
    after = await balances.get_balance(pool, org.id)
    assert after.reserved_credits_micro == 0
    assert after.available_micro >= -after.overdraft_limit_micro
    assert before.available_micro - after.available_micro == sum(charges)
    assert sum(charges) <= spendable_micro
    rows = await reservation_rows(pool, org)
    statuses = sorted(row["status"] for row in rows)
    assert statuses == ["rejected"] * (64 - len(charges)) + ["settled"] * len(charges)
    settled = [row for row in rows if row["status"] == "settled"]
    assert all(0 < row["charged_micro"] <= row["amount_micro"] for row in settled)
    assert sorted(-entry.amount_micro for entry in await consumption(pool, org)) == sorted(charges)


async def test_upstream_always_gets_include_usage_and_an_affordable_limit(
    gateway: Gateway, upstream: Upstream, pool: asyncpg.Pool
) -> None:
    """No stream_options and no max_tokens from the client, on a balance of 0.01 credits."""
    org = await new_org(pool, plan="free")
    await drain_to(pool, org, CREDIT // 100)
    async with sdk(gateway, org.key) as client:
        chunks = await client.chat.completions.create(model="auto", messages=MESSAGES, stream=True)
        async with chunks:
            received = [chunk async for chunk in chunks]
    assert received and all(chunk.usage is None for chunk in received)
    sent = upstream.recorded[-1]
    assert sent.path == "/openai/v1/chat/completions" and sent.body["model"] == "gpt-4o-mini"
    assert sent.body["stream"] is True
    assert sent.body["stream_options"] == {"include_usage": True}
    hold, charge = await settled_alone(pool, org)
    assert hold == CREDIT // 100
    limit = sent.body["max_tokens"]
    assert limit == affordable_output_tokens(GPT_4O_MINI, PROMPT_TOKENS, hold)
    assert 16 <= limit < 16384  # below gpt-4o-mini's maximum: the balance is what limits it
    assert charge_micro(GPT_4O_MINI, PROMPT_TOKENS, limit) <= hold
    assert 0 < charge <= hold


async def test_a_client_limit_is_passed_on_unchanged(
    gateway: Gateway, upstream: Upstream, pool: asyncpg.Pool
) -> None:
    org = await new_org(pool)
    async with sdk(gateway, org.key) as client:
        chunks = await client.chat.completions.create(
            model="auto", messages=MESSAGES, stream=True, max_completion_tokens=7
        )
        async with chunks:
            received = [chunk async for chunk in chunks]
    sent = upstream.recorded[-1]
    assert sent.body["max_completion_tokens"] == 7 and "max_tokens" not in sent.body
    assert sent.body["stream_options"] == {"include_usage": True}
    assert received[-1].choices[0].finish_reason == "length"
    await settled_alone(pool, org)


async def test_usage_chunk_credits_equal_the_ledger_entry_after_a_fallback(
    sandbox_gateway: Gateway, pool: asyncpg.Pool
) -> None:
    """Streamed, asked for usage, answered by the second model: the last chunk's credits_used
    is the consumption entry, at the answering model's prices."""
    org = await new_org(pool)
    before = await balances.get_balance(pool, org.id)
    async with sdk(sandbox_gateway, org.key) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="auto",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"X-Sandbox-Fault": "error_500@gpt-4o-mini"},
        )
        chunks = raw.parse()
        async with chunks:
            received = [chunk async for chunk in chunks]
    assert raw.headers["x-gateway-model"] == "gemini-2.0-flash"
    assert "x-credits-used" not in raw.headers
    *content, last = received
    assert content and all(chunk.choices and chunk.usage is None for chunk in content)
    assert last.choices == [] and last.usage is not None
    expected = charge_micro(GEMINI_FLASH, last.usage.prompt_tokens, last.usage.completion_tokens)
    credits_used = (last.usage.model_extra or {})["credits_used"]
    assert Decimal(str(credits_used)) == Decimal(credits_text(expected))
    hold, charge = await settled_alone(pool, org)
    assert charge == expected <= hold
    [entry] = await consumption(pool, org)
    assert entry.model == "gemini-2.0-flash"
    assert (entry.prompt_tokens, entry.completion_tokens) == (
        last.usage.prompt_tokens,
        last.usage.completion_tokens,
    )
    after = await balances.get_balance(pool, org.id)
    assert before.available_micro - after.available_micro == expected


def _ending_upstream(peers: list[Any], end_after_s: float) -> web.Application:
    """An OpenAI upstream whose stream ends `end_after_s` after [DONE] (as a real one can: the
    chunked body's end in a later packet), or with it; it notes the caller's address."""

    async def chat(request: web.Request) -> web.StreamResponse:
        peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                "model": "gpt-4o-mini"}  # fmt: skip
        delta = {"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}
        usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 1, "total_tokens": 0}
        for event in ({**base, "choices": [delta]}, {**base, "choices": [], "usage": usage}):
            await response.write(f"data: {json.dumps(event)}\n\n".encode())
        if not end_after_s:  # [DONE] and the body's end in one packet
            await response.write_eof(b"data: [DONE]\n\n")
            return response
        await response.write(b"data: [DONE]\n\n")
        await asyncio.sleep(end_after_s)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/openai/v1/chat/completions", chat)
    return app


@pytest.mark.parametrize("end_after_s", [0.0, 0.05])
async def test_streams_reuse_the_upstream_connection(
    database_url: str, redis_url: str, test_config: Config, pool: asyncpg.Pool, end_after_s: float
) -> None:
    """Streams one after another travel on one pooled upstream connection: the end of the
    body after [DONE] is read, so the connection is kept rather than closed (against a real
    provider a new one costs a TLS handshake)."""
    peers: list[Any] = []
    fake = await start(_ending_upstream(peers, end_after_s))
    app = create_app(
        pointed_at(test_config, Upstream(str(fake.make_url("")).rstrip("/"), [])),
        database_url=database_url,
        redis_url=redis_url,
        admin_key=ADMIN_KEY,
    )
    server = await start(app)
    try:
        gateway = Gateway(str(server.make_url("")).rstrip("/"), app)
        org = await new_org(pool)
        async with sdk(gateway, org.key) as client:
            for _ in range(4):
                chunks = await client.chat.completions.create(
                    model="gpt-4o-mini", messages=MESSAGES, stream=True
                )
                async with chunks:
                    assert [chunk async for chunk in chunks]
    finally:
        await server.close()
        await fake.close()
    assert len(peers) == 4 and None not in peers
    assert len(set(peers)) == 1, peers
