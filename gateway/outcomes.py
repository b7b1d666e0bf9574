"""What happens after an upstream attempt: failures noted, the call settled and counted,
and the response headers every proxied call carries."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from gateway import pipeline
from gateway.errors import GatewayError, InvalidRequest, UpstreamFailed
from gateway.pipeline import Attempt, Call
from gateway.services import Services
from gateway.upstream.base import Completion, UpstreamError
from ledger.errors import LedgerUnavailable
from ledger.reservations import Settlement
from policies.pricing import credits_text

log = logging.getLogger(__name__)
T = TypeVar("T")

SETTLE_ATTEMPTS = 3  # a settlement that fails for a blip in PostgreSQL is retried


async def first_answer(
    services: Services, call: Call, start: Callable[[Attempt], Awaitable[T]]
) -> tuple[T, Attempt]:
    """Try the candidates in order until one answers; all share one hold and request id.
    `start` returns once the attempt has produced its first byte: later failures are the
    caller's, and no longer fall back."""
    failures: list[UpstreamError] = []
    for number, attempt in enumerate(pipeline.attempts(services, call)):
        if number:
            services.metrics.fallbacks.inc()
        started = time.perf_counter()
        try:
            with services.upstream_poller.waiting():
                result = await start(attempt)
        except UpstreamError as exc:
            note_failure(services, call, attempt, exc, started)
            if not exc.retryable:
                raise InvalidRequest(f"The upstream refused the request: {exc}") from None
            failures.append(exc)
            continue
        note_upstream(services, call, attempt, started)
        return result, attempt
    raise all_failed(failures)


def all_failed(failures: list[UpstreamError]) -> UpstreamFailed:
    if not failures:
        return UpstreamFailed("No allowed model is affordable within the credits held.")
    timeout = all(f.kind == "timeout" for f in failures)
    # kinds and statuses only: a provider's own error text stays in the logs
    summary = ", ".join(f.kind if f.status is None else f"{f.kind} {f.status}" for f in failures)
    return UpstreamFailed(f"Every allowed model failed ({summary}).", timeout=timeout)


def note_upstream(services: Services, call: Call, attempt: Attempt, started: float) -> None:
    elapsed = time.perf_counter() - started
    call.upstream_s += elapsed
    services.metrics.upstream_duration.labels(
        attempt.target.provider, attempt.target.model
    ).observe(elapsed)


def note_failure(
    services: Services, call: Call, attempt: Attempt, exc: UpstreamError, started: float
) -> None:
    note_upstream(services, call, attempt, started)
    services.metrics.upstream_errors.labels(
        attempt.target.provider, attempt.target.model, exc.kind
    ).inc()
    log.warning("upstream %s failed for %s: %s", attempt.target.model, call.request_id, exc)


async def settle_with_retry(
    services: Services, call: Call, attempt: Attempt, completion: Completion
) -> Settlement:
    for remaining in reversed(range(SETTLE_ATTEMPTS)):
        try:
            settlement = await pipeline.settle(services, call, attempt, completion.usage)
            break
        except LedgerUnavailable:  # retried, then re-raised: a charge must not be lost
            if not remaining:
                log.exception("could not settle %s", call.reservation.id)
                raise
            await asyncio.sleep(0.1)
    services.metrics.reservations.labels("settled").inc()
    note_charge(services, call, attempt, completion, settlement)
    try:
        await services.notifier.after_charge(
            services.pool, call.principal.organization_id, settlement
        )
    except LedgerUnavailable:  # the charge stands; the notification waits for the next call
        log.warning("could not record a low-balance notification for %s", call.request_id)
    return settlement


def note_charge(
    services: Services, call: Call, attempt: Attempt, completion: Completion, settlement: Settlement
) -> None:
    route, model = call.route, attempt.target.model
    services.metrics.tokens.labels(route.capability, model, "prompt").inc(
        completion.usage.prompt_tokens
    )
    services.metrics.tokens.labels(route.capability, model, "completion").inc(
        completion.usage.completion_tokens
    )
    services.metrics.credits_consumed.labels(route.capability, route.quality, route.plan).inc(
        (settlement.charged_micro or 0) / 1_000_000
    )
    call.details.update(
        prompt_tokens=completion.usage.prompt_tokens,
        completion_tokens=completion.usage.completion_tokens,
        credits_used=credits_text(settlement.charged_micro or 0),
        reservation="settled" if settlement.applied else f"already {settlement.status.value}",
    )


def observe(services: Services, call: Call, attempt: Attempt | None, status: str) -> None:
    total = time.perf_counter() - call.started
    model = attempt.target.model if attempt else "none"
    overhead = max(total - call.upstream_s, 0.0)
    services.metrics.requests.labels(call.route.capability, call.route.quality, model, status).inc()
    services.metrics.request_duration.labels(call.endpoint.value).observe(total)
    services.metrics.overhead_duration.labels(call.endpoint.value).observe(overhead)
    call.details.update(
        model=model,
        outcome=status,
        overhead_ms=round(overhead * 1000, 3),
        upstream_ms=round(call.upstream_s * 1000, 3),
    )


async def released(services: Services, call: Call, exc: BaseException) -> None:
    """No model answered (or the handler was cancelled first): give the hold back."""
    await pipeline.release(services, call, type(exc).__name__)
    services.metrics.reservations.labels("released").inc()
    call.details["reservation"] = "released"
    status = exc.code if isinstance(exc, GatewayError) else "cancelled"
    observe(services, call, None, status)


def response_headers(call: Call, attempt: Attempt) -> dict[str, str]:
    headers = {
        "X-Request-Id": call.request_id,
        "X-Gateway-Model": attempt.target.model,
        "X-Credits-Reserved": credits_text(call.reservation.amount_micro),
    }
    decision = call.rate_limit
    if decision.limit is not None:
        headers["x-ratelimit-limit-requests"] = str(decision.limit)
        headers["x-ratelimit-remaining-requests"] = str(decision.remaining)
        headers["x-ratelimit-reset-requests"] = openai_duration(decision.reset_ms or 0)
    return headers


def openai_duration(ms: int) -> str:
    """OpenAI's duration format: 1m30s, 450ms, 6s, 1h2m."""
    if ms < 1000:
        return f"{ms}ms"
    seconds = -(-ms // 1000)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [
        f"{hours}h" if hours else "",
        f"{minutes}m" if minutes else "",
        f"{secs}s" if secs else "",
    ]
    return "".join(parts)
