"""Failure paths of the metered proxy: fallbacks to the next model, every model failing, a
named model that does not fall back, refused requests and overage; each checked on the ledger."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam

from gateway.config import Config
from gateway.resources import METRICS
from ledger import balances
from ledger.balances import Balance
from policies.pricing import Rate, charge_micro, credits_text
from tests.gateway.conftest import (
    Gateway,
    Org,
    consumption,
    drain_to,
    new_org,
    reservation_rows,
    sandbox_app,
    start,
)
from tests.openapi import validate

PER_USD, FAST = Decimal(100), Decimal("1.0")
GPT_4O_MINI = Rate(Decimal("0.15"), Decimal("0.60"), PER_USD, FAST)
GEMINI_FLASH = Rate(Decimal("0.10"), Decimal("0.40"), PER_USD, FAST)
CLAUDE_HAIKU = Rate(Decimal("0.80"), Decimal("4.00"), PER_USD, FAST)
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Why do calls fail?"}]
CREDIT = 1_000_000


@pytest.fixture(scope="module")
async def short_timeout_gateway(
    database_url: str, redis_url: str, test_config: Config, pool: asyncpg.Pool
) -> AsyncIterator[Gateway]:
    """The sandbox gateway with a 0.5 s upstream timeout, for the timeout fault."""
    server_config = test_config.server.model_copy(update={"upstream_timeout_s": 0.5})
    short = test_config.model_copy(update={"server": server_config})
    app = sandbox_app(short, database_url, redis_url)
    server = await start(app)
    try:
        yield Gateway(str(server.make_url("")).rstrip("/"), server.app)
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def client(gateway: Gateway, key: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=gateway.v1, api_key=key, max_retries=0) as sdk:
        yield sdk


async def chat(
    gateway: Gateway, org: Org, headers: dict[str, str], **fields: Any
) -> tuple[httpx.Headers, ChatCompletion]:
    fields.setdefault("model", "auto")
    async with client(gateway, org.key) as sdk:
        raw = await sdk.chat.completions.with_raw_response.create(
            messages=MESSAGES, extra_headers=headers, **fields
        )
    return raw.headers, raw.parse()


async def failing_chat(
    gateway: Gateway, org: Org, headers: dict[str, str], **fields: Any
) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        await chat(gateway, org, headers, **fields)
    return caught.value


def fallbacks(gateway: Gateway) -> float:
    value = gateway.app[METRICS].registry.get_sample_value("gateway_fallbacks_total")
    return value or 0.0


def upstream_errors(gateway: Gateway, provider: str, model: str, kind: str) -> float:
    labels = {"provider": provider, "model": model, "kind": kind}
    value = gateway.app[METRICS].registry.get_sample_value("gateway_upstream_errors_total", labels)
    return value or 0.0


async def assert_charged_once(
    pool: asyncpg.Pool,
    org: Org,
    before: Balance,
    headers: httpx.Headers,
    completion: ChatCompletion,
    model: str,
    rate: Rate,
) -> None:
    """The answering model's prices, exactly: one consumption entry, one settled hold."""
    assert headers["x-gateway-model"] == model
    assert completion.usage is not None
    expected = charge_micro(
        rate, completion.usage.prompt_tokens, completion.usage.completion_tokens
    )
    assert expected > 0
    assert headers["x-credits-used"] == credits_text(expected)
    [entry] = await consumption(pool, org)
    assert entry.amount_micro == -expected
    assert entry.model == model
    assert (entry.input_usd_per_mtok, entry.output_usd_per_mtok) == (
        rate.input_usd_per_mtok,
        rate.output_usd_per_mtok,
    )
    assert entry.credit_multiplier == rate.multiplier
    assert (entry.prompt_tokens, entry.completion_tokens) == (
        completion.usage.prompt_tokens,
        completion.usage.completion_tokens,
    )
    [row] = await reservation_rows(pool, org)
    assert (row["status"], row["charged_micro"]) == ("settled", expected)
    assert row["request_id"] == headers["x-request-id"]
    after = await balances.get_balance(pool, org.id)
    assert before.available_micro - after.available_micro == expected
    assert after.reserved_credits_micro == 0
    assert headers["x-balance-remaining"] == credits_text(after.available_micro)


async def assert_released(pool: asyncpg.Pool, org: Org, before: Balance) -> None:
    """A failed call leaves the balance as it was and its hold released."""
    after = await balances.get_balance(pool, org.id)
    assert after == before
    assert await consumption(pool, org) == []
    [row] = await reservation_rows(pool, org)
    assert row["status"] == "released" and row["charged_micro"] is None
    assert row["amount_micro"] > 0


@pytest.fixture(params=["error_500", "error_429", "timeout"])
def first_model_fault(
    request: pytest.FixtureRequest, sandbox_gateway: Gateway, short_timeout_gateway: Gateway
) -> tuple[str, Gateway]:
    """A fault of gpt-4o-mini, and the gateway to try it on (timeouts need a short one)."""
    fault = str(request.param)
    return fault, short_timeout_gateway if fault == "timeout" else sandbox_gateway


async def test_first_model_failing_falls_back_to_the_second(
    first_model_fault: tuple[str, Gateway], pool: asyncpg.Pool
) -> None:
    fault, gateway = first_model_fault
    kind = "timeout" if fault == "timeout" else "status"
    org = await new_org(pool, plan="free")
    before = await balances.get_balance(pool, org.id)
    counted = fallbacks(gateway)
    failed = upstream_errors(gateway, "openai", "gpt-4o-mini", kind)
    headers, completion = await chat(gateway, org, {"X-Sandbox-Fault": f"{fault}@gpt-4o-mini"})
    await assert_charged_once(
        pool, org, before, headers, completion, "gemini-2.0-flash", GEMINI_FLASH
    )
    assert fallbacks(gateway) == counted + 1
    assert upstream_errors(gateway, "openai", "gpt-4o-mini", kind) == failed + 1
    assert completion.choices[0].message.content


async def test_third_model_answers_in_openai_shape_at_its_own_price(
    sandbox_gateway: Gateway, pool: asyncpg.Pool
) -> None:
    org = await new_org(pool, plan="free")
    before = await balances.get_balance(pool, org.id)
    faults = "error_500@gpt-4o-mini, error_429@gemini-2.0-flash"
    headers, completion = await chat(sandbox_gateway, org, {"X-Sandbox-Fault": faults})
    validate("CreateChatCompletionResponse", completion.model_dump(exclude_unset=True))
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content
    await assert_charged_once(
        pool, org, before, headers, completion, "claude-3-5-haiku-latest", CLAUDE_HAIKU
    )


async def test_every_model_failing_is_502_and_releases_the_hold(
    sandbox_gateway: Gateway, pool: asyncpg.Pool
) -> None:
    org = await new_org(pool)
    before = await balances.get_balance(pool, org.id)
    counted = fallbacks(sandbox_gateway)
    error = await failing_chat(sandbox_gateway, org, {"X-Sandbox-Fault": "error_500"})
    assert error.status_code == 502
    assert isinstance(error.body, dict) and error.body["code"] == "upstream_error"
    validate("ErrorResponse", error.response.json())
    assert fallbacks(sandbox_gateway) == counted + 2
    await assert_released(pool, org, before)


async def test_every_model_timing_out_is_504_and_releases_the_hold(
    short_timeout_gateway: Gateway, pool: asyncpg.Pool
) -> None:
    org = await new_org(pool)
    before = await balances.get_balance(pool, org.id)
    error = await failing_chat(short_timeout_gateway, org, {"X-Sandbox-Fault": "timeout"})
    assert error.status_code == 504
    assert isinstance(error.body, dict) and error.body["code"] == "upstream_timeout"
    await assert_released(pool, org, before)


async def test_streamed_call_failing_everywhere_is_502_before_any_event(
    sandbox_gateway: Gateway, pool: asyncpg.Pool
) -> None:
    org = await new_org(pool)
    before = await balances.get_balance(pool, org.id)
    error = await failing_chat(sandbox_gateway, org, {"X-Sandbox-Fault": "error_429"}, stream=True)
    assert error.status_code == 502
    assert isinstance(error.body, dict) and error.body["code"] == "upstream_error"
    await assert_released(pool, org, before)


async def test_a_named_model_does_not_fall_back(
    sandbox_gateway: Gateway, pool: asyncpg.Pool
) -> None:
    org = await new_org(pool)
    before = await balances.get_balance(pool, org.id)
    counted = fallbacks(sandbox_gateway)
    error = await failing_chat(
        sandbox_gateway, org, {"X-Sandbox-Fault": "error_500@gpt-4o-mini"}, model="gpt-4o-mini"
    )
    assert error.status_code == 502
    assert isinstance(error.body, dict) and error.body["code"] == "upstream_error"
    assert fallbacks(sandbox_gateway) == counted
    await assert_released(pool, org, before)


async def test_an_upstream_4xx_is_not_retried_elsewhere(
    sandbox_gateway: Gateway, pool: asyncpg.Pool
) -> None:
    """The simulator answers 400 to a malformed X-Sandbox-Usage: the request's own fault."""
    org = await new_org(pool)
    before = await balances.get_balance(pool, org.id)
    counted = fallbacks(sandbox_gateway)
    error = await failing_chat(sandbox_gateway, org, {"X-Sandbox-Usage": "tokens=lots"})
    assert error.status_code == 400
    assert isinstance(error.body, dict) and error.body["code"] == "invalid_request"
    assert fallbacks(sandbox_gateway) == counted
    await assert_released(pool, org, before)


async def test_overage_is_charged_in_full_and_draws_on_the_overdraft(
    sandbox_gateway: Gateway, pool: asyncpg.Pool
) -> None:
    """An upstream reporting far more output than the hold covers is charged all the same."""
    org = await new_org(pool, plan="pro")
    before = await drain_to(pool, org, 1 * CREDIT)
    assert before.overdraft_used_micro == 0 and before.overdraft_limit_micro == 10 * CREDIT
    headers, completion = await chat(
        sandbox_gateway, org, {"X-Sandbox-Usage": "completion=100000"}, max_tokens=10
    )
    assert completion.usage is not None and completion.usage.completion_tokens == 100_000
    expected = charge_micro(GPT_4O_MINI, completion.usage.prompt_tokens, 100_000)
    await assert_charged_once(pool, org, before, headers, completion, "gpt-4o-mini", GPT_4O_MINI)
    [row] = await reservation_rows(pool, org)
    hold = row["amount_micro"]
    assert headers["x-credits-reserved"] == credits_text(hold)
    assert hold < expected
    [entry] = await consumption(pool, org)
    assert entry.reserved_micro == hold
    assert entry.overage_micro == expected - hold > 0
    after = await balances.get_balance(pool, org.id)
    assert after.available_micro == 1 * CREDIT - expected < 0
    assert after.overdraft_used_micro == expected - 1 * CREDIT > 0
    assert after.bonus_credits_micro >= 0 and after.monthly_remaining_micro >= 0
