"""The client's credit routes (SPEC §5): the balance, the access check and the top-up
packages, in their documented shapes, each organization seeing only its own credits."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
import pytest

from ledger import balances, transactions
from ledger.transactions import TransactionType
from policies.pricing import credits_number
from tests.gateway.conftest import Gateway, Org, new_org
from tests.openapi import validate

BALANCE_FIELDS = {
    "organization_id",
    "plan",
    "available",
    "spendable",
    "monthly_credits",
    "monthly_remaining",
    "used_this_period",
    "bonus_credits",
    "reserved_credits",
    "overdraft_limit",
    "period_start",
    "period_end",
}
FAST = ["gpt-4o-mini", "gemini-2.0-flash", "claude-3-5-haiku-latest"]
ENHANCED = ["gpt-4o", "gemini-2.5-flash", "claude-sonnet-4-20250514"]


async def call(
    gateway: Gateway, path: str, key: str, body: Any = None, *, data: bytes | None = None
) -> tuple[int, Any]:
    """GET `path`, or POST it when there is a body; the status and the parsed JSON."""
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    payload = data if data is not None else None if body is None else json.dumps(body).encode()
    method = "GET" if payload is None else "POST"
    async with aiohttp.ClientSession() as session:
        async with session.request(
            method, gateway.url + path, data=payload, headers=headers
        ) as response:
            return response.status, await response.json(content_type=None)


def utc(text: Any) -> datetime:
    """An ISO 8601 UTC time as the API writes it: ending in Z."""
    assert isinstance(text, str) and text.endswith("Z"), text
    at = datetime.fromisoformat(text)
    assert at.utcoffset() is not None and at.utcoffset() == UTC.utcoffset(None)
    return at


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_balance(shown: dict[str, Any], b: balances.Balance) -> None:
    """A balance response: every SPEC field, amounts as numbers equal to the ledger's."""
    assert BALANCE_FIELDS <= shown.keys()
    amounts = {
        "available": b.available_micro,
        "spendable": b.spendable_micro,
        "monthly_credits": b.monthly_credits_micro,
        "monthly_remaining": b.monthly_remaining_micro,
        "used_this_period": b.used_this_period_micro,
        "bonus_credits": b.bonus_credits_micro,
        "reserved_credits": b.reserved_credits_micro,
        "overdraft_limit": b.overdraft_limit_micro,
    }
    for name, micro in amounts.items():
        assert is_number(shown[name]) and shown[name] == credits_number(micro), name
    assert (shown["organization_id"], shown["plan"]) == (str(b.organization_id), b.plan)
    assert (utc(shown["period_start"]), utc(shown["period_end"])) == (b.period_start, b.period_end)


async def drain(pool: asyncpg.Pool, org: Org, leave_micro: int) -> None:
    available = (await balances.get_balance(pool, org.id)).available_micro
    await transactions.post(
        pool, org.id, TransactionType.ADMIN_ADJUSTMENT, leave_micro - available, f"drain-{org.id}"
    )


async def test_balance_of_a_new_organization(gateway: Gateway, pool: asyncpg.Pool) -> None:
    org = await new_org(pool, "pro")
    status, shown = await call(gateway, "/v1/credits/balance", org.key)
    assert status == 200
    check_balance(shown, await balances.get_balance(pool, org.id))
    # pro: 500 a month, a welcome bonus of 25, an overdraft of 10 (config.yaml)
    assert (shown["monthly_credits"], shown["monthly_remaining"], shown["bonus_credits"]) == (
        500,
        500,
        25,
    )
    assert (shown["available"], shown["spendable"], shown["overdraft_limit"]) == (525, 535, 10)
    assert (shown["used_this_period"], shown["reserved_credits"]) == (0, 0)
    assert utc(shown["period_start"]) <= datetime.now(UTC) < utc(shown["period_end"])


async def test_balance_after_a_call_counts_its_use(gateway: Gateway, pool: asyncpg.Pool) -> None:
    org = await new_org(pool, "pro")
    chat = {"messages": [{"role": "user", "content": "One question, please."}]}
    assert (await call(gateway, "/v1/chat/completions", org.key, chat))[0] == 200
    status, shown = await call(gateway, "/v1/credits/balance", org.key)
    assert status == 200
    check_balance(shown, await balances.get_balance(pool, org.id))
    assert 0 < shown["used_this_period"] and shown["available"] < 525
    assert shown["available"] == pytest.approx(shown["monthly_remaining"] + shown["bonus_credits"])


async def test_one_organization_never_sees_another(gateway: Gateway, pool: asyncpg.Pool) -> None:
    mine, theirs = await new_org(pool, "pro"), await new_org(pool, "team")
    await drain(pool, theirs, leave_micro=1_000_000)
    path = f"/v1/credits/balance?organization_id={theirs.id}"
    for org, plan in ((mine, "pro"), (theirs, "team")):
        status, shown = await call(gateway, path, org.key)
        assert status == 200 and (shown["organization_id"], shown["plan"]) == (str(org.id), plan)
        check_balance(shown, await balances.get_balance(pool, org.id))
    _, checked = await call(gateway, "/v1/access-check", mine.key, {"capability": "embeddings"})
    assert checked["balance"]["organization_id"] == str(mine.id)
    assert checked["balance"]["available"] == 525


def level(quality: str, models: list[str], estimate: float) -> dict[str, Any]:
    return {
        "quality": quality,
        "allowed": bool(models),
        "models": models,
        "estimated_credits": estimate,
    }


@pytest.mark.parametrize(
    ("plan", "request_body", "reason", "upgrade_plans", "levels"),
    [
        ("free", {"capability": "question_generation", "quality": "fast"}, None, [],
         [level("fast", FAST, 1), level("enhanced", [], 2), level("premium", [], 4)]),
        ("free", {}, None, [],  # the defaults: question_generation at fast
         [level("fast", FAST, 1), level("enhanced", [], 2), level("premium", [], 4)]),
        ("free", {"capability": "testimonial_polish", "quality": "fast"},
         "capability_not_allowed", ["pro", "team"],
         [level("fast", [], 1), level("enhanced", [], 2), level("premium", [], 4)]),
        ("free", {"capability": "question_generation", "quality": "enhanced"},
         "quality_not_allowed", ["pro", "team"],
         [level("fast", FAST, 1), level("enhanced", [], 2), level("premium", [], 4)]),
        ("pro", {"capability": "testimonial_assembly", "quality": "premium"},
         "quality_not_allowed", ["team"],
         [level("fast", FAST, 2), level("enhanced", ENHANCED, 4), level("premium", [], 8)]),
    ],
)  # fmt: skip
async def test_access_check(
    gateway: Gateway,
    pool: asyncpg.Pool,
    plan: str,
    request_body: dict[str, str],
    reason: str | None,
    upgrade_plans: list[str],
    levels: list[dict[str, Any]],
) -> None:
    org = await new_org(pool, plan)
    status, shown = await call(gateway, "/v1/access-check", org.key, request_body)
    assert status == 200
    assert shown["can_proceed"] is (reason is None)
    assert shown["capability"] == request_body.get("capability", "question_generation")
    assert shown["quality"] == request_body.get("quality", "fast")
    assert (shown["reason"], shown["upgrade_plans"]) == (reason, upgrade_plans)
    assert shown["quality_levels"] == levels
    assert shown["topup_required"] is False
    check_balance(shown["balance"], await balances.get_balance(pool, org.id))


async def test_access_check_of_a_drained_organization(gateway: Gateway, pool: asyncpg.Pool) -> None:
    org = await new_org(pool, "free")
    await drain(pool, org, leave_micro=500_000)  # half a credit; a fast question costs ~1
    body = {"capability": "question_generation", "quality": "fast"}
    status, shown = await call(gateway, "/v1/access-check", org.key, body)
    assert status == 200
    assert (shown["can_proceed"], shown["reason"]) == (False, "insufficient_credits")
    assert (shown["topup_required"], shown["upgrade_plans"]) == (True, [])
    assert shown["balance"]["spendable"] == 0.5


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"{not json", 400, "invalid_request"),
        (b"[]", 400, "invalid_request"),
        (b'{"capability": 5}', 400, "invalid_request"),
        (b'{"capability": "mind_reading"}', 400, "unknown_capability"),
        (b'{"quality": "ludicrous"}', 400, "unknown_quality_level"),
    ],
)
async def test_access_check_refuses_bad_requests(
    gateway: Gateway, pool: asyncpg.Pool, data: bytes, status: int, code: str
) -> None:
    org = await new_org(pool, "free")
    got, shown = await call(gateway, "/v1/access-check", org.key, data=data)
    assert (got, shown["error"]["code"]) == (status, code)
    validate("ErrorResponse", shown)


async def test_packages_are_the_configured_ones(gateway: Gateway, pool: asyncpg.Pool) -> None:
    org = await new_org(pool, "free")
    status, shown = await call(gateway, "/v1/credits/packages", org.key)
    assert status == 200
    assert shown == {
        "data": [
            {"name": "starter", "credits": 100, "price_usd_cents": 999, "popular": False},
            {"name": "popular", "credits": 500, "price_usd_cents": 3999, "popular": True},
            {"name": "power", "credits": 2000, "price_usd_cents": 12999, "popular": False},
        ]
    }
    for package in shown["data"]:
        assert is_number(package["credits"]) and type(package["price_usd_cents"]) is int
