"""End to end through the real openai SDK: answers, exact charges, headers, ledger entries."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from decimal import Decimal

import asyncpg
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from gateway.resources import SERVICES
from ledger import balances, transactions
from ledger.transactions import TransactionType
from policies.pricing import Rate, charge_micro, credits_text
from tests.gateway.conftest import Gateway, Upstream, new_org
from tests.openapi import validate

GPT_4O_MINI_FAST = Rate(Decimal("0.15"), Decimal("0.60"), Decimal(100), Decimal("1.0"))
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "How do credits work?"}]


@contextlib.asynccontextmanager
async def client(gateway: Gateway, key: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=gateway.v1, api_key=key, max_retries=0) as sdk:
        yield sdk


async def test_chat_completion_is_charged_exactly(
    gateway: Gateway, upstream: Upstream, pool: asyncpg.Pool
) -> None:
    org = await new_org(pool)
    before = await balances.get_balance(pool, org.id)
    async with client(gateway, org.key) as sdk:
        raw = await sdk.chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    completion = raw.parse()
    validate("CreateChatCompletionResponse", completion.model_dump(exclude_unset=True))
    assert completion.usage is not None
    expected = charge_micro(
        GPT_4O_MINI_FAST, completion.usage.prompt_tokens, completion.usage.completion_tokens
    )
    assert raw.headers["x-gateway-model"] == "gpt-4o-mini"
    assert raw.headers["x-credits-used"] == credits_text(expected)
    after = await balances.get_balance(pool, org.id)
    assert before.available_micro - after.available_micro == expected
    assert raw.headers["x-balance-remaining"] == credits_text(after.available_micro)
    assert after.reserved_credits_micro == 0
    page = await transactions.list_transactions(
        pool, org.id, types=frozenset({TransactionType.CONSUMPTION})
    )
    [entry] = page.data
    assert entry.amount_micro == -expected
    assert (entry.model, entry.prompt_tokens) == ("gpt-4o-mini", completion.usage.prompt_tokens)
    assert entry.capability == "question_generation" and entry.quality == "fast"
    sent = upstream.recorded[-1]
    assert sent.headers["authorization"] == "Bearer sk-openai-test"
    assert sent.body["model"] == "gpt-4o-mini" and sent.body["max_tokens"] > 0


async def test_the_ledger_and_upstream_waits_go_through_their_pollers(
    gateway: Gateway, pool: asyncpg.Pool
) -> None:
    """Every hold, settlement and first answer is waited on through a Poller
    (gateway/polling.py), which keeps the running mean of its waits."""
    services = gateway.app[SERVICES]
    assert services.poller.budget_s == services.upstream_poller.budget_s == 0.002
    before = (services.poller.typical_s, services.upstream_poller.typical_s)
    org = await new_org(pool)
    async with client(gateway, org.key) as sdk:
        await sdk.chat.completions.create(model="auto", messages=MESSAGES)
    assert services.poller.typical_s != before[0]  # a hold and a settlement were waited on
    assert services.upstream_poller.typical_s != before[1]


async def test_streaming_reports_credits_on_the_usage_chunk(
    gateway: Gateway, pool: asyncpg.Pool
) -> None:
    org = await new_org(pool)
    before = await balances.get_balance(pool, org.id)
    async with client(gateway, org.key) as sdk:
        stream = await sdk.chat.completions.create(
            model="auto",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk.model_dump(exclude_unset=True))
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    expected = charge_micro(GPT_4O_MINI_FAST, usage.prompt_tokens, usage.completion_tokens)
    assert Decimal(str(usage.model_extra["credits_used"])) == Decimal(credits_text(expected))  # type: ignore[index]
    after = await balances.get_balance(pool, org.id)
    assert before.available_micro - after.available_micro == expected


async def test_usage_chunk_hidden_unless_asked(gateway: Gateway, pool: asyncpg.Pool) -> None:
    org = await new_org(pool)
    async with client(gateway, org.key) as sdk:
        stream = await sdk.chat.completions.create(model="auto", messages=MESSAGES, stream=True)
        chunks = [chunk async for chunk in stream]
    assert chunks and all(chunk.usage is None and chunk.choices for chunk in chunks)


async def test_sync_client_and_embeddings(gateway: Gateway, pool: asyncpg.Pool) -> None:
    org = await new_org(pool)
    with openai.OpenAI(base_url=gateway.v1, api_key=org.key, max_retries=0) as sync:
        result = await asyncio.to_thread(
            sync.embeddings.create, model="text-embedding-3-small", input=["hello", "world"]
        )
    validate("CreateEmbeddingResponse", result.model_dump(exclude_unset=True))
    assert len(result.data) == 2 and result.usage.prompt_tokens > 0


async def test_models_lists_what_the_plan_allows(gateway: Gateway, pool: asyncpg.Pool) -> None:
    free = await new_org(pool, plan="free")
    async with client(gateway, free.key) as sdk:
        models = await sdk.models.list()
    validate("ListModelsResponse", models.model_dump(exclude_unset=True))
    assert [m.id for m in models.data] == [
        "gpt-4o-mini",
        "gemini-2.0-flash",
        "claude-3-5-haiku-latest",
    ]


async def test_bad_key_is_401_in_the_openai_shape(gateway: Gateway) -> None:
    async with client(gateway, "sk-gw-nope") as sdk:
        with pytest.raises(openai.AuthenticationError) as caught:
            await sdk.chat.completions.create(model="auto", messages=MESSAGES)
    body = caught.value.body
    assert isinstance(body, dict) and body["code"] == "invalid_api_key"
    validate("ErrorResponse", caught.value.response.json())
