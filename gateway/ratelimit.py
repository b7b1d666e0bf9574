"""The rate-limit step of the pipeline (SPEC §6): the plan's rpm and rpd per organization ×
capability, in Redis, shared by every instance. One unit per request that passes
authentication and the access policy; fallbacks are the same request. The unit is taken
before the credit hold and given back if the hold is refused, so a 402 costs no quota.

When Redis fails at run time, `rate_limits.on_redis_error` decides: fail_open serves the
request unlimited (credits are still enforced by PostgreSQL), logs at most once per
ERROR_LOG_INTERVAL_S and counts gateway_rate_limit_errors_total; fail_closed answers 503.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from redis.exceptions import RedisError

from gateway.auth import Principal
from gateway.config import Config, RedisErrorPolicy
from gateway.errors import RateLimiterUnavailable
from gateway.metrics import Metrics
from gateway.polling import Poller
from policies.access import Route
from policies.errors import RateLimitExceeded
from policies.rate_limit import SlidingWindowLimiter

log = logging.getLogger(__name__)

ERROR_LOG_INTERVAL_S = 30.0  # a Redis outage is logged once per interval, not per request


@dataclass(frozen=True)
class Decision:
    """What the limiter decided for one request: the window with the fewest requests left."""

    limit: int | None = None
    remaining: int | None = None
    reset_ms: int | None = None
    member: str | None = None  # the logged request, to give back


class RateLimiter:
    def __init__(
        self, limiter: SlidingWindowLimiter, config: Config, metrics: Metrics, poller: Poller
    ) -> None:
        self._limiter = limiter
        self._poller = poller
        self._config = config
        self._metrics = metrics
        self._last_error_log = 0.0

    async def consume(self, principal: Principal, route: Route) -> Decision:
        plan_cap = self._config.plans[route.plan].capabilities[route.capability]
        if plan_cap.rpm is None and plan_cap.rpd is None:
            return Decision()  # no limit: nothing to count, no round trip
        try:
            with self._poller.waiting():
                admission = await self._limiter.admit(
                    principal.organization_id, route.capability, rpm=plan_cap.rpm, rpd=plan_cap.rpd
                )
        except RateLimitExceeded as exc:
            self._metrics.rate_limited.labels(route.capability, exc.window).inc()
            raise
        except (RedisError, OSError) as exc:
            self._redis_failed(exc)
            return Decision()
        return Decision(admission.limit, admission.remaining, admission.reset_ms, admission.member)

    async def refund(self, principal: Principal, route: Route, decision: Decision) -> None:
        """Give the unit back: the request was refused before reaching an upstream."""
        if decision.member is None or decision.limit is None:
            return
        try:
            await self._limiter.give_back(
                principal.organization_id, route.capability, decision.member
            )
        except (RedisError, OSError) as exc:
            self._redis_failed(exc, refusing=False)

    def _redis_failed(self, exc: Exception, *, refusing: bool = True) -> None:
        self._metrics.rate_limit_errors.inc()
        now = time.monotonic()
        if now - self._last_error_log >= ERROR_LOG_INTERVAL_S:
            self._last_error_log = now
            log.error(
                "rate limiter: Redis unavailable (%s); policy %s",
                type(exc).__name__,
                self._config.rate_limits.on_redis_error.value,
            )
        if refusing and self._config.rate_limits.on_redis_error is RedisErrorPolicy.FAIL_CLOSED:
            raise RateLimiterUnavailable(
                "The rate limiter is unavailable; try again shortly."
            ) from None
