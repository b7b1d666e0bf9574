"""The rate-limit step of the pipeline (SPEC §6). Until the Redis limiter lands this admits
every request and reports no limits; the pipeline already calls it at the right place."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.auth import Principal
from policies.access import Route


@dataclass(frozen=True)
class Decision:
    """What the limiter decided for one request: the window with the fewest requests left."""

    limit: int | None = None
    remaining: int | None = None
    reset_ms: int | None = None


class RateLimiter:
    """Consumes one unit per request that reaches an upstream (fallbacks included)."""

    async def consume(self, principal: Principal, route: Route) -> Decision:
        return Decision()

    async def refund(self, principal: Principal, route: Route, decision: Decision) -> None:
        """Give a unit back for a request refused after consuming (e.g. for credits)."""
        return None
