"""The admin API (Bearer GATEWAY_ADMIN_KEY): organizations, keys, balances, grants, plan
changes, pending reservations and the ledger check."""

from __future__ import annotations

import uuid
from decimal import Decimal, InvalidOperation
from typing import Any

from aiohttp import web

from gateway.auth import require_admin
from gateway.errors import InvalidRequest, NotFound
from gateway.handlers import render
from gateway.handlers.params import page_query
from gateway.pipeline import read_json
from gateway.resources import SERVICES
from gateway.services import Services
from ledger import accounts, balances, periods, reservations, transactions
from ledger.check import check_ledger
from ledger.transactions import TransactionType
from policies.catalog import credits_to_micro
from policies.pricing import credits_number


async def _admin(request: web.Request) -> Services:
    services = request.app[SERVICES]
    await require_admin(request, services.admin_key, services.keys, services.pool)
    return services


def _uuid(request: web.Request, name: str = "id") -> uuid.UUID:
    try:
        return uuid.UUID(request.match_info[name])
    except ValueError:
        raise NotFound(f"No such {name.removesuffix('_id') or 'object'}.") from None


def _text(body: dict[str, Any], name: str, *, max_length: int = 255) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not 1 <= len(value) <= max_length:
        raise InvalidRequest(
            f"{name} must be a string of 1 to {max_length} characters.", param=name
        )
    return value


def _organization(org: accounts.Organization) -> dict[str, Any]:
    return {
        "id": str(org.id),
        "name": org.name,
        "plan": org.plan,
        "pending_plan": org.pending_plan,
        "pending_change_at": render.iso(org.pending_change_at),
        "created_at": render.iso(org.created_at),
    }


async def create_org(request: web.Request) -> web.Response:
    services = await _admin(request)
    body = await read_json(request)
    org = await accounts.create_organization(
        services.pool, _text(body, "name", max_length=200), _text(body, "plan")
    )
    return web.json_response(_organization(org), status=201)


async def get_org(request: web.Request) -> web.Response:
    services = await _admin(request)
    return web.json_response(
        _organization(await accounts.get_organization(services.pool, _uuid(request)))
    )


async def create_key(request: web.Request) -> web.Response:
    services = await _admin(request)
    body = await read_json(request) if request.can_read_body else {}
    name = body.get("name")
    if name is not None and not isinstance(name, str):
        raise InvalidRequest("name must be a string.", param="name")
    key = await accounts.create_api_key(services.pool, _uuid(request), name)
    return web.json_response({"id": str(key.id), "key": key.key, "prefix": key.prefix}, status=201)


async def revoke_key(request: web.Request) -> web.Response:
    services = await _admin(request)
    if not await accounts.revoke_api_key(services.pool, _uuid(request)):
        raise NotFound("No such live API key.")
    services.keys.forget()
    return web.json_response({"id": request.match_info["id"], "revoked": True})


async def org_balance(request: web.Request) -> web.Response:
    services = await _admin(request)
    return web.json_response(
        render.balance(await balances.get_balance(services.pool, _uuid(request)))
    )


async def org_transactions(request: web.Request) -> web.Response:
    services = await _admin(request)
    org_id = _uuid(request)
    await accounts.get_organization(services.pool, org_id)
    page = await transactions.list_transactions(services.pool, org_id, **page_query(request))
    return web.json_response(render.page(page))


def _amount(body: dict[str, Any]) -> int:
    raw = body.get("amount")
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise InvalidRequest("amount must be a number of credits.", param="amount")
    try:
        micro = credits_to_micro(Decimal(str(raw)))
    except (InvalidOperation, ValueError):
        raise InvalidRequest(
            "amount must be a number of credits with at most 6 decimals.", param="amount"
        ) from None
    if micro == 0:
        raise InvalidRequest("amount must not be zero.", param="amount")
    return micro


async def grant_credits(request: web.Request) -> web.Response:
    """An admin adjustment, positive or negative; a repeat of the key returns the same entry."""
    services = await _admin(request)
    body = await read_json(request)
    posted = await transactions.post(
        services.pool,
        _uuid(request),
        TransactionType.ADMIN_ADJUSTMENT,
        _amount(body),
        f"admin:{_text(body, 'idempotency_key')}",
        description=_text(body, "reason", max_length=1000),
    )
    return web.json_response(
        render.transaction(posted.transaction), status=200 if posted.replayed else 201
    )


async def change_plan(request: web.Request) -> web.Response:
    services = await _admin(request)
    body = await read_json(request)
    change = await periods.change_plan(services.pool, _uuid(request), _text(body, "plan"))
    return web.json_response(
        {
            "change": change.kind.value,
            "plan": change.plan,
            "effective_at": render.iso(change.effective_at),
            "adjustment": credits_number(change.adjustment_micro),
            "transaction_id": None if change.transaction_id is None else str(change.transaction_id),
        }
    )


async def pending_reservations(request: web.Request) -> web.Response:
    services = await _admin(request)
    status = request.query.get("status", "pending")
    if status != "pending":
        raise InvalidRequest("Only status=pending is listed.", param="status")
    rows = await reservations.list_pending(services.pool)
    return web.json_response(
        {
            "data": [
                {
                    "id": str(r.id),
                    "organization_id": str(r.organization_id),
                    "amount": credits_number(r.amount_micro),
                    "capability": r.capability,
                    "quality": r.quality,
                    "model": r.model,
                    "request_id": r.request_id,
                    "created_at": render.iso(r.created_at),
                    "expires_at": render.iso(r.expires_at),
                }
                for r in rows
            ]
        }
    )


async def ledger_check(request: web.Request) -> web.Response:
    services = await _admin(request)
    violations = await check_ledger(services.pool)
    return web.json_response(
        {
            "ok": not violations,
            "violations": [
                {"organization_id": str(v.organization_id), "kind": v.kind, "detail": v.detail}
                for v in violations
            ],
        }
    )
