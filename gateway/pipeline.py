"""The steps every metered call takes, written once for chat, embeddings and streaming:
authenticate → resolve and authorise → rate-limit → reserve → forward → settle or release."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from aiohttp import web

from gateway import auth, jsonio, ratelimit
from gateway.errors import InvalidRequest
from gateway.services import Services
from gateway.upstream.base import Target, Usage
from ledger.reservations import (
    ChargeSnapshot,
    HoldRequest,
    Reservation,
    Settlement,
    SettleRequest,
)
from policies import access, tokens
from policies.catalog import ModelMode, credits_to_micro
from policies.pricing import Rate, affordable_output_tokens, charge_micro

MIN_OUTPUT_TOKENS = 16  # a hold must afford at least this much output, or the call is refused


class Endpoint(StrEnum):
    CHAT = "chat"
    EMBEDDINGS = "embeddings"


@dataclass(frozen=True)
class Attempt:
    """One model to try, with the output limit its price allows within the hold."""

    target: Target
    rate: Rate
    output_limit: int | None  # None: nothing to limit (embeddings)


@dataclass
class Call:
    """A metered call in flight."""

    request_id: str
    principal: auth.Principal
    endpoint: Endpoint
    body: dict[str, Any]
    route: access.Route
    prompt_tokens: int
    client_limit: int | None  # max_completion_tokens / max_tokens as the client sent it
    choices: int
    reservation: Reservation
    rate_limit: ratelimit.Decision
    upstream_headers: dict[str, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)  # the request's log line
    started: float = field(default_factory=time.perf_counter)
    upstream_s: float = 0.0

    @property
    def streaming(self) -> bool:
        return bool(self.body.get("stream"))


async def read_json(request: web.Request) -> dict[str, Any]:
    try:
        body = jsonio.loads_request(await request.read())
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return body


def client_limit(body: dict[str, Any]) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidRequest(f"{name} must be a positive integer.", param=name)
        return value
    return None


def choices(body: dict[str, Any]) -> int:
    n = body.get("n", 1)
    if n is None:
        return 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 128:
        raise InvalidRequest("n must be an integer from 1 to 128.", param="n")
    return n


def count_prompt(endpoint: Endpoint, body: dict[str, Any]) -> int:
    if endpoint is Endpoint.EMBEDDINGS:
        if "input" not in body or not body["input"]:
            raise InvalidRequest("input is required.", param="input")
        return tokens.count_embedding_input_tokens(body["input"])
    messages = body.get("messages")
    if (
        not isinstance(messages, list)
        or not messages
        or not all(isinstance(m, dict) for m in messages)
    ):
        raise InvalidRequest(
            "messages must be a non-empty list of message objects.", param="messages"
        )
    if "stream" in body and not isinstance(body["stream"], bool):
        raise InvalidRequest("stream must be a boolean.", param="stream")
    return tokens.count_chat_prompt_tokens(messages, body.get("tools"))


def resolve_route(
    services: Services, request: web.Request, endpoint: Endpoint, plan: str, model: Any
) -> access.Route:
    config = services.config
    default_capability = config.defaults.capability
    if endpoint is Endpoint.EMBEDDINGS and config.defaults.embedding_capability:
        default_capability = config.defaults.embedding_capability
    if model is not None and not isinstance(model, str):
        raise InvalidRequest("model must be a string.", param="model")
    mode = ModelMode.EMBEDDING if endpoint is Endpoint.EMBEDDINGS else ModelMode.CHAT
    route = access.resolve(
        config,
        plan=plan,
        capability=request.headers.get("X-Capability", default_capability),
        quality=request.headers.get("X-Quality-Level", config.defaults.quality),
        model=model,
        mode=mode,
        now=datetime.now(UTC),
    )
    if not route.models:
        raise InvalidRequest(
            f"The {route.capability} capability has no {mode.value} models at {route.quality}."
        )
    return route


def rate_for(services: Services, model: str, quality: str) -> Rate:
    return services.rates[(model, quality)]


def _output_cap(
    services: Services, route: access.Route, model: str, client_limit: int | None
) -> int:
    """The most output a call may ask of `model`: the client's limit, else the plan's or
    capability's cap, else the model's maximum; never above the model's maximum."""
    spec = services.config.models[model]
    model_max = spec.max_output_tokens or spec.context_window
    wanted = client_limit or route.max_output_tokens or model_max
    return min(wanted, model_max)


def hold_bounds(
    services: Services, route: access.Route, prompt: int, client_limit: int | None, choices: int
) -> tuple[int, int]:
    """(minimum, requested) micro-credits to hold: the worst case over every candidate
    model; the minimum is the first model's worst case when the client set the limit,
    else enough for the first model to write MIN_OUTPUT_TOKENS."""
    worst = []
    for model in route.models:
        rate = rate_for(services, model, route.quality)
        cap = _output_cap(services, route, model, client_limit)
        worst.append(charge_micro(rate, prompt, cap * choices))
    first = rate_for(services, route.models[0], route.quality)
    if client_limit is not None:
        minimum = worst[0]
    else:
        floor_tokens = min(MIN_OUTPUT_TOKENS, _output_cap(services, route, route.models[0], None))
        minimum = charge_micro(first, prompt, floor_tokens * choices)
    return max(minimum, 1), max(max(worst), minimum, 1)


def attempts(services: Services, call: Call) -> Iterator[Attempt]:
    """The candidates in priority order, each with the output limit the hold affords;
    a model whose price the hold cannot cover is skipped."""
    for model in call.route.models:
        rate = rate_for(services, model, call.route.quality)
        target = services.targets[model]
        if call.endpoint is Endpoint.EMBEDDINGS or rate.output_micro_per_token == 0:
            if charge_micro(rate, call.prompt_tokens, 0) <= call.reservation.amount_micro:
                yield Attempt(target, rate, None)
            continue
        cap = _output_cap(services, call.route, model, call.client_limit)
        affordable = affordable_output_tokens(
            rate, call.prompt_tokens, call.reservation.amount_micro
        )
        per_choice = cap if affordable is None else min(cap, affordable // call.choices)
        if call.client_limit is not None and per_choice < call.client_limit:
            continue  # the client's own limit does not fit the hold at this price
        if per_choice >= 1:
            yield Attempt(target, rate, per_choice)


def upstream_body(call: Call, attempt: Attempt) -> dict[str, Any]:
    """The client's request as the upstream gets it: the output limit set by the gateway."""
    body = dict(call.body)
    body.pop("model", None)
    if attempt.output_limit is not None:
        key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        body[key] = attempt.output_limit
    return body


async def reserve(
    services: Services,
    principal: auth.Principal,
    route: access.Route,
    bounds: tuple[int, int],
    request_id: str,
) -> Reservation:
    """The hold for one call, keyed by its request id (all its attempts share it)."""
    minimum, requested = bounds
    request = HoldRequest(
        principal.organization_id,
        request_id,
        minimum_micro=minimum,
        requested_micro=requested,
        ttl_s=services.config.credits.reservation_ttl_s,
        capability=route.capability,
        quality=route.quality,
        model=route.models[0],
        request_id=request_id,
    )
    with services.poller.waiting():
        return await services.ledger.reserve(request)


async def settle(services: Services, call: Call, attempt: Attempt, usage: Usage) -> Settlement:
    """Charge the call from the usage reported (or counted), with the answering model's
    prices; a cancelled handler still settles (the batch goes ahead without it)."""
    estimate = services.config.capabilities[call.route.capability].estimated_credits.get(
        call.route.quality
    )
    snapshot = ChargeSnapshot(
        model=attempt.target.model,
        provider=attempt.target.provider,
        input_usd_per_mtok=attempt.rate.input_usd_per_mtok,
        output_usd_per_mtok=attempt.rate.output_usd_per_mtok,
        credit_multiplier=attempt.rate.multiplier,
        credits_per_usd=attempt.rate.per_usd,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        estimated_micro=None if estimate is None else credits_to_micro(estimate),
    )
    charge = charge_micro(attempt.rate, usage.prompt_tokens, usage.completion_tokens)
    request = SettleRequest(call.principal.organization_id, call.reservation.id, charge, snapshot)
    with services.poller.waiting():
        return await services.ledger.settle(request)


async def release(services: Services, call: Call, reason: str) -> None:
    """Give the hold back; a cancelled handler still releases, and shutdown waits for it
    before the pool closes."""
    await services.ledger.release(call.principal.organization_id, call.reservation.id, reason)


def new_request_id() -> str:
    return f"req_{os.urandom(16).hex()}"  # as random as uuid4, a third of its cost
