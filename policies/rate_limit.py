"""Plan request limits (rpm, rpd) per organization × capability, enforced in Redis by one
Lua script per request: an exact sliding-window log, so no sliding minute or day ever holds
more than the limit (a fixed window lets twice the limit through at its boundary).

Every Redis key and TTL of the gateway is named here:
    {prefix}rl:{<organization>:<capability>}:m   sorted set, the last minute's requests
    {prefix}rl:{<organization>:<capability>}:d   sorted set, the last day's requests
Scores are request times in ms, members the request ids. The hash tag `{...}` puts both keys
of one limit in one Redis Cluster slot; each key expires one window after its last request,
so idle limits vanish.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from policies.errors import RateLimitExceeded

MINUTE_MS = 60_000
DAY_MS = 86_400_000

Clock = Callable[[], int]  # milliseconds; tests pass a fake one


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


# KEYS: minute log, day log. ARGV: now_ms, member, rpm, rpd (0: unlimited).
# Returns {1, limit, remaining, reset_ms} for the tighter window when admitted (and logs the
# request in both), or {0, window_index, limit, retry_after_ms} when refused (logging nothing).
_SCRIPT = """
local now = tonumber(ARGV[1])
local windows = {60000, 86400000}
local limits = {tonumber(ARGV[3]), tonumber(ARGV[4])}
local counts = {0, 0}
local refused, wait = 0, -1
for i = 1, 2 do
  if limits[i] > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - windows[i])
    counts[i] = redis.call('ZCARD', KEYS[i])
    if counts[i] >= limits[i] then
      -- a request passes once enough of the oldest leave: wait for the slowest full window
      local nth = redis.call('ZRANGE', KEYS[i], counts[i] - limits[i], counts[i] - limits[i],
                             'WITHSCORES')
      local w = tonumber(nth[2]) + windows[i] - now
      if w > wait then
        refused, wait = i, w
      end
    end
  end
end
if refused > 0 then
  return {0, refused, limits[refused], wait}
end
local best = {-1, 0, 0}
for i = 1, 2 do
  if limits[i] > 0 then
    redis.call('ZADD', KEYS[i], now, ARGV[2])
    redis.call('PEXPIRE', KEYS[i], windows[i])
    local remaining = limits[i] - counts[i] - 1
    if best[1] < 0 or remaining < best[2] then
      local oldest = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
      best = {limits[i], remaining, tonumber(oldest[2]) + windows[i] - now}
    end
  end
end
return {1, best[1], best[2], best[3]}
"""

_WINDOWS = {1: "minute", 2: "day"}


@dataclass(frozen=True)
class Admission:
    """An admitted request: the window with the fewest requests left (None: unlimited)."""

    member: str
    limit: int | None = None
    remaining: int | None = None
    reset_ms: int | None = None


def keys(prefix: str, organization_id: uuid.UUID, capability: str) -> list[str]:
    tag = f"{{{organization_id}:{capability}}}"
    return [f"{prefix}rl:{tag}:m", f"{prefix}rl:{tag}:d"]


class SlidingWindowLimiter:
    def __init__(self, redis: Redis, *, prefix: str, clock: Clock = wall_clock_ms) -> None:
        self._redis = redis
        self._prefix = prefix
        self._clock = clock
        self._script: Any = redis.register_script(_SCRIPT)

    async def admit(
        self, organization_id: uuid.UUID, capability: str, *, rpm: int | None, rpd: int | None
    ) -> Admission:
        """Log one request, or raise RateLimitExceeded (logging nothing) if a window is full."""
        if rpm is None and rpd is None:
            return Admission("")  # nothing logged, nothing to give back
        member = uuid.uuid4().hex
        result = await self._script(
            keys=keys(self._prefix, organization_id, capability),
            args=[self._clock(), member, rpm or 0, rpd or 0],
        )
        ok, a, b, c = (int(x) for x in result)
        if not ok:
            window = _WINDOWS[a]
            raise RateLimitExceeded(
                f"Rate limit of {b} requests per {window} reached for {capability}.",
                window=window,
                limit=b,
                retry_after_ms=c,
            )
        return Admission(member, a, b, c)

    async def give_back(self, organization_id: uuid.UUID, capability: str, member: str) -> None:
        """Remove a logged request again (it was refused later, before reaching an upstream)."""
        minute, day = keys(self._prefix, organization_id, capability)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zrem(minute, member)
            pipe.zrem(day, member)
            await pipe.execute()
