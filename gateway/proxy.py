"""Running a metered call: admit it through the pipeline, call the upstream with fallbacks,
answer (whole or streamed), and settle or release whatever happens."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from aiohttp import web

from gateway import jsonio, outcomes, pipeline, streaming
from gateway.auth import Principal, authenticate
from gateway.errors import DuplicateRequest, IdempotencyKeyReused, InvalidRequest
from gateway.logs import CALL_DETAILS
from gateway.pipeline import Attempt, Call, Endpoint
from gateway.resources import SERVICES
from gateway.services import Services
from gateway.upstream.base import Completion
from ledger import idempotency
from ledger.errors import InsufficientCredits, LedgerError
from policies.errors import AccessDenied
from policies.pricing import credits_text

log = logging.getLogger(__name__)

MAX_KEY_LENGTH = 255


async def run(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    """The whole of a proxied call; chat, embeddings and streaming all come through here."""
    services = request.app[SERVICES]
    request_id = pipeline.new_request_id()
    details = request[CALL_DETAILS] = {"request_id": request_id}
    principal = await authenticate(request, services.keys, services.pool)
    details["organization_id"] = str(principal.organization_id)
    raw = await request.read()
    body = await pipeline.read_json(request)
    key = _idempotency_key(request)
    if key is not None:
        replay = await _claim(services, request, principal.organization_id, key, raw)
        if replay is not None:
            return replay
    try:
        response = await _metered(request, services, endpoint, details, principal, body)
    except BaseException:
        if key is not None:
            await asyncio.shield(idempotency.give_up(services.pool, principal.organization_id, key))
        raise
    if key is not None:
        await _remember(services, principal.organization_id, key, response)
    return response


async def _metered(
    request: web.Request,
    services: Services,
    endpoint: Endpoint,
    details: dict[str, Any],
    principal: Principal,
    body: dict[str, Any],
) -> web.StreamResponse:
    request_id = details["request_id"]
    try:
        route = pipeline.resolve_route(
            services, request, endpoint, principal.plan, body.get("model")
        )
    except AccessDenied as exc:
        services.metrics.access_denied.labels(exc.reason).inc()
        raise
    prompt = pipeline.count_prompt(endpoint, body)
    client_limit = pipeline.client_limit(body)
    choices = pipeline.choices(body)
    bounds = pipeline.hold_bounds(services, route, prompt, client_limit, choices)
    decision = await services.limiter.consume(principal, route)
    try:
        reservation = await pipeline.reserve(services, principal, route, bounds, request_id)
    except LedgerError as exc:  # refused before any upstream call: the unit goes back
        if isinstance(exc, InsufficientCredits):
            services.metrics.reservations.labels("rejected").inc()
        await services.limiter.refund(principal, route, decision)
        raise
    services.metrics.reservations.labels("reserved").inc()
    call = Call(
        request_id,
        principal,
        endpoint,
        body,
        route,
        prompt,
        client_limit,
        choices,
        reservation,
        decision,
        _upstream_headers(services, request),
        details,
    )
    details.update(capability=route.capability, quality=route.quality)
    if call.streaming:
        capture = request.headers.get("Idempotency-Key") is not None
        return await streaming.stream(request, services, call, capture=capture)
    return await _complete(services, call)


async def _complete(services: Services, call: Call) -> web.Response:
    try:
        completion, attempt = await forward(services, call)
    except BaseException as exc:
        await outcomes.released(services, call, exc)
        raise
    settlement = await outcomes.settle_with_retry(services, call, attempt, completion)
    headers = outcomes.response_headers(call, attempt)
    headers["X-Credits-Used"] = credits_text(settlement.charged_micro or 0)
    headers["X-Balance-Remaining"] = credits_text(settlement.available_micro)
    outcomes.observe(services, call, attempt, "200")
    body = completion.raw if completion.raw is not None else jsonio.dumps(completion.body)
    return web.Response(body=body, headers=headers, content_type="application/json")


async def forward(services: Services, call: Call) -> tuple[Completion, Attempt]:
    """The first candidate's whole answer, falling back on failure."""

    async def start(attempt: Attempt) -> Completion:
        client = services.clients[attempt.target.kind]
        body = pipeline.upstream_body(call, attempt)
        if call.endpoint is Endpoint.EMBEDDINGS:
            return await client.embeddings(attempt.target, body, call.upstream_headers)
        return await client.chat(attempt.target, body, call.upstream_headers)

    return await outcomes.first_answer(services, call, start)


def _upstream_headers(services: Services, request: web.Request) -> dict[str, str]:
    """Headers passed on upstream: only the sandbox's test controls, in sandbox mode."""
    if not services.sandbox:
        return {}
    return {
        name: value
        for name, value in request.headers.items()
        if name.lower().startswith("x-sandbox-")
    }


def _idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_KEY_LENGTH:
        raise InvalidRequest("Idempotency-Key must be 1 to 255 characters.")
    return key


async def _claim(
    services: Services, request: web.Request, organization_id: uuid.UUID, key: str, raw: bytes
) -> web.Response | None:
    digest = idempotency.request_hash(request.method, request.path, raw)
    claim = await idempotency.claim(
        services.pool, organization_id, key, digest, services.config.credits.reservation_ttl_s
    )
    if claim.state is idempotency.ClaimState.MISMATCH:
        raise IdempotencyKeyReused("This Idempotency-Key was used with a different request.")
    if claim.state is idempotency.ClaimState.IN_FLIGHT:
        raise DuplicateRequest("A request with this Idempotency-Key is still in flight.")
    if claim.state is idempotency.ClaimState.DONE and claim.response is not None:
        stored = claim.response
        return web.Response(
            status=stored.status,
            body=stored.body,
            headers={**stored.headers, "Idempotent-Replayed": "true"},
        )
    return None


async def _remember(
    services: Services, organization_id: uuid.UUID, key: str, response: web.StreamResponse
) -> None:
    body = streaming.captured_body(response)
    headers = {
        k: v for k, v in response.headers.items() if k.lower().startswith(("x-", "content-type"))
    }
    stored = idempotency.StoredResponse(response.status, headers, body)
    await asyncio.shield(idempotency.complete(services.pool, organization_id, key, stored))
