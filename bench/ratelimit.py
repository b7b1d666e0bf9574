"""How fast the rate limiter admits requests, against the cheapest Redis round trip.

One "call" is what a rate-limited request costs Redis:

* limiter: ``SlidingWindowLimiter.admit`` with rpm and rpd both 10**9, so that no call is
  ever refused and every call runs the whole Lua script (trim both windows, count them, log
  the request in both, set both expiries, read the oldest entry): one EVALSHA;
* incr: ``INCR`` on one key, the cheapest round trip through the same client (the baseline);
* evalsha: an EVALSHA of ``return 1``, the same round trip through the scripting engine.

The limiter runs on one key pair (one organization: every call grows the same two sorted
sets) and spread over ``--spread`` organizations (1,000 by default, one picked at random per
call), each at every ``--concurrency`` (1 and 32 by default: closed loop, every worker sends
its next call when the last one is answered). Every measurement runs ``--seconds`` in
``--rounds`` parts, each after a short warm-up; at each concurrency the scenarios take turns
in every round, in reverse order every other round, so that drift and bursts of noise fall
on all of them alike (``rounds`` shows the slowest and the fastest part). All run in one
process with one redis-py asyncio client, set up as the gateway sets up its own
(``rate_limits.redis_timeout_s``, one quick retry; on uvloop when installed, as the gateway's
workers run), against one Redis: REDIS_URL when set and reachable, else an embedded one
started in a temporary directory.

Reading the table: ``calls/s`` is completed calls over wall time; ``/incr`` and ``/evalsha``
divide a rate by the baseline's rate at the same concurrency, so 0.50 means the limiter
sustains half as many calls as the bare round trip. ``p50``/``p99`` are per-call latencies in
microseconds; ``client us`` is this process's CPU time per call (redis-py, the event loop,
the limiter's keys and ids), which on a small machine is taken from Redis. The client shares
this machine's cores with Redis, so absolute numbers describe this machine; compare ratios.

Every key lives under a prefix unique to the run and is deleted at the end, even on error.
Before that, the limiter's day logs must hold exactly one entry per admitted call (warm-ups
included) and the INCR key must equal the number of INCRs; the exit status is 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import secrets
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.asyncio import Redis

from bench._cli import event_loop, new_parser, percentile, positive_list, run_main
from bench._servers import delete_prefix, redis_client, redis_url
from gateway.config import load_config
from policies.rate_limit import SlidingWindowLimiter, keys

REPO = Path(__file__).resolve().parent.parent
LIMIT = 10**9  # rpm and rpd: never reached, so every call runs the whole script
CAPABILITY = "question_generation"
WARMUP_S = 0.5  # before a measurement's first round, untimed
ROUND_WARMUP_S = 0.1  # before each later round

# One call against Redis; the random generator picks the organization where there is a choice.
Op = Callable[[random.Random], Awaitable[None]]


class BenchError(RuntimeError):
    """A call did not do what it should (a refusal): the numbers would lie."""


@dataclass
class Scenario:
    name: str
    op: Op
    organizations: list[uuid.UUID] = field(default_factory=list)  # limiter only
    calls: int = 0  # every completed call, warm-ups included


@dataclass(frozen=True)
class Result:
    scenario: str
    concurrency: int
    calls: int
    seconds: float
    p50_us: float
    p99_us: float
    client_us: float
    rounds: tuple[float, ...]  # calls/s of each round

    @property
    def rate(self) -> float:
        return self.calls / self.seconds


# --- the calls ----------------------------------------------------------------------------


def incr_op(client: Redis, key: str) -> Op:
    async def op(rng: random.Random) -> None:
        await client.incr(key)

    return op


def evalsha_op(client: Redis) -> Op:
    script = client.register_script("return 1")

    async def op(rng: random.Random) -> None:
        await script(keys=[], args=[])

    return op


def limiter_op(limiter: SlidingWindowLimiter, organizations: Sequence[uuid.UUID]) -> Op:
    async def op(rng: random.Random) -> None:
        org = organizations[rng.randrange(len(organizations))]
        admission = await limiter.admit(org, CAPABILITY, rpm=LIMIT, rpd=LIMIT)
        if admission.limit is None:
            raise BenchError("the limiter did not run its script")

    return op


# --- the measurements ---------------------------------------------------------------------


async def drive(
    scenario: Scenario, concurrency: int, seconds: float
) -> tuple[float, float, list[float]]:
    """`concurrency` workers calling back to back: (wall s, client CPU s, latencies)."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            await scenario.op(rng)
            latencies.append(time.perf_counter() - start)
            scenario.calls += 1

    start, cpu = time.perf_counter(), time.process_time()
    async with asyncio.TaskGroup() as group:
        for seed in range(concurrency):
            group.create_task(worker(seed))
    return time.perf_counter() - start, time.process_time() - cpu, latencies


@dataclass
class Pooled:
    """One scenario at one concurrency, pooled over its rounds."""

    wall_s: float = 0.0
    cpu_s: float = 0.0
    latencies: list[float] = field(default_factory=list)
    rounds: list[float] = field(default_factory=list)  # calls/s of each round

    def result(self, scenario: str, concurrency: int) -> Result:
        return Result(
            scenario=scenario,
            concurrency=concurrency,
            calls=len(self.latencies),
            seconds=self.wall_s,
            p50_us=percentile(self.latencies, 0.50) * 1e6,
            p99_us=percentile(self.latencies, 0.99) * 1e6,
            client_us=self.cpu_s / len(self.latencies) * 1e6,
            rounds=tuple(self.rounds),
        )


async def measure_all(scenarios: Sequence[Scenario], args: argparse.Namespace) -> list[Result]:
    """Every scenario at each concurrency, in --rounds parts: the scenarios take turns in
    each round, in reverse order every other round, so that drift and bursts of noise fall
    on all of them alike."""
    results = []
    for concurrency in args.concurrency:
        pooled = [Pooled() for _ in scenarios]
        for n in range(args.rounds):
            turns = list(zip(scenarios, pooled, strict=True))
            for scenario, pool in turns if n % 2 == 0 else turns[::-1]:
                await drive(scenario, concurrency, WARMUP_S if n == 0 else ROUND_WARMUP_S)
                wall, cpu, latencies = await drive(
                    scenario, concurrency, args.seconds / args.rounds
                )
                pool.wall_s, pool.cpu_s = pool.wall_s + wall, pool.cpu_s + cpu
                pool.latencies += latencies
                pool.rounds.append(len(latencies) / wall)
        for scenario, pool in zip(scenarios, pooled, strict=True):
            result = pool.result(scenario.name, concurrency)
            rounds = " ".join(f"{rate:,.0f}" for rate in result.rounds)
            print(f"  measured {scenario.name:<15} x{concurrency}: {result.rate:,.0f}/s ({rounds})")
            results.append(result)
    return results


# --- the check ----------------------------------------------------------------------------


async def logged_entries(client: Redis, prefix: str, organizations: Sequence[uuid.UUID]) -> int:
    """Entries in the day logs of `organizations` (a minute log may have been trimmed)."""
    async with client.pipeline(transaction=False) as pipe:
        for org in organizations:
            pipe.zcard(keys(prefix, org, CAPABILITY)[1])
        counts = await pipe.execute()
    return sum(int(count) for count in counts)


async def verify(
    client: Redis, prefix: str, incr_key: str, scenarios: Sequence[Scenario]
) -> list[str]:
    """What the run left in Redis against what it did: a line per scenario, problems first."""
    problems, lines = [], []
    for scenario in scenarios:
        if scenario.organizations:
            stored = await logged_entries(client, prefix, scenario.organizations)
            what = "entries in the day logs"
        elif scenario.name == "incr":
            stored = int(await client.get(incr_key) or 0)
            what = "as the counter's value"
        else:
            continue
        ok = stored == scenario.calls
        lines.append(f"  {scenario.name:<15} {scenario.calls:>9,} calls, {stored:>9,} {what}")
        if not ok:
            problems.append(f"{scenario.name}: {stored} stored for {scenario.calls} calls")
    print("check:")
    print("\n".join(lines))
    return problems


# --- the report ---------------------------------------------------------------------------


async def print_header(client: Redis, where: str, args: argparse.Namespace, prefix: str) -> None:
    info = await client.info("server")
    print(
        "Rate-limiter benchmark: SlidingWindowLimiter.admit (one Lua script) vs a bare round trip"
    )
    print(f"server    Redis {info.get('redis_version')}, {where}, key prefix {prefix}")
    print(
        f"client    Python {platform.python_version()}, redis-py {redis.__version__}, "
        f"{args.loop}; one process"
    )
    print(
        f"machine   {os.cpu_count()} CPUs shared by this client, Redis and whatever else runs "
        f"(PostgreSQL), none pinned; load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"run       {args.seconds:g} s per measurement in {args.rounds} rounds, taking turns "
        f"({WARMUP_S:g} s warm-up before the first, {ROUND_WARMUP_S:g} s before the others); "
        f"concurrency {', '.join(map(str, args.concurrency))}"
    )
    print(
        f"limiter   rpm = rpd = {LIMIT:,} (never refused: the whole script every call); "
        f"hot = 1 organization, spread = {args.spread:,}"
    )


def print_table(results: Sequence[Result]) -> None:
    base = {(r.scenario, r.concurrency): r.rate for r in results if r.scenario in BASELINES}
    print()
    print(
        f"{'scenario':<15} {'conc':>4} {'calls':>8} {'calls/s':>9} {'rounds':>13} {'/incr':>6} "
        f"{'/evalsha':>8} {'p50 us':>8} {'p99 us':>8} {'client us':>9}"
    )
    for r in results:
        ratios = [
            f"{r.rate / base[(b, r.concurrency)]:.2f}" if base.get((b, r.concurrency)) else "-"
            for b in BASELINES
        ]
        spread = f"{min(r.rounds):,.0f}-{max(r.rounds):,.0f}"
        print(
            f"{r.scenario:<15} {r.concurrency:>4} {r.calls:>8} {r.rate:>9,.0f} {spread:>13} "
            f"{ratios[0]:>6} {ratios[1]:>8} {r.p50_us:>8.0f} {r.p99_us:>8.0f} {r.client_us:>9.0f}"
        )
    print()


BASELINES = ("incr", "evalsha")


async def run(args: argparse.Namespace) -> int:
    prefix = f"gwbench{secrets.token_hex(4)}:"
    timeout_s = load_config(REPO / "config.yaml").rate_limits.redis_timeout_s
    with redis_url() as (url, where):
        async with redis_client(url, timeout_s) as client:
            try:
                await print_header(client, where, args, prefix)
                limiter = SlidingWindowLimiter(client, prefix=prefix)
                spread = [uuid.uuid4() for _ in range(args.spread)]
                hot = [uuid.uuid4()]
                incr_key = f"{prefix}incr"
                scenarios = [
                    Scenario("incr", incr_op(client, incr_key)),
                    Scenario("evalsha", evalsha_op(client)),
                    Scenario("limiter hot", limiter_op(limiter, hot), hot),
                    Scenario("limiter spread", limiter_op(limiter, spread), spread),
                ]
                print_table(await measure_all(scenarios, args))
                problems = await verify(client, prefix, incr_key, scenarios)
            finally:
                deleted = await delete_prefix(client, prefix)
                print(f"deleted {deleted:,} keys under {prefix}")
    print("RESULT: " + ("ok" if not problems else "FAILED"))
    for problem in problems:
        print(f"  {problem}")
    return 0 if not problems else 1


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = new_parser("bench.ratelimit", __doc__)
    parser.add_argument("--concurrency", type=positive_list, default=[1, 32])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="parts of each, in turns")
    parser.add_argument("--spread", type=int, default=1000, help="organizations")
    args = parser.parse_args(argv)
    if args.spread < 1 or args.seconds <= 0 or args.rounds < 1:
        parser.error("--spread, --seconds and --rounds must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.loop = event_loop()
    return run_main(run, args)


if __name__ == "__main__":
    sys.exit(main())
