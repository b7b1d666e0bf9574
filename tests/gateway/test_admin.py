"""The admin API: organizations, keys, balances, grants, plan changes, pending holds and the
ledger check, behind the admin key."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.gateway.conftest import ADMIN_KEY, Gateway, new_org
from tests.openapi import validate

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    headers: dict[str, str] = ADMIN,
    json: Any = None,
) -> tuple[int, Any]:
    async with http.request(method, url, headers=headers, json=json) as resp:
        return resp.status, await resp.json()


async def test_organization_lifecycle(
    gateway: Gateway, http: aiohttp.ClientSession, pool: asyncpg.Pool
) -> None:
    status, org = await call(
        http, "POST", f"{gateway.url}/admin/orgs", json={"name": "Acme", "plan": "free"}
    )
    assert status == 201 and org["plan"] == "free" and org["created_at"].endswith("Z")
    base = f"{gateway.url}/admin/orgs/{org['id']}"
    assert (await call(http, "GET", base))[1]["name"] == "Acme"
    status, balance = await call(http, "GET", f"{base}/balance")
    assert (balance["available"], balance["monthly_credits"], balance["bonus_credits"]) == (
        20,
        10,
        10,
    )

    status, key = await call(http, "POST", f"{base}/keys", json={"name": "ci"})
    assert status == 201 and key["key"].startswith("sk-gw-")
    own = {"Authorization": f"Bearer {key['key']}"}
    status, mine = await call(http, "GET", f"{gateway.v1}/credits/balance", headers=own)
    assert status == 200 and mine["organization_id"] == org["id"]

    assert (await call(http, "DELETE", f"{gateway.url}/admin/keys/{key['id']}"))[0] == 200
    status, body = await call(http, "GET", f"{gateway.v1}/credits/balance", headers=own)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert (await call(http, "DELETE", f"{gateway.url}/admin/keys/{key['id']}"))[0] == 404


async def test_grants_are_idempotent(
    gateway: Gateway, http: aiohttp.ClientSession, pool: asyncpg.Pool
) -> None:
    org = await new_org(pool)
    url = f"{gateway.url}/admin/orgs/{org.id}/credits"
    grant = {"amount": 12.5, "reason": "goodwill", "idempotency_key": "g-1"}
    first = await call(http, "POST", url, json=grant)
    again = await call(http, "POST", url, json=grant)
    assert (first[0], again[0]) == (201, 200) and first[1] == again[1]
    assert first[1]["amount"] == 12.5 and first[1]["type"] == "admin_adjustment"
    status, body = await call(http, "POST", url, json={**grant, "amount": 13})
    assert status == 422 and body["error"]["code"] == "idempotency_key_reused"
    status, balance = await call(http, "GET", f"{gateway.url}/admin/orgs/{org.id}/balance")
    assert balance["bonus_credits"] == 25 + 12.5
    status, body = await call(http, "POST", url, json={**grant, "amount": "1.0000001"})
    assert status == 400 and body["error"]["param"] == "amount"


async def test_plan_changes(
    gateway: Gateway, http: aiohttp.ClientSession, pool: asyncpg.Pool
) -> None:
    org = await new_org(pool, plan="pro")
    url = f"{gateway.url}/admin/orgs/{org.id}/plan"
    status, up = await call(http, "POST", url, json={"plan": "team"})
    assert status == 200 and (up["change"], up["adjustment"]) == ("upgraded", 1500)
    status, down = await call(http, "POST", url, json={"plan": "free"})
    assert down["change"] == "downgrade_scheduled"
    status, body = await call(http, "GET", f"{gateway.url}/admin/orgs/{org.id}")
    assert (body["plan"], body["pending_plan"]) == ("team", "free")
    status, body = await call(http, "POST", url, json={"plan": "platinum"})
    assert status == 400 and body["error"]["code"] == "unknown_plan"
    status, body = await call(http, "POST", url, json={"plan": "team"})
    assert status == 200 and body["change"] == "downgrade_cancelled"
    status, body = await call(http, "POST", url, json={"plan": "team"})
    assert status == 409 and body["error"]["code"] == "plan_change_not_allowed"


async def test_transactions_page_through(
    gateway: Gateway, http: aiohttp.ClientSession, pool: asyncpg.Pool
) -> None:
    org = await new_org(pool)
    for n in range(5):
        await call(
            http,
            "POST",
            f"{gateway.url}/admin/orgs/{org.id}/credits",
            json={"amount": n + 1, "reason": "r", "idempotency_key": f"k{n}"},
        )
    own = {"Authorization": f"Bearer {org.key}"}
    seen: list[str] = []
    cursor = ""
    while True:
        status, page = await call(
            http, "GET", f"{gateway.v1}/credits/transactions?limit=3&cursor={cursor}", headers=own
        )
        assert status == 200
        seen += [t["id"] for t in page["data"]]
        if page["next_cursor"] is None:
            break
        cursor = page["next_cursor"]
    assert len(seen) == len(set(seen)) == 7  # allocation, welcome bonus, five grants
    status, page = await call(
        http, "GET", f"{gateway.url}/admin/orgs/{org.id}/transactions?type=promo_bonus"
    )
    assert [t["type"] for t in page["data"]] == ["promo_bonus"]
    status, body = await call(
        http, "GET", f"{gateway.v1}/credits/transactions?type=nope", headers=own
    )
    assert status == 400 and body["error"]["param"] == "type"


async def test_admin_routes_refuse_other_keys(
    gateway: Gateway, http: aiohttp.ClientSession, pool: asyncpg.Pool
) -> None:
    org = await new_org(pool)
    for headers, status, code in [
        ({"Authorization": f"Bearer {org.key}"}, 403, "forbidden"),
        ({"Authorization": "Bearer not-the-admin-key"}, 401, "invalid_api_key"),
        ({}, 401, "invalid_api_key"),
    ]:
        got, body = await call(http, "GET", f"{gateway.url}/admin/ledger/check", headers=headers)
        assert (got, body["error"]["code"]) == (status, code)
        validate("ErrorResponse", body)


async def test_unknown_organization_is_404(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    for org in ["00000000-0000-4000-8000-000000000000", "not-a-uuid"]:
        status, body = await call(http, "GET", f"{gateway.url}/admin/orgs/{org}/balance")
        assert status == 404 and body["error"]["code"] == "not_found"


async def test_ledger_check_and_pending(
    gateway: Gateway, http: aiohttp.ClientSession, pool: asyncpg.Pool
) -> None:
    status, body = await call(http, "GET", f"{gateway.url}/admin/ledger/check")
    assert status == 200 and body == {"ok": True, "violations": []}
    status, body = await call(http, "GET", f"{gateway.url}/admin/reservations?status=pending")
    assert status == 200 and isinstance(body["data"], list)
