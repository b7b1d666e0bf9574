"""How fast the ledger moves credits, against the cheapest SQL that could do the same.

One "pair" is what a metered call costs the database: a hold before the call and its
settlement after it.

* raw: two bare statements on a plain table made for the run,
  ``UPDATE bench_raw SET reserved = reserved + $2 WHERE id = $1 AND balance - reserved >= $2``
  then ``UPDATE bench_raw SET reserved = reserved - $2, balance = balance - $3 WHERE id = $1``.
* ledger: ``ledger.reservations.reserve`` then ``ledger.reservations.settle``, each one call
  of a PL/pgSQL function (credit_reserve, credit_settle) that locks the balance row, writes
  the reservation and, on settlement, the consumption entry.
* grouped: the same pair through ``ledger.group.GroupCommit``, as the gateway runs it: the
  holds (and settlements) of concurrent workers go to PostgreSQL together, one statement and
  one commit per batch (credit_reserve_batch, credit_settle_batch), on a pool of its own
  (``2 * max_inflight`` connections, set up as the gateway's: no reset query on checkout).
  Sequentially it is the ledger pair with a batch of one.

Each is measured on one hot row / organization (every worker contends for one row lock) and
spread over ``--spread`` rows / organizations (1,000 by default; little contention), first
with ``--concurrency`` workers (32 by default, each holding one connection of a pool of that
size), then sequentially (one worker) so that the cost of a single call shows. Every
measurement runs ``--seconds`` (or ``--pairs`` pairs) after a short warm-up; all of them run
in one process, against one freshly created database on one server. Before the first, every
organization gets a few settled pairs and the database is analyzed, so that the plans are
those of tables in use rather than of empty ones.

Reading the table: ``pairs/s`` is completed pairs over wall time; ``vs raw`` divides the
ledger's rate by the raw rate of the same scenario and concurrency, so 1.00 would mean the
ledger costs no more than two bare UPDATEs, and 0.25 that it sustains a quarter of their rate.
On the hot row both are bounded by how long each statement holds the row lock (until its
commit is flushed), so the ratio there shows the extra time the ledger spends inside the lock;
spread out, the ratio shows the extra CPU and WAL each pair costs. ``p50``/``p99`` are per-pair
latencies; ``1st``/``2nd`` are the median times of the hold and of the settlement alone;
``client us`` is this process's CPU time per pair (asyncpg, the ledger module, the event loop),
which on a small machine is taken from the server. The client runs beside the server and may
share its few cores, so the absolute numbers describe this machine, not a production
capacity; compare the ratios.

After the run the ledger invariant (ledger.check) is checked on the bench database; the
exit status is 1 when it does not hold. The database is dropped at the end, even on error.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import asyncpg

from bench._cli import new_parser, percentile, run_main
from bench._seed import (
    CHARGE_MICRO,
    HOLD_MICRO,
    PLAN,
    TTL_S,
    bench_database,
    create_organizations,
    create_raw_table,
    seed_history,
)
from bench._servers import postgres_server
from gateway.config import load_config
from ledger import catalog_sync, migrations, reservations
from ledger.check import check_ledger
from ledger.db import Conn, keep_session
from ledger.group import GroupCommit

REPO = Path(__file__).resolve().parent.parent
WARMUP_S = 0.5  # per measurement, untimed: prepares each connection's statements
GROUP_IN_FLIGHT = 2  # batches of each kind at once, as the gateway's default

RAW_RESERVE = (
    "UPDATE bench_raw SET reserved = reserved + $2 WHERE id = $1 AND balance - reserved >= $2"
)
RAW_SETTLE = "UPDATE bench_raw SET reserved = reserved - $2, balance = balance - $3 WHERE id = $1"

# One pair on a connection; returns the seconds its first call (the hold) took.
Pair = Callable[[Conn, random.Random], Awaitable[float]]
Pool: TypeAlias = "asyncpg.Pool[asyncpg.Record]"


class BenchError(RuntimeError):
    """A pair did not do what it should (a refused hold, a replay): the numbers would lie."""


@dataclass(frozen=True)
class Targets:
    raw_ids: list[int]
    organizations: list[uuid.UUID]


@dataclass(frozen=True)
class Sampled:
    seconds: float  # wall
    client_cpu_s: float  # this process's CPU time: asyncpg, the ledger module, the loop
    samples: list[tuple[float, float]]  # (hold seconds, pair seconds) per pair


@dataclass(frozen=True)
class Result:
    system: str  # raw | ledger | grouped
    scenario: str  # hot | spread
    concurrency: int
    pairs: int
    seconds: float
    p50_ms: float
    p99_ms: float
    first_p50_ms: float
    second_p50_ms: float
    client_us: float  # client CPU per pair

    @property
    def rate(self) -> float:
        return self.pairs / self.seconds


def raw_pair(ids: Sequence[int]) -> Pair:
    async def pair(conn: Conn, rng: random.Random) -> float:
        row = ids[rng.randrange(len(ids))]
        start = time.perf_counter()
        status = await conn.execute(RAW_RESERVE, row, HOLD_MICRO)
        first = time.perf_counter() - start
        if status != "UPDATE 1":
            raise BenchError(f"raw row {row} refused a hold ({status})")
        await conn.execute(RAW_SETTLE, row, HOLD_MICRO, CHARGE_MICRO)
        return first

    return pair


def ledger_pair(organizations: Sequence[uuid.UUID]) -> Pair:
    async def pair(conn: Conn, rng: random.Random) -> float:
        org = organizations[rng.randrange(len(organizations))]
        start = time.perf_counter()
        hold = await reservations.reserve(
            conn,
            org,
            f"bench-{uuid.uuid4().hex}",
            minimum_micro=HOLD_MICRO,
            requested_micro=HOLD_MICRO,
            ttl_s=TTL_S,
        )
        first = time.perf_counter() - start
        settled = await reservations.settle(conn, org, hold.id, CHARGE_MICRO)
        if hold.replayed or not settled.applied:
            raise BenchError(f"reservation {hold.id} was replayed or settled before")
        return first

    return pair


def grouped_pair(organizations: Sequence[uuid.UUID], group: GroupCommit) -> Pair:
    async def pair(_: Conn, rng: random.Random) -> float:
        org = organizations[rng.randrange(len(organizations))]
        start = time.perf_counter()
        hold = await group.reserve(
            reservations.HoldRequest(
                org, f"bench-{uuid.uuid4().hex}", HOLD_MICRO, HOLD_MICRO, TTL_S
            )
        )
        first = time.perf_counter() - start
        settled = await group.settle(reservations.SettleRequest(org, hold.id, CHARGE_MICRO))
        if hold.replayed or not settled.applied:
            raise BenchError(f"reservation {hold.id} was replayed or settled before")
        return first

    return pair


def budget(seconds: float, pairs: int | None) -> Callable[[], bool]:
    """Whether a worker may start another pair: until `seconds` pass, or `pairs` are taken."""
    if pairs is None:
        deadline = time.perf_counter() + seconds
        return lambda: time.perf_counter() < deadline
    left = [pairs]

    def take() -> bool:
        left[0] -= 1
        return left[0] >= 0

    return take


async def worker(
    pool: Pool, pair: Pair, more: Callable[[], bool], seed: int, samples: list[tuple[float, float]]
) -> None:
    """Pairs back to back on one connection; samples get (hold seconds, pair seconds)."""
    rng = random.Random(seed)
    async with pool.acquire() as conn:
        while more():
            start = time.perf_counter()
            first = await pair(conn, rng)
            samples.append((first, time.perf_counter() - start))


async def drive(pool: Pool, pair: Pair, concurrency: int, more: Callable[[], bool]) -> Sampled:
    """Run `concurrency` workers until the budget is spent."""
    samples: list[tuple[float, float]] = []
    start, cpu = time.perf_counter(), time.process_time()
    async with asyncio.TaskGroup() as group:
        for seed in range(concurrency):
            group.create_task(worker(pool, pair, more, seed, samples))
    return Sampled(time.perf_counter() - start, time.process_time() - cpu, samples)


async def measure(
    pool: Pool, system: str, scenario: str, pair: Pair, concurrency: int, args: argparse.Namespace
) -> Result:
    await drive(pool, pair, concurrency, budget(WARMUP_S, None))
    sampled = await drive(pool, pair, concurrency, budget(args.seconds, args.pairs))
    samples = sampled.samples
    totals = [total for _, total in samples]
    return Result(
        system=system,
        scenario=scenario,
        concurrency=concurrency,
        pairs=len(samples),
        seconds=sampled.seconds,
        p50_ms=percentile(totals, 0.50) * 1000,
        p99_ms=percentile(totals, 0.99) * 1000,
        first_p50_ms=percentile([first for first, _ in samples], 0.50) * 1000,
        second_p50_ms=percentile([total - first for first, total in samples], 0.50) * 1000,
        client_us=sampled.client_cpu_s / len(samples) * 1e6,
    )


async def measure_all(url: str, targets: Targets, args: argparse.Namespace) -> list[Result]:
    """Every scenario at the chosen concurrency, then sequentially; the systems alternate."""
    results = []
    for concurrency in dict.fromkeys([args.concurrency, 1]):
        async with (
            asyncpg.create_pool(url, min_size=concurrency, max_size=concurrency) as pool,
            asyncpg.create_pool(
                url, min_size=1, max_size=2 * GROUP_IN_FLIGHT, reset=keep_session
            ) as group_pool,
        ):
            group = GroupCommit(group_pool, max_inflight=GROUP_IN_FLIGHT)
            hot, spread = targets.organizations[:1], targets.organizations
            scenarios = [
                ("raw", "hot", raw_pair(targets.raw_ids[:1])),
                ("ledger", "hot", ledger_pair(hot)),
                ("grouped", "hot", grouped_pair(hot, group)),
                ("raw", "spread", raw_pair(targets.raw_ids)),
                ("ledger", "spread", ledger_pair(spread)),
                ("grouped", "spread", grouped_pair(spread, group)),
            ]
            for system, scenario, pair in scenarios:
                result = await measure(pool, system, scenario, pair, concurrency, args)
                print(f"  measured {system:<7} {scenario:<6} x{concurrency}: {result.rate:,.0f}/s")
                results.append(result)
            batches = ", ".join(
                f"{kind} {items / max(sent, 1):.1f}"
                for kind, (sent, items) in group.stats().items()
            )
            print(f"  grouped x{concurrency}: operations per batch on average: {batches}")
            await group.drain()  # its kept connections back, before the pool closes
    return results


async def prepare(url: str, spread: int) -> Targets:
    """Migrate and seed the bench database, then create the raw rows and the organizations."""
    conn = await asyncpg.connect(url)
    try:
        await migrations.up(conn)
        await catalog_sync.seed(conn, load_config(REPO / "config.yaml"))
        targets = Targets(
            await create_raw_table(conn, spread), await create_organizations(conn, spread)
        )
        await seed_history(conn, targets.organizations)
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()
    return targets


async def print_header(url: str, where: str, args: argparse.Namespace) -> None:
    conn = await asyncpg.connect(url)
    try:
        version = await conn.fetchval("SHOW server_version")
        settings = await conn.fetch(
            """SELECT name, current_setting(name) AS value FROM pg_settings
                WHERE name IN ('fsync', 'synchronous_commit', 'shared_buffers', 'autovacuum')
                ORDER BY name"""
        )
        database = await conn.fetchval("SELECT current_database()")
    finally:
        await conn.close()
    budget_text = f"{args.pairs} pairs" if args.pairs else f"{args.seconds:g} s"
    print("Ledger benchmark: reserve+settle pairs through the ledger vs two raw UPDATEs")
    print(f"server    PostgreSQL {version}, {where}, database {database}")
    print("settings  " + " ".join(f"{row['name']}={row['value']}" for row in settings))
    print(
        f"client    Python {platform.python_version()}, asyncpg {asyncpg.__version__}, "
        f"{os.cpu_count()} CPUs shared with the server, load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"run       {budget_text} per measurement after {WARMUP_S:g} s warm-up; "
        f"concurrency {args.concurrency} then 1; hot = 1 row/org, spread = {args.spread}; "
        f"hold {HOLD_MICRO} micro, charge {CHARGE_MICRO} micro; plan {PLAN}"
    )


def print_table(results: Sequence[Result]) -> None:
    raw = {(r.scenario, r.concurrency): r.rate for r in results if r.system == "raw"}
    print()
    print(
        f"{'scenario':<16} {'conc':>4} {'pairs':>7} {'pairs/s':>9} {'vs raw':>10} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'1st p50':>8} {'2nd p50':>8} {'client us':>9}"
    )
    for r in results:
        ratio = f"{r.rate / raw[(r.scenario, r.concurrency)]:.2f}" if r.system != "raw" else ""
        print(
            f"{r.system + ' ' + r.scenario:<16} {r.concurrency:>4} {r.pairs:>7} {r.rate:>9,.0f} "
            f"{ratio:>10} {r.p50_ms:>7.2f} {r.p99_ms:>7.2f} "
            f"{r.first_p50_ms:>8.2f} {r.second_p50_ms:>8.2f} {r.client_us:>9.0f}"
        )
    print()


async def verify(url: str) -> bool:
    """Check the ledger invariant on the bench database and say whether it held."""
    conn = await asyncpg.connect(url)
    try:
        violations = await check_ledger(conn)
        counts = await conn.fetchrow(
            """SELECT (SELECT count(*) FROM organizations) AS organizations,
                      (SELECT count(*) FROM credit_reservations) AS reservations,
                      (SELECT count(*) FROM credit_transactions) AS transactions,
                      (SELECT sum(reserved) FROM bench_raw) AS raw_reserved"""
        )
    finally:
        await conn.close()
    assert counts is not None
    print(
        f"ledger invariant: {'held' if not violations else 'BROKEN'} "
        f"({counts['organizations']} organizations, {counts['reservations']} reservations, "
        f"{counts['transactions']} entries); raw rows left reserved: {counts['raw_reserved']}"
    )
    for violation in violations[:20]:
        print(f"  {violation.organization_id} {violation.kind}: {violation.detail}")
    return not violations


async def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="gwbench-", ignore_cleanup_errors=True) as home:
        async with postgres_server(Path(home)) as (server_url, where):
            async with bench_database(server_url) as url:
                started = time.perf_counter()
                targets = await prepare(url, args.spread)
                await print_header(url, where, args)
                print(
                    f"setup     {time.perf_counter() - started:.1f} s (migrate, seed, "
                    "organizations)"
                )
                results = await measure_all(url, targets, args)
                print_table(results)
                held = await verify(url)
    return 0 if held else 1


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = new_parser("bench.ledger", __doc__)
    parser.add_argument("--concurrency", type=int, default=32, help="workers and pool size")
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--pairs", type=int, default=None, help="per measurement, not --seconds")
    parser.add_argument("--spread", type=int, default=1000, help="rows / organizations")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.spread < 1 or args.seconds <= 0 or (args.pairs or 1) < 1:
        parser.error("--concurrency, --spread, --seconds and --pairs must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
