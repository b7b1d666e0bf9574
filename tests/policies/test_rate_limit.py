"""The sliding-window limiter (SPEC §6) on a real Redis, against a pure-Python reference log:
a request is admitted iff each limited window (now − window, now] holds fewer than its limit
of admitted requests. Time is a fake clock; no test waits for a window."""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field

from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from policies.errors import RateLimitExceeded
from policies.rate_limit import DAY_MS, MINUTE_MS, Admission, SlidingWindowLimiter, keys

START_MS = 1_700_000_000_000
CAPABILITY = "question_generation"
ORG = uuid.UUID("00000000-0000-4000-8000-000000000001")  # each test has its own prefix


class FakeClock:
    def __init__(self, now: int = START_MS) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def limiter(redis: Redis, redis_prefix: str) -> tuple[SlidingWindowLimiter, FakeClock, str]:
    """A limiter of its own: a fresh prefix under this run's, and a fake clock."""
    prefix = f"{redis_prefix}rl-test:{uuid.uuid4().hex[:12]}:"
    clock = FakeClock()
    return SlidingWindowLimiter(redis, prefix=prefix, clock=clock), clock, prefix


# ---------------------------------------------------------------- the reference model


@dataclass(frozen=True)
class Refusal:
    windows: frozenset[str]  # the windows that need the longest wait (the one reported)
    limits: dict[str, int]
    retry_after_ms: int


@dataclass
class Model:
    """A sliding-window log: the admitted requests still logged, by member."""

    rpm: int | None
    rpd: int | None
    log: dict[str, int] = field(default_factory=dict)

    def windows(self) -> list[tuple[str, int, int]]:
        spans = [("minute", MINUTE_MS, self.rpm), ("day", DAY_MS, self.rpd)]
        return [(name, span, limit) for name, span, limit in spans if limit is not None]

    def inside(self, now: int, span: int) -> list[int]:
        return sorted(t for t in self.log.values() if now - span < t <= now)

    def refusal(self, now: int) -> Refusal | None:
        """None if a request at `now` passes; else the smallest wait after which it would."""
        waits: dict[str, int] = {}
        limits: dict[str, int] = {}
        for name, span, limit in self.windows():
            times = self.inside(now, span)
            if len(times) >= limit:  # it passes once all but limit − 1 of them have left
                waits[name], limits[name] = times[len(times) - limit] + span - now, limit
        if not waits:
            return None
        longest = max(waits.values())
        return Refusal(frozenset(w for w, ms in waits.items() if ms == longest), limits, longest)

    def admitted(self, now: int) -> set[tuple[int | None, int | None, int | None]]:
        """After logging a request at `now`: (limit, remaining, reset_ms) of each window with
        the fewest requests left; reset_ms is when its oldest logged request leaves it."""
        options = []
        for _, span, limit in self.windows():
            times = self.inside(now, span)
            options.append((limit, limit - len(times), times[0] + span - now))
        if not options:
            return {(None, None, None)}
        fewest = min(remaining for _, remaining, _ in options)
        return {option for option in options if option[1] == fewest}

    def check(self, now: int, outcome: Admission | RateLimitExceeded) -> None:
        expected = self.refusal(now)
        if expected is None:
            assert isinstance(outcome, Admission), f"refused, the model admits: {outcome}"
            self.log[outcome.member] = now
            got = (outcome.limit, outcome.remaining, outcome.reset_ms)
            assert got in self.admitted(now), (got, self.admitted(now))
            return
        assert isinstance(outcome, RateLimitExceeded), f"admitted, the model refuses: {expected}"
        event(f"refused: {' and '.join(sorted(expected.limits))} full")
        assert outcome.retry_after_ms == expected.retry_after_ms, (outcome.window, expected)
        assert outcome.window in expected.windows, (outcome.window, expected)
        assert outcome.limit == expected.limits[outcome.window]


async def attempt(
    lim: SlidingWindowLimiter, rpm: int | None, rpd: int | None
) -> Admission | RateLimitExceeded:
    try:
        return await lim.admit(ORG, CAPABILITY, rpm=rpm, rpd=rpd)
    except RateLimitExceeded as exc:
        return exc


# ---------------------------------------------------------------- the property

ADVANCES = st.one_of(  # mostly bursts, then the windows' edges, then anything up to a day
    st.integers(0, 3),
    st.integers(0, 3),
    st.sampled_from([MINUTE_MS - 1, MINUTE_MS, MINUTE_MS + 1, DAY_MS - 1, DAY_MS, DAY_MS + 1]),
    st.integers(0, 2 * MINUTE_MS),
    st.integers(0, DAY_MS + MINUTE_MS),
)
ADMIT = st.just(("admit", 0))
ACTIONS = st.one_of(
    ADMIT,
    ADMIT,
    ADMIT,
    st.tuples(st.just("give_back"), st.integers(0, 30)),
    st.just(("wait_out", 0)),  # right after a refusal: its retry-after minus 1 ms, then 1 ms
)
STEPS = st.lists(st.tuples(ADVANCES, ACTIONS), min_size=4, max_size=40)
LIMITS = st.one_of(st.none(), st.integers(1, 4)), st.one_of(st.none(), st.integers(1, 6))


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(rpm=LIMITS[0], rpd=LIMITS[1], steps=STEPS)
@example(rpm=1, rpd=1, steps=[(0, ("admit", 0)), (0, ("admit", 0)), (0, ("wait_out", 0))])
async def test_limiter_matches_a_sliding_window_log(
    redis: Redis,
    redis_prefix: str,
    rpm: int | None,
    rpd: int | None,
    steps: list[tuple[int, tuple[str, int]]],
) -> None:
    lim, clock, _ = limiter(redis, redis_prefix)
    model = Model(rpm, rpd)
    refused: RateLimitExceeded | None = None
    for advance, (action, index) in steps:
        if action == "wait_out" and refused is not None:  # right after that refusal
            clock.now += refused.retry_after_ms - 1
            early = await attempt(lim, rpm, rpd)
            model.check(clock.now, early)
            assert isinstance(early, RateLimitExceeded), "admitted before its retry-after"
            clock.now += 1
            on_time = await attempt(lim, rpm, rpd)
            model.check(clock.now, on_time)
            assert isinstance(on_time, Admission), "still refused after its retry-after"
            event("waited out a refusal")
        elif action == "give_back" and model.log:
            clock.now += advance
            member = sorted(model.log)[index % len(model.log)]
            await lim.give_back(ORG, CAPABILITY, member)
            del model.log[member]
            event("given back")
        else:
            clock.now += advance
            outcome = await attempt(lim, rpm, rpd)
            model.check(clock.now, outcome)
            refused = outcome if isinstance(outcome, RateLimitExceeded) else None
            continue
        refused = None


# ---------------------------------------------------------------- window boundaries


async def test_no_sliding_minute_ever_holds_more_than_rpm(redis: Redis, redis_prefix: str) -> None:
    lim, clock, _ = limiter(redis, redis_prefix)
    rng = random.Random(20240601)
    admitted: list[int] = []
    refused: list[int] = []
    for _ in range(400):  # bursts, gaps around the window's length, and long idles
        clock.now += rng.choice([0, 1, rng.randint(0, 3_000), rng.randint(55_000, 65_000)])
        outcome = await attempt(lim, 5, None)
        (admitted if isinstance(outcome, Admission) else refused).append(clock.now)
    assert admitted and refused
    for t in admitted:
        assert sum(t - MINUTE_MS < u <= t for u in admitted) <= 5, t
    for t in refused:  # refused only when the minute really was full
        assert sum(t - MINUTE_MS < u <= t for u in admitted) == 5, t


async def test_rpd_is_independent_of_rpm(redis: Redis, redis_prefix: str) -> None:
    lim, clock, _ = limiter(redis, redis_prefix)
    first = clock.now
    for hour in range(3):
        clock.now = first + hour * 3_600_000
        assert isinstance(await attempt(lim, None, 3), Admission)
    clock.now = first + 23 * 3_600_000
    fourth = await attempt(lim, None, 3)
    assert isinstance(fourth, RateLimitExceeded)
    assert (fourth.window, fourth.limit) == ("day", 3)
    assert fourth.retry_after_ms == first + DAY_MS - clock.now
    clock.now = first + DAY_MS - 1
    assert isinstance(await attempt(lim, None, 3), RateLimitExceeded)
    clock.now = first + DAY_MS  # the first request has left the day
    again = await attempt(lim, None, 3)
    assert isinstance(again, Admission)
    assert (again.limit, again.remaining) == (3, 0)


async def test_retry_after_waits_for_every_full_window(redis: Redis, redis_prefix: str) -> None:
    lim, clock, _ = limiter(redis, redis_prefix)
    first = clock.now
    assert isinstance(await attempt(lim, 2, 3), Admission)
    clock.now += MINUTE_MS + 1
    for _ in range(2):  # now the minute holds 2 of 2 and the day 3 of 3
        assert isinstance(await attempt(lim, 2, 3), Admission)
    refused = await attempt(lim, 2, 3)
    assert isinstance(refused, RateLimitExceeded)
    # the minute has room again in a minute, the day only once the first request leaves it
    assert (refused.window, refused.limit) == ("day", 3)
    assert refused.retry_after_ms == first + DAY_MS - clock.now
    clock.now += MINUTE_MS
    assert isinstance(await attempt(lim, 2, 3), RateLimitExceeded)


# ---------------------------------------------------------------- keys


def crc16_xmodem(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def cluster_slot(key: str) -> int:
    """Redis Cluster's slot: CRC16 of the hash tag (the first non-empty `{...}`) or the key."""
    raw = key.encode()
    start = raw.find(b"{")
    end = raw.find(b"}", start + 1)
    if start >= 0 and end > start + 1:
        raw = raw[start + 1 : end]
    return crc16_xmodem(raw) % 16384


def test_cluster_slot_matches_the_spec() -> None:
    assert crc16_xmodem(b"123456789") == 0x31C3
    assert cluster_slot("foo") == 12182  # the slot CLUSTER KEYSLOT gives
    assert cluster_slot("{user1000}.following") == cluster_slot("{user1000}.followers")


async def test_keys_share_a_slot_expire_and_keep_only_the_window(
    redis: Redis, redis_prefix: str
) -> None:
    lim, clock, prefix = limiter(redis, redis_prefix)
    minute, day = keys(prefix, ORG, CAPABILITY)
    tag = f"{{{ORG}:{CAPABILITY}}}"
    assert tag in minute and tag in day
    assert cluster_slot(minute) == cluster_slot(day) == cluster_slot(tag)
    assert cluster_slot(minute) == cluster_slot(f"other{tag}")
    first = await lim.admit(ORG, CAPABILITY, rpm=30, rpd=500)
    stored = {k.decode() async for k in redis.scan_iter(match=f"{prefix}*")}
    assert stored == {minute, day}
    assert 0 < await redis.pttl(minute) <= MINUTE_MS
    assert 0 < await redis.pttl(day) <= DAY_MS
    assert await redis.pttl(day) > MINUTE_MS  # each key lives for its own window
    clock.now += MINUTE_MS  # the first request leaves the minute, not the day
    await lim.admit(ORG, CAPABILITY, rpm=30, rpd=500)
    assert (await redis.zcard(minute), await redis.zcard(day)) == (1, 2)
    assert await redis.zscore(minute, first.member) is None
    clock.now += DAY_MS
    last = await lim.admit(ORG, CAPABILITY, rpm=30, rpd=500)
    assert (await redis.zcard(minute), await redis.zcard(day)) == (1, 1)
    await lim.give_back(ORG, CAPABILITY, last.member)  # an empty log is no key at all
    assert await redis.exists(minute, day) == 0


async def test_a_one_window_limit_writes_one_key(redis: Redis, redis_prefix: str) -> None:
    lim, _, prefix = limiter(redis, redis_prefix)
    minute, day = keys(prefix, ORG, CAPABILITY)
    await lim.admit(ORG, CAPABILITY, rpm=None, rpd=2)
    assert (await redis.exists(minute), 0 < await redis.pttl(day) <= DAY_MS) == (0, True)
    unlimited = await lim.admit(ORG, CAPABILITY, rpm=None, rpd=None)
    assert (unlimited.limit, unlimited.remaining, unlimited.reset_ms) == (None, None, None)
    assert await redis.zcard(day) == 1  # an unlimited request is not logged
