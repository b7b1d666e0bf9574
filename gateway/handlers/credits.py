"""The client's credit routes: balance, the access check, top-up packages and purchases."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from gateway import billing
from gateway.auth import authenticate
from gateway.errors import InvalidRequest
from gateway.handlers import render
from gateway.handlers.params import page_query
from gateway.pipeline import read_json
from gateway.resources import SERVICES
from gateway.services import Services
from ledger import transactions
from ledger.balances import get_balance
from policies import access
from policies.catalog import credits_to_micro
from policies.errors import AccessDenied
from policies.pricing import credits_number


async def balance(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    principal = await authenticate(request, services.keys, services.pool)
    return web.json_response(
        render.balance(await get_balance(services.pool, principal.organization_id))
    )


async def transactions_page(request: web.Request) -> web.Response:
    """GET /v1/credits/transactions: newest first, keyset-paginated, filterable."""
    services = request.app[SERVICES]
    principal = await authenticate(request, services.keys, services.pool)
    page = await transactions.list_transactions(
        services.pool, principal.organization_id, **page_query(request)
    )
    return web.json_response(render.page(page))


async def packages(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    await authenticate(request, services.keys, services.pool)
    data = [
        {
            "name": name,
            "credits": float(p.credits),
            "price_usd_cents": p.price_usd_cents,
            "popular": p.popular,
        }
        for name, p in services.config.topup_packages.items()
    ]
    return web.json_response({"data": data})


async def purchase(request: web.Request) -> web.Response:
    """POST /v1/credits/purchase {package}: a Stripe Checkout session to pay for it."""
    services = request.app[SERVICES]
    principal = await authenticate(request, services.keys, services.pool)
    package = (await read_json(request)).get("package")
    if not isinstance(package, str) or not package:
        raise InvalidRequest("package must be the name of a top-up package.", param="package")
    checkout = await billing.create_checkout(
        services.stripe, services.config, principal.organization_id, package
    )
    return web.json_response({"checkout_url": checkout.url, "session_id": checkout.session_id})


def _field(body: dict[str, Any], name: str, default: str) -> str:
    value = body.get(name, default)
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be a string.", param=name)
    return value


async def access_check(request: web.Request) -> web.Response:
    """Can this organization run a capability at a quality now, and if not, what would help."""
    services = request.app[SERVICES]
    principal = await authenticate(request, services.keys, services.pool)
    body = await read_json(request) if request.can_read_body else {}
    capability = _field(body, "capability", services.config.defaults.capability)
    quality = _field(body, "quality", services.config.defaults.quality)
    reason, upgrade_plans = None, []
    try:
        access.resolve(
            services.config,
            plan=principal.plan,
            capability=capability,
            quality=quality,
            model=None,
            mode=None,
            now=datetime.now(UTC),
        )
    except AccessDenied as exc:
        reason, upgrade_plans = exc.reason, exc.upgrade_plans
    bal = await get_balance(services.pool, principal.organization_id)
    estimate = services.config.capabilities[capability].estimated_credits.get(quality)
    topup_required = estimate is not None and bal.spendable_micro < credits_to_micro(estimate)
    if reason is None and topup_required:
        reason = "insufficient_credits"
    return web.json_response(
        {
            "can_proceed": reason is None,
            "capability": capability,
            "quality": quality,
            "reason": reason,
            "quality_levels": _levels(services, principal.plan, capability),
            "balance": render.balance(bal),
            "upgrade_plans": upgrade_plans,
            "topup_required": topup_required,
        }
    )


def _levels(services: Services, plan: str, capability: str) -> list[dict[str, Any]]:
    config = services.config
    estimates = config.capabilities[capability].estimated_credits
    levels = []
    for quality in config.quality_levels:
        models = config.models_for(plan, capability, quality)
        estimate = estimates.get(quality)
        levels.append(
            {
                "quality": quality,
                "allowed": bool(models),
                "models": list(models),
                "estimated_credits": None
                if estimate is None
                else credits_number(credits_to_micro(estimate)),
            }
        )
    return levels
