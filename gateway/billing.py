"""Stripe: Checkout sessions for top-up packages, webhook signatures, and what each event
does to the ledger. Talks to Stripe through the official `stripe` library, asynchronously,
over the gateway's own pooled aiohttp session."""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import aiohttp
import asyncpg
import stripe
from stripe.params.checkout import SessionCreateParams

from gateway.config import Config
from gateway.errors import (
    InvalidRequest,
    InvalidSignature,
    NotFound,
    PaymentsUnavailable,
    UpstreamFailed,
)
from ledger import payments
from ledger.errors import UnknownOrganization
from policies.catalog import credits_to_micro

log = logging.getLogger(__name__)

SIGNATURE_TOLERANCE_S = 300  # Stripe's own default: an older signed event is a replay
STRIPE_TIMEOUT_S = 30  # per call to the Stripe API, connect to last byte
STRIPE_RETRIES = 2  # safe: every create carries an idempotency key
MAX_ID_LENGTH = 200  # Stripe ids are far shorter; ours go into 255-character ledger keys
PAYMENT_EVENTS = frozenset(
    {"checkout.session.completed", "checkout.session.async_payment_succeeded"}
)


@dataclass(frozen=True)
class StripeApi:
    """The Stripe account, read from the environment once at start-up."""

    client: stripe.StripeClient | None  # None: STRIPE_SECRET_KEY is unset; purchases get 503
    webhook_secret: str | None  # None: STRIPE_WEBHOOK_SECRET is unset; every event gets 400


def stripe_api(
    session: aiohttp.ClientSession, environ: Mapping[str, str] = os.environ
) -> StripeApi:
    """STRIPE_SECRET_KEY, STRIPE_WEBHOOK_SECRET, and STRIPE_API_BASE (another address for
    the API, e.g. a local fake in tests)."""
    key = environ.get("STRIPE_SECRET_KEY") or None
    base = environ.get("STRIPE_API_BASE") or None
    client = None
    if key is not None:
        client = stripe.StripeClient(
            key,
            base_addresses={"api": base} if base else None,
            max_network_retries=STRIPE_RETRIES,
            http_client=stripe.AIOHTTPClient(
                session=session, timeout=aiohttp.ClientTimeout(total=STRIPE_TIMEOUT_S)
            ),
        )
    return StripeApi(client, environ.get("STRIPE_WEBHOOK_SECRET") or None)


@dataclass(frozen=True)
class CheckoutSession:
    session_id: str
    url: str


async def create_checkout(
    api: StripeApi, config: Config, organization_id: uuid.UUID, package_name: str
) -> CheckoutSession:
    """A Stripe Checkout session selling one top-up package to an organization."""
    package = config.topup_packages.get(package_name)
    if package is None:
        raise NotFound(f"No top-up package named {package_name!r}.", code="unknown_package")
    if api.client is None:
        raise PaymentsUnavailable("Payments are not configured on this gateway.")
    metadata = {"organization_id": str(organization_id), "package": package_name}
    params: SessionCreateParams = {
        "mode": "payment",
        "line_items": [
            {
                "quantity": 1,
                "price_data": {
                    "currency": config.stripe.currency,
                    "unit_amount": package.price_usd_cents,
                    "product_data": {"name": package.name or package_name},
                },
            }
        ],
        "success_url": config.stripe.success_url,
        "cancel_url": config.stripe.cancel_url,
        "client_reference_id": str(organization_id),
        "metadata": metadata,
        "payment_intent_data": {"metadata": metadata},  # shown on the payment in Stripe
    }
    try:
        session = await api.client.v1.checkout.sessions.create_async(
            params, {"idempotency_key": f"checkout:{uuid.uuid4()}"}
        )
    except stripe.StripeError as exc:
        log.warning("Stripe refused a checkout session: %s %s", type(exc).__name__, exc.code)
        raise UpstreamFailed("The payment provider could not open a checkout.") from None
    if not session.url:
        raise UpstreamFailed("The payment provider returned a checkout without a URL.")
    return CheckoutSession(session.id, session.url)


def verify_event(
    payload: bytes,
    signature_header: str | None,
    secret: str | None,
    tolerance_s: int = SIGNATURE_TOLERANCE_S,
) -> dict[str, Any]:
    """The event in a webhook body, once its `Stripe-Signature` proves it is Stripe's and
    recent; raises InvalidSignature otherwise (also when no secret is configured)."""
    try:
        stripe.WebhookSignature.verify_header(payload, signature_header, secret, tolerance_s)
    except (stripe.SignatureVerificationError, UnicodeDecodeError):
        raise InvalidSignature("The Stripe-Signature header is invalid or too old.") from None
    try:
        event = json.loads(payload)
    except ValueError:
        raise InvalidRequest("The event is not valid JSON.") from None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise InvalidRequest("The body is not a Stripe event.")
    return event


class Outcome(StrEnum):
    CREDITED = "credited"  # a payment's credits were booked now
    REFUNDED = "refunded"  # a refund's share was reversed now
    PENDING = "pending"  # a refund recorded before its payment; reversed when it comes
    DUPLICATE = "duplicate"  # applied before: a redelivery or the other payment event
    AWAITING_PAYMENT = "awaiting_payment"  # completed, paid later (async payment methods)
    IGNORED = "ignored"  # not an event the gateway acts on, or not one it can apply


class _Unusable(Exception):
    """An event that names something the gateway cannot credit; acknowledged and logged."""


async def apply_event(pool: asyncpg.Pool, config: Config, event: dict[str, Any]) -> Outcome:
    """Apply a verified event to the ledger, once however often and in whatever order Stripe
    delivers it.

    An event that can never apply (a session of another integration, an unknown organization
    or package) is acknowledged with 200 and logged as a warning, not refused: Stripe retries
    any other answer for three days, and no retry can make it valid. The log names the event,
    so that an operator can grant the credits by an admin adjustment.
    """
    kind = event["type"]
    try:
        if kind in PAYMENT_EVENTS:
            return await _apply_payment(pool, config, _data_object(event))
        if kind == "charge.refunded":
            return await _apply_refund(pool, _data_object(event))
    except (_Unusable, UnknownOrganization) as exc:
        log.warning("Stripe event %s (%s) not applied: %s", event.get("id"), kind, exc)
    return Outcome.IGNORED


async def _apply_payment(pool: asyncpg.Pool, config: Config, session: dict[str, Any]) -> Outcome:
    if session.get("payment_status") != "paid":
        return Outcome.AWAITING_PAYMENT
    applied = await payments.record_payment(pool, _payment(config, session))
    if applied.credited_micro:
        return Outcome.CREDITED
    return Outcome.REFUNDED if applied.reversed_micro else Outcome.DUPLICATE


async def _apply_refund(pool: asyncpg.Pool, charge: dict[str, Any]) -> Outcome:
    applied = await payments.record_refund(pool, _refund(charge))
    if not applied.paid:
        return Outcome.PENDING
    return Outcome.REFUNDED if applied.reversed_micro else Outcome.DUPLICATE


def _data_object(event: dict[str, Any]) -> dict[str, Any]:
    data = event.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    if not isinstance(obj, dict):
        raise _Unusable("the event has no data.object")
    return obj


def _id(value: Any) -> str | None:
    """An id, also from an expanded object."""
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH else None


def _payment(config: Config, session: dict[str, Any]) -> payments.Payment:
    """A paid session as the ledger records it; the organization named twice, consistently."""
    session_id = _id(session)
    metadata = session.get("metadata")
    if session_id is None or not isinstance(metadata, dict):
        raise _Unusable("a session without an id or metadata")
    organization = metadata.get("organization_id")
    if not isinstance(organization, str) or session.get("client_reference_id") != organization:
        raise _Unusable(f"session {session_id}: organization not confirmed by client_reference_id")
    try:
        organization_id = uuid.UUID(organization)
    except ValueError:
        raise _Unusable(f"session {session_id}: organization {organization!r}") from None
    package_name = metadata.get("package")
    package = config.topup_packages.get(package_name) if isinstance(package_name, str) else None
    if package is None:
        raise _Unusable(f"session {session_id}: unknown package {package_name!r}")
    return payments.Payment(
        payment_intent=_id(session.get("payment_intent")) or session_id,
        session_id=session_id,
        organization_id=organization_id,
        package=str(package_name),
        credits_micro=credits_to_micro(package.credits),
    )


def _cents(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _refund(charge: dict[str, Any]) -> payments.Refund:
    charge_id, payment_intent = _id(charge), _id(charge.get("payment_intent"))
    amount, refunded = _cents(charge.get("amount")), _cents(charge.get("amount_refunded"))
    if charge_id is None or payment_intent is None:
        raise _Unusable("a charge without an id or a payment_intent")
    if amount is None or refunded is None or amount <= 0 or not 0 <= refunded <= amount:
        raise _Unusable(f"charge {charge_id}: amounts {amount!r}, refunded {refunded!r}")
    return payments.Refund(payment_intent, charge_id, amount, refunded)
