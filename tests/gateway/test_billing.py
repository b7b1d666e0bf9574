"""Stripe top-ups (SPEC §5): a purchase opens a Checkout session on a local fake of the
Stripe API; signed webhook events credit each paid session once and reverse each refund
once, however often, concurrently and in whatever order they arrive; a forged or stale
signature is refused and writes nothing."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings, target
from hypothesis import event as label
from hypothesis import strategies as st

from gateway import billing
from gateway.config import Config
from gateway.errors import PaymentsUnavailable
from ledger import balances, reservations, transactions
from ledger.payments import refunded_share_micro
from ledger.transactions import Transaction, TransactionType
from tests.fakes.stripe_api import FakeStripe, body, create_fake_stripe_app, event, signed
from tests.gateway.conftest import Org, new_org, sandbox_app, start
from tests.openapi import validate

SECRET_KEY = "sk_test_gateway"
WEBHOOK_SECRET = "whsec_test_gateway"
FORGED_SECRET = "whsec_someone_else"
STALE_S = billing.SIGNATURE_TOLERANCE_S + 60
MICRO = 1_000_000
STRIPE_TYPES = frozenset({TransactionType.TOPUP_PURCHASE, TransactionType.REFUND})


@dataclass(frozen=True)
class Rig:
    url: str
    fake: FakeStripe
    http: aiohttp.ClientSession
    pool: asyncpg.Pool

    async def post(
        self, path: str, data: bytes, headers: dict[str, str]
    ) -> tuple[int, dict[str, Any]]:
        async with self.http.post(self.url + path, data=data, headers=headers) as response:
            return response.status, await response.json()

    async def purchase(self, org: Org, package: str) -> tuple[int, dict[str, Any]]:
        headers = {"Authorization": f"Bearer {org.key}", "Content-Type": "application/json"}
        return await self.post(
            "/v1/credits/purchase", json.dumps({"package": package}).encode(), headers
        )

    async def bought(self, org: Org, package: str) -> str:
        status, reply = await self.purchase(org, package)
        assert status == 200, reply
        return str(reply["session_id"])

    async def deliver(
        self, evt: dict[str, Any], secret: str = WEBHOOK_SECRET, age_s: int = 0
    ) -> tuple[int, dict[str, Any]]:
        return await self.send(body(evt), secret, age_s)

    async def send(
        self, payload: bytes, secret: str = WEBHOOK_SECRET, age_s: int = 0
    ) -> tuple[int, dict[str, Any]]:
        """One delivery, signed now (Stripe signs each retry anew), or `age_s` ago."""
        headers = signed(payload, secret, int(time.time()) - age_s)
        return await self.post("/webhooks/stripe", payload, headers)

    async def entries(self, org: Org) -> list[Transaction]:
        page = await transactions.list_transactions(
            self.pool, org.id, types=STRIPE_TYPES, limit=500
        )
        return page.data

    async def available(self, org: Org) -> int:
        return (await balances.get_balance(self.pool, org.id)).available_micro


@pytest.fixture(scope="module")
async def fake_stripe() -> AsyncIterator[tuple[str, FakeStripe]]:
    fake = FakeStripe()
    server = await start(create_fake_stripe_app(fake))
    try:
        yield str(server.make_url("")).rstrip("/"), fake
    finally:
        await server.close()


@pytest.fixture(scope="module")
async def rig(
    database_url: str,
    redis_url: str,
    test_config: Config,
    pool: asyncpg.Pool,
    fake_stripe: tuple[str, FakeStripe],
) -> AsyncIterator[Rig]:
    """The gateway (sandbox providers) with the Stripe settings in its environment at start."""
    app = sandbox_app(test_config, database_url, redis_url)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("STRIPE_SECRET_KEY", SECRET_KEY)
        env.setenv("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET)
        env.setenv("STRIPE_API_BASE", fake_stripe[0])
        server = await start(app)
    try:
        async with aiohttp.ClientSession() as http:
            yield Rig(str(server.make_url("")).rstrip("/"), fake_stripe[1], http, pool)
    finally:
        await server.close()


def refused(status: int, reply: dict[str, Any], code: str, expected: int = 400) -> None:
    assert status == expected, reply
    validate("ErrorResponse", reply)
    assert reply["error"]["code"] == code


async def test_purchase_opens_a_checkout_session_for_the_package(
    rig: Rig, test_config: Config
) -> None:
    org = await new_org(rig.pool)
    status, reply = await rig.purchase(org, "starter")
    assert status == 200, reply
    assert set(reply) == {"checkout_url", "session_id"}
    session = rig.fake.sessions[reply["session_id"]]
    assert reply["session_id"].startswith("cs_test_") and reply["checkout_url"] == session["url"]
    sent = rig.fake.recorded[-1]
    assert sent.path == "/v1/checkout/sessions"
    assert sent.authorization == f"Bearer {SECRET_KEY}"
    item = "line_items[0]"
    assert sent.form == {
        "mode": "payment",
        f"{item}[quantity]": "1",
        f"{item}[price_data][currency]": "usd",
        f"{item}[price_data][unit_amount]": "999",
        f"{item}[price_data][product_data][name]": "Starter",
        "success_url": test_config.stripe.success_url,
        "cancel_url": test_config.stripe.cancel_url,
        "client_reference_id": str(org.id),
        "metadata[organization_id]": str(org.id),
        "metadata[package]": "starter",
        "payment_intent_data[metadata][organization_id]": str(org.id),
        "payment_intent_data[metadata][package]": "starter",
    }
    assert session["amount_total"] == 999 and session["currency"] == "usd"
    await rig.bought(org, "starter")
    keys = [r.idempotency_key for r in rig.fake.recorded[-2:]]
    assert all(k and k.startswith("checkout:") for k in keys) and keys[0] != keys[1]
    assert await rig.entries(org) == []  # nothing is credited before Stripe says it is paid


async def test_purchase_refusals(rig: Rig) -> None:
    org = await new_org(rig.pool)
    sent = len(rig.fake.recorded)
    refused(*await rig.purchase(org, "platinum"), "unknown_package", 404)
    refused(
        *await rig.post("/v1/credits/purchase", b"{}", {"Authorization": f"Bearer {org.key}"}),
        "invalid_request",
    )
    refused(
        *await rig.post("/v1/credits/purchase", b'{"package": "starter"}', {}),
        "invalid_api_key",
        401,
    )
    assert len(rig.fake.recorded) == sent


async def test_purchase_without_a_stripe_key_is_unavailable(test_config: Config) -> None:
    with pytest.raises(PaymentsUnavailable):
        await billing.create_checkout(
            billing.StripeApi(None, None), test_config, uuid.uuid4(), "starter"
        )


async def test_bad_signatures_are_refused_and_write_nothing(rig: Rig) -> None:
    org = await new_org(rig.pool)
    session = await rig.bought(org, "power")
    payload = body(event("checkout.session.completed", rig.fake.paid(session)))
    other = body(event("checkout.session.completed", rig.fake.paid(session)))
    for sent, headers in (
        (payload, signed(payload, FORGED_SECRET)),
        (payload, signed(payload, WEBHOOK_SECRET, int(time.time()) - STALE_S)),
        (other, signed(payload, WEBHOOK_SECRET)),  # a valid signature of another body
        (payload, {"Stripe-Signature": "t=later,v1=0123"}),
        (payload, {}),
    ):
        refused(*await rig.post("/webhooks/stripe", sent, headers), "invalid_signature")
    assert await rig.entries(org) == []
    query = "SELECT count(*) FROM stripe_payments WHERE session_id = $1"
    assert await rig.pool.fetchval(query, session) == 0


async def test_an_unknown_event_type_is_acknowledged_and_changes_nothing(rig: Rig) -> None:
    org = await new_org(rig.pool)
    before = await rig.available(org)
    status, reply = await rig.deliver(
        event("customer.created", {"id": "cus_1", "object": "customer"})
    )
    assert (status, reply) == (200, {"received": True, "outcome": "ignored"})
    assert await rig.available(org) == before and await rig.entries(org) == []


async def test_a_session_the_gateway_cannot_credit_is_acknowledged(rig: Rig) -> None:
    """Stripe would retry a refusal for days, and no retry could make these valid."""
    org = await new_org(rig.pool)
    session = rig.fake.paid(await rig.bought(org, "starter"))
    stranger = str(uuid.uuid4())
    for changed in (
        {"metadata": {**session["metadata"], "package": "platinum"}},
        {"metadata": {**session["metadata"], "organization_id": stranger}},
        {
            "metadata": {**session["metadata"], "organization_id": stranger},
            "client_reference_id": stranger,
        },
    ):
        status, reply = await rig.deliver(
            event("checkout.session.completed", {**session, **changed})
        )
        assert (status, reply["outcome"]) == (200, "ignored")
    assert await rig.entries(org) == []


async def test_async_payment_credits_once_whichever_event_says_paid(rig: Rig) -> None:
    org = await new_org(rig.pool)
    before = await rig.available(org)
    session = await rig.bought(org, "popular")
    outcomes = [
        (await rig.deliver(event(kind, rig.fake.paid(session, status))))[1]["outcome"]
        for kind, status in (
            ("checkout.session.completed", "unpaid"),
            ("checkout.session.async_payment_succeeded", "paid"),
            ("checkout.session.async_payment_succeeded", "paid"),
            ("checkout.session.completed", "paid"),
        )
    ]
    assert outcomes == ["awaiting_payment", "credited", "duplicate", "duplicate"]
    [entry] = await rig.entries(org)
    assert (entry.type, entry.amount_micro) == (TransactionType.TOPUP_PURCHASE, 500 * MICRO)
    assert entry.idempotency_key == f"stripe:checkout:{session}"
    assert await rig.available(org) == before + 500 * MICRO


async def test_a_refund_before_its_payment_waits_for_it(rig: Rig) -> None:
    org = await new_org(rig.pool)
    before = await rig.available(org)
    session = await rig.bought(org, "starter")
    partial, full = rig.fake.charge(session, 250), rig.fake.charge(session, 999)
    assert (await rig.deliver(event("charge.refunded", full)))[1]["outcome"] == "pending"
    assert (await rig.deliver(event("charge.refunded", partial)))[1]["outcome"] == "pending"
    assert await rig.entries(org) == []
    paid = event("checkout.session.completed", rig.fake.paid(session))
    assert (await rig.deliver(paid))[1]["outcome"] == "credited"
    assert (await rig.deliver(paid))[1]["outcome"] == "duplicate"
    assert (await rig.deliver(event("charge.refunded", full)))[1]["outcome"] == "duplicate"
    assert sorted(e.amount_micro for e in await rig.entries(org)) == [-100 * MICRO, 100 * MICRO]
    assert await rig.available(org) == before


async def test_a_refund_of_spent_credits_draws_on_the_overdraft(rig: Rig) -> None:
    """Refunds take bonus credits, then monthly, then the overdraft: the bonus never goes
    below zero, and the entry records the shortfall in overdraft_micro."""
    org = await new_org(rig.pool, plan="free")  # 10 monthly + 10 welcome bonus, no overdraft
    session = await rig.bought(org, "starter")
    await rig.deliver(event("checkout.session.completed", rig.fake.paid(session)))
    spend = 115 * MICRO  # all 10 monthly, then 105 of the 110 bonus
    hold = await reservations.reserve(
        rig.pool, org.id, f"spend:{org.id}", minimum_micro=spend, requested_micro=spend, ttl_s=60
    )
    await reservations.settle(rig.pool, org.id, hold.id, spend)
    status, reply = await rig.deliver(event("charge.refunded", rig.fake.charge(session, 999)))
    assert (status, reply["outcome"]) == (200, "refunded")
    refund = next(e for e in await rig.entries(org) if e.type is TransactionType.REFUND)
    assert (
        refund.amount_micro,
        refund.bonus_micro,
        refund.monthly_micro,
        refund.overdraft_micro,
    ) == (-100 * MICRO, -5 * MICRO, 0, -95 * MICRO)
    balance = await balances.get_balance(rig.pool, org.id)
    assert (balance.bonus_credits_micro, balance.monthly_remaining_micro) == (0, 0)
    assert (balance.overdraft_used_micro, balance.available_micro) == (95 * MICRO, -95 * MICRO)


POPULAR_REFUNDS = (1000, 2500)  # two partial refunds of the 39.99 charge, cumulative


@dataclass(frozen=True)
class Delivery:
    payload: bytes
    secret: str = WEBHOOK_SECRET
    age_s: int = 0

    @property
    def valid(self) -> bool:
        return self.secret == WEBHOOK_SECRET and self.age_s == 0


async def storm_events(rig: Rig, org: Org) -> tuple[list[Delivery], dict[str, str]]:
    """Every event of three purchases: a starter announced by both payment events, a
    popular refunded twice in part, a power refunded in full; an event type the gateway
    ignores; and two it must refuse: a forged payment, and a stale full refund."""
    starter, popular, power = [await rig.bought(org, p) for p in ("starter", "popular", "power")]
    paid = rig.fake.paid
    valid = [
        event("checkout.session.completed", paid(starter)),
        event("checkout.session.async_payment_succeeded", paid(starter)),
        event("checkout.session.completed", paid(popular)),
        *(event("charge.refunded", rig.fake.charge(popular, c)) for c in POPULAR_REFUNDS),
        event("checkout.session.completed", paid(power)),
        event("charge.refunded", rig.fake.charge(power, 12999)),
        event("invoice.paid", {"id": "in_test_1", "object": "invoice"}),
    ]
    forged = event(
        "checkout.session.completed",
        {**paid(power), "id": "cs_test_forged", "payment_intent": "pi_forged"},
    )
    stale = event("charge.refunded", rig.fake.charge(popular, 3999))
    deliveries = [Delivery(body(e)) for e in valid]
    deliveries += [Delivery(body(forged), FORGED_SECRET), Delivery(body(stale), age_s=STALE_S)]
    return deliveries, {"starter": starter, "popular": popular, "power": power}


@settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_replay_storm_credits_once_and_ends_the_same_in_any_order(
    rig: Rig, data: st.DataObject
) -> None:
    """Each event delivered 1-5 times, forged and stale ones among them, in a drawn order, in
    drawn waves sent concurrently. pytest-asyncio runs each Hypothesis example on the
    session's event loop (as the rate-limit model test does); every example has its own
    organization and sessions, so the examples are independent."""
    org = await new_org(rig.pool)
    before = await rig.available(org)
    events, sessions = await storm_events(rig, org)
    copies = data.draw(st.lists(st.integers(1, 5), min_size=len(events), max_size=len(events)))
    sends = [e for e, n in zip(events, copies, strict=True) for _ in range(n)]
    order = data.draw(st.permutations(sends))
    cuts = sorted(data.draw(st.sets(st.integers(1, len(order) - 1), max_size=len(order) // 2)))
    replies: list[tuple[Delivery, int, dict[str, Any]]] = []
    for wave in (order[a:b] for a, b in zip([0, *cuts], [*cuts, len(order)], strict=True)):
        results = await asyncio.gather(*(rig.send(d.payload, d.secret, d.age_s) for d in wave))
        replies += [(d, status, reply) for d, (status, reply) in zip(wave, results, strict=True)]

    for delivery, status, reply in replies:
        if delivery.valid:
            assert status == 200, reply
        else:
            refused(status, reply, "invalid_signature")
    outcomes = [r["outcome"] for d, _, r in replies if d.valid]
    assert outcomes.count("credited") == 3  # one per session, whichever delivery came first
    ignored = [r["outcome"] for d, _, r in replies if b'"invoice.paid"' in d.payload]
    assert ignored and set(ignored) == {"ignored"}  # the unknown type, every time it came
    label(f"refunds before their payment: {outcomes.count('pending') > 0}")
    target(float(outcomes.count("pending")))  # steer towards refunds that come first

    popular_back = refunded_share_micro(500 * MICRO, max(POPULAR_REFUNDS), 3999)
    entries = await rig.entries(org)
    topups = sorted(
        (e.idempotency_key, e.amount_micro)
        for e in entries
        if e.type is TransactionType.TOPUP_PURCHASE
    )
    assert topups == sorted(
        [
            (f"stripe:checkout:{sessions[p]}", n * MICRO)
            for p, n in (("starter", 100), ("popular", 500), ("power", 2000))
        ]
    )
    refunds = -sum(e.amount_micro for e in entries if e.type is TransactionType.REFUND)
    assert refunds == popular_back + 2000 * MICRO
    assert await rig.available(org) == before + 600 * MICRO - popular_back
