"""Webhooks from outside: Stripe's events, authenticated by their signature, not a key."""

from __future__ import annotations

from aiohttp import web

from gateway import billing
from gateway.resources import SERVICES


async def stripe_webhook(request: web.Request) -> web.Response:
    """POST /webhooks/stripe: 200 once the event is applied (or deliberately ignored), so
    that Stripe stops retrying; 400 invalid_signature for a forged or stale delivery."""
    services = request.app[SERVICES]
    event = billing.verify_event(
        await request.read(),
        request.headers.get("Stripe-Signature"),
        services.stripe.webhook_secret,
    )
    outcome = await billing.apply_event(services.pool, services.config, event)
    return web.json_response({"received": True, "outcome": outcome.value})
