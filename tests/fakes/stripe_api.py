"""A local stand-in for the Stripe API in Stripe's wire format: `POST /v1/checkout/sessions`
takes the form-encoded body the `stripe` library sends and answers a `checkout.session`
object; every request is recorded. Also the events Stripe would send about those sessions,
signed the way Stripe signs webhooks."""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import stripe
from aiohttp import web

API_VERSION = "2026-10-28.endive"  # what the stripe library pins; echoed on events


@dataclass(frozen=True)
class RecordedRequest:
    path: str
    form: dict[str, str]  # flat, as encoded: `line_items[0][price_data][unit_amount]`
    idempotency_key: str | None
    authorization: str | None


@dataclass
class FakeStripe:
    """What the fake has been asked and which sessions it opened, by id."""

    recorded: list[RecordedRequest] = field(default_factory=list)
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    _replies: dict[str, dict[str, Any]] = field(default_factory=dict)  # by idempotency key

    def paid(self, session_id: str, status: str = "paid") -> dict[str, Any]:
        """The session as Stripe reports it once the customer has gone through Checkout."""
        return {**self.sessions[session_id], "status": "complete", "payment_status": status}

    def charge(self, session_id: str, refunded_cents: int) -> dict[str, Any]:
        """The session's charge after `refunded_cents` have been refunded, all refunds together."""
        session = self.sessions[session_id]
        amount = session["amount_total"]
        return {
            "id": "ch_" + session["payment_intent"].removeprefix("pi_"),
            "object": "charge",
            "amount": amount,
            "amount_captured": amount,
            "amount_refunded": refunded_cents,
            "refunded": refunded_cents == amount,
            "currency": session["currency"],
            "paid": True,
            "status": "succeeded",
            "payment_intent": session["payment_intent"],
            "metadata": session["payment_intent_metadata"],
            "livemode": False,
        }


def _error(status: int, message: str, param: str | None = None) -> web.Response:
    body = {"error": {"type": "invalid_request_error", "message": message, "param": param}}
    return web.json_response(body, status=status)


def _session(form: dict[str, str]) -> dict[str, Any]:
    token = secrets.token_hex(12)
    item = "line_items[0]"
    quantity = int(form.get(f"{item}[quantity]", "1"))
    amount = int(form[f"{item}[price_data][unit_amount]"]) * quantity
    return {
        "id": f"cs_test_{token}",
        "object": "checkout.session",
        "mode": form["mode"],
        "status": "open",
        "payment_status": "unpaid",
        "amount_subtotal": amount,
        "amount_total": amount,
        "currency": form[f"{item}[price_data][currency]"],
        "client_reference_id": form.get("client_reference_id"),
        "metadata": _prefixed(form, "metadata"),
        "payment_intent_metadata": _prefixed(form, "payment_intent_data[metadata]"),
        "payment_intent": f"pi_test_{token}",
        "success_url": form["success_url"],
        "cancel_url": form["cancel_url"],
        "url": f"https://checkout.stripe.test/c/pay/cs_test_{token}",
        "created": int(time.time()),
        "livemode": False,
    }


def _prefixed(form: dict[str, str], name: str) -> dict[str, str]:
    """`metadata[key]=value` fields as a dict."""
    start = name + "["
    return {k[len(start) : -1]: v for k, v in form.items() if k.startswith(start)}


def create_fake_stripe_app(fake: FakeStripe) -> web.Application:
    async def create_session(request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        key = request.headers.get("Idempotency-Key")
        fake.recorded.append(
            RecordedRequest(request.path, form, key, request.headers.get("Authorization"))
        )
        if not request.headers.get("Authorization", "").startswith("Bearer sk_test_"):
            return _error(401, "Invalid API Key provided.")
        if key is not None and key in fake._replies:
            return web.json_response(fake._replies[key])
        missing = [name for name in ("mode", "success_url", "cancel_url") if name not in form]
        if missing or "line_items[0][price_data][unit_amount]" not in form:
            return _error(400, "Missing required param.", (missing or ["line_items"])[0])
        session = _session(form)
        fake.sessions[session["id"]] = session
        reply = {k: v for k, v in session.items() if k != "payment_intent_metadata"}
        reply["payment_intent"] = None  # Stripe creates it when the customer pays
        if key is not None:
            fake._replies[key] = reply
        return web.json_response(reply)

    app = web.Application()
    app.router.add_post("/v1/checkout/sessions", create_session)
    return app


def event(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    """A Stripe event (snapshot payload) about `obj`."""
    shown = {k: v for k, v in obj.items() if k != "payment_intent_metadata"}
    return {
        "id": f"evt_test_{secrets.token_hex(12)}",
        "object": "event",
        "api_version": API_VERSION,
        "created": int(time.time()),
        "type": kind,
        "data": {"object": shown},
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
    }


def signed(payload: bytes, secret: str, timestamp: int | None = None) -> dict[str, str]:
    """The headers Stripe sends with a webhook: `Stripe-Signature: t=...,v1=...`."""
    header = stripe.WebhookSignature.generate_signature_header(
        payload.decode(), secret, timestamp=timestamp
    )
    return {"Stripe-Signature": header, "Content-Type": "application/json; charset=utf-8"}


def body(evt: dict[str, Any]) -> bytes:
    return json.dumps(evt, indent=2).encode()
