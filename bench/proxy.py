"""What the gateway costs per call, against calling the upstream directly and against the
LiteLLM proxy, all in front of one fast fake OpenAI upstream; with one and more worker
processes, and with its rate limiter on and off.

Targets, measured in one run:

* direct: the client calls the fake upstream itself (the baseline);
* gateway wN: ``llm-gateway serve --workers N`` for each N of ``--workers`` (1, 2; for N > 1
  a supervisor and N workers sharing the port) with every feature on: API-key
  authentication, plan policy, a credit reservation in PostgreSQL before the call and its
  settlement after it (an organization on the ``team`` plan, no rate limits, topped up far
  beyond the run);
* limits off / on (``--limits``, default): the gateway with one worker, plain requests only.
  Off is ``team`` as configured (rpm/rpd null: no Redis call); on sets its
  ``question_generation`` rpm = rpd = 10**9, so every request runs the limiter's Lua script
  in Redis (``policies.rate_limit``) and none is refused;
* baseline w1 (``--baseline REF``): the gateway as of git commit REF, one worker, checked
  out into a temporary worktree and served beside the current code's gateways, taking turns
  with them: an earlier version measured in the same run (its database migrated only as
  far as its own migrations go);
* litellm: the LiteLLM proxy (``litellm[proxy]`` from PyPI, in its own virtualenv under
  ``.gateway/bench-litellm-venv``, its default single process, no database, checking a
  master key, ``LITELLM_LOG=ERROR``), served beside the gateways and taking its turns with
  the first group of them, so that the throughput ratios compare parts measured moments
  apart (a speed drift of this shared machine between two phases of the run would
  otherwise land on the ratio).

The same request (``gpt-4o-mini``, ``max_tokens`` 16) goes to every target, non-streaming
("plain") and streaming with ``include_usage`` ("stream"), at each ``--concurrency`` (closed
loop). The fake answers with a fixed small body carrying usage, or a short SSE stream ending
in a usage chunk. A cell (target, mode, concurrency) runs ``--duration`` s in ``--rounds``
parts. The gateway wN run at once (idle but for their turn), as do limits off and on: in
each round every one of them takes its turn, in reverse order every other round, so drift
and bursts of noise on this shared machine fall on all alike; the per-round rates are shown.
Each gateway has its own database on one PostgreSQL server (holding settled calls of 300
other organizations, analyzed before it starts, as in bench.ledger: on empty tables its
connections would cache plans that slow down as the tables grow) and its own key prefix on
one Redis (deleted afterwards).

Reading the output: ``req/s`` is completed requests over wall time; ``p50``/``p99`` are
per-request latencies (a stream counts until its last byte). A proxy's overhead is its
latency minus the direct latency at concurrency 1, where nothing queues; throughput ratios
are taken at the highest concurrency. Memory is the resident set of a server's whole process
tree after its load (for wN the supervisor, the workers and multiprocessing's resource
tracker; PSS, which splits shared pages between processes, beside it); start-up runs from
spawning to the first good answer (the database is migrated beforehand). The client, the
fake, the servers, PostgreSQL and Redis share this machine's few cores (a second worker
competes with all of them), so absolute numbers describe this machine; compare ratios.
``cpu ms/req`` is the CPU time the server's processes (for direct: the fake's) spent per
answered request in the timed parts, ``db ms/req`` PostgreSQL's and ``client ms/req`` the
load client's (this process, on uvloop with the gateway's own lean HTTP/1.1 client, a
keep-alive connection per worker: whatever the client spends is taken from the servers it
shares the cores with): unlike req/s they hardly move with the machine's other load, and
they show where a proxy's cost lies. The
"floor" under the overhead is the gateway's own hold + settlement run alone on one
connection against its database, before and after its load: two durable commits that any
durable ledger pays per call at concurrency 1.

Correctness is checked for every gateway configuration: every answer 200 with usage; after
its run the ledger invariant (``ledger.check``) holds on its database, the organization has
one consumption entry per request, and its rate-limit day log one entry per request with
limits on, none with them off. Otherwise the exit status is 1. The bench databases are
dropped at the end, even on error.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from bench._cli import event_loop, new_parser, positive_list, run_main
from bench._litellm import ensure_litellm, litellm_served
from bench._load import (
    Endpoint,
    first_success,
    gateway_check,
    measure_in_turns,
    print_cell,
    take_limiter_log,
)
from bench._proxy_report import Outcome, print_report
from bench._seed import (
    bench_database,
    create_organizations,
    ledger_floor,
    postgres_settings,
    prepare_gateway,
    seed_history,
)
from bench._servers import (
    Child,
    gateway_argv,
    gateway_env,
    postgres_server,
    redis_server,
    spawned,
    tree_memory,
    wait_listeners,
    wait_port,
    write_config,
)
from ledger import migrations
from tests.processes import free_port

REPO = Path(__file__).resolve().parent.parent
LITELLM_VENV = REPO / ".gateway" / "bench-litellm-venv"
TOPUP_MICRO = 10**13  # ten million credits: no reservation is ever refused
WARMUP_S = 1.0  # before a cell's first round
ROUND_WARMUP_S = 0.5  # before each later round (a new client session)
START_TIMEOUT_S = 180.0
PLAN = "team"
CAPABILITY = "question_generation"  # the default capability, which every bench request uses
HIGH_LIMIT = 10**9  # rpm and rpd with limits on: never reached
HISTORY_ORGS = 300  # each with bench._seed.HISTORY_PAIRS settled calls before the gateway


@dataclass(frozen=True)
class Setup:
    """One gateway configuration under test."""

    name: str
    workers: int
    limits: bool = False
    floor: bool = False  # also measure the ledger's floor on its database (bench._seed)
    source: Path | None = None  # another checkout of the gateway (--baseline); None: this one


@dataclass(frozen=True)
class Services:
    """What every gateway configuration shares: the work directory, the fake, the servers."""

    home: Path
    fake: str
    postgres_url: str
    redis_url: str


async def load(
    endpoints: Sequence[Endpoint], streams: Sequence[bool], args: argparse.Namespace, out: Outcome
) -> None:
    for stream in streams:
        for concurrency in args.concurrency:
            seconds = args.duration / args.rounds
            warmups = (WARMUP_S, ROUND_WARMUP_S)
            turns = await measure_in_turns(
                endpoints, stream, concurrency, seconds, args.rounds, warmups
            )
            for cell in turns:
                print_cell(cell)
            out.cells += turns


# --- the gateway --------------------------------------------------------------------------


async def add_history(url: str) -> None:
    """Other organizations with settled calls, then VACUUM ANALYZE: the gateway meets tables
    in use, not empty ones whose plans its connections would cache (see bench.ledger)."""
    conn = await asyncpg.connect(url)
    try:
        await seed_history(conn, await create_organizations(conn, HISTORY_ORGS))
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def gateway(
    setup: Setup, svc: Services, out: Outcome
) -> AsyncIterator[tuple[Endpoint, Child]]:
    """A gateway configuration served from a database of its own, checked once it stopped."""
    async with bench_database(svc.postgres_url) as url:
        org, key = await prepare_gateway(url, REPO / "config.yaml", PLAN, TOPUP_MICRO)
        if setup.source is not None:
            await roll_back_to(url, setup.source)
        await add_history(url)
        if setup.floor:  # before the gateway runs (and again after): the database it meets
            out.ledger_floor_s.append(await ledger_floor(url, "before"))
        prefix = f"gwbench{secrets.token_hex(4)}:"
        port = free_port()
        endpoint = Endpoint(setup.name, f"http://127.0.0.1:{port}/v1/chat/completions", key)
        limits = {CAPABILITY: {"rpm": HIGH_LIMIT, "rpd": HIGH_LIMIT}} if setup.limits else {}
        config = svc.home / f"{setup.name.replace(' ', '-')}.yaml"
        source = setup.source or REPO
        write_config(source / "config.yaml", config, svc.fake, prefix, {PLAN: limits})
        argv = gateway_argv(config, port, setup.workers)
        env = gateway_env(svc.home, url, svc.redis_url)
        if setup.source is not None:  # its packages before the installed (editable) ones
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), env.get("PYTHONPATH")]))
        log = svc.home / f"{setup.name.replace(' ', '-')}.log"
        try:
            with spawned(setup.name, argv, env, log) as child:
                endpoint.pid = child.process.pid
                out.startup_s[setup.name] = await first_success(endpoint, child, START_TIMEOUT_S)
                listening = await wait_listeners(child.process.pid, port, setup.workers)
                if listening != setup.workers:
                    out.failures.append(f"{setup.name}: {listening} processes listen")
                yield endpoint, child
                log_tail = child.log_tail(10)
        finally:
            logged = await take_limiter_log(svc.redis_url, prefix, org, CAPABILITY)
        errors = sum(c.errors for c in out.cells if c.target == setup.name)
        if errors and log_tail:
            out.notes.append(f"{setup.name} log tail:\n{log_tail}")
        if setup.floor:
            out.ledger_floor_s.append(await ledger_floor(url, "after"))
        expected = endpoint.responses if setup.limits else 0
        note, failures = await gateway_check(url, org, endpoint, errors, logged, expected)
        out.notes.append(note)
        out.failures += failures


async def run_gateways(
    args: argparse.Namespace, home: Path, fake: str, out: Outcome, others: Sequence[Endpoint]
) -> None:
    """The gateway configurations; `others` (LiteLLM) take their turns in the first group."""
    async with postgres_server(home) as (postgres_url, where):
        out.notes.append(f"gateway database: {where}, a database per configuration")
        out.notes.append(await postgres_settings(postgres_url))
        with redis_server(home) as redis_url:
            embedded = redis_url != os.environ.get("REDIS_URL")
            out.notes.append(f"gateway Redis: {'embedded' if embedded else 'REDIS_URL'}")
            svc = Services(home, fake, postgres_url, redis_url)
            setups = [Setup(f"gateway w{n}", n, floor=i == 0) for i, n in enumerate(args.workers)]
            with baseline_checkout(args.baseline, home) as source:
                if source is not None:
                    setups.append(Setup("baseline w1", 1, source=source))
                await run_group(setups, (False, True), args, svc, out, others)
            out.gateways += [setup.name for setup in setups]
            if args.limits:
                limits = [Setup("limits off", 1), Setup("limits on", 1, limits=True)]
                await run_group(limits, (False,), args, svc, out)


@contextlib.contextmanager
def baseline_checkout(ref: str | None, home: Path) -> Iterator[Path | None]:
    """A worktree of the repository at `ref` (removed afterwards), or None without one."""
    if ref is None:
        yield None
        return
    path = home / "baseline"
    git = ["git", "-C", str(REPO)]
    subprocess.run([*git, "worktree", "add", "--detach", str(path), ref], check=True)
    try:
        yield path
    finally:
        subprocess.run([*git, "worktree", "remove", "--force", str(path)], check=False)


async def roll_back_to(url: str, source: Path) -> None:
    """Undo the migrations the checkout at `source` does not have (the newest ones)."""
    theirs = {m.version for m in migrations.discover(source / "sql")}
    newer = [m for m in migrations.discover() if m.version not in theirs]
    if any(m.version < max(theirs) for m in newer):
        raise RuntimeError(f"{source} lacks migrations older than its newest: cannot compare")
    conn = await asyncpg.connect(url)
    try:
        await migrations.down(conn, len(newer))
    finally:
        await conn.close()


async def run_group(
    setups: Sequence[Setup],
    streams: Sequence[bool],
    args: argparse.Namespace,
    svc: Services,
    out: Outcome,
    others: Sequence[Endpoint] = (),
) -> None:
    """The setups served at once (the idle ones waiting) and measured in turns, `others`
    taking theirs after them; the memory of each after the group's load. Started last to
    first, so they are checked in order."""
    async with contextlib.AsyncExitStack() as stack:
        served = [await stack.enter_async_context(gateway(s, svc, out)) for s in setups[::-1]]
        served.reverse()
        await load([endpoint for endpoint, _ in served] + list(others), streams, args, out)
        for setup, (_, child) in zip(setups, served, strict=True):
            out.memory[setup.name] = tree_memory(child.process.pid)


# --- the report ---------------------------------------------------------------------------


def print_header(args: argparse.Namespace, litellm: str | None) -> None:
    print("Proxy benchmark: direct to a fake OpenAI upstream vs this gateway vs LiteLLM proxy")
    print(
        f"machine   {os.cpu_count()} CPUs shared by the load client, the fake upstream, the "
        f"server under test, PostgreSQL and Redis (each its own process, none pinned); "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"client    Python {platform.python_version()} on {args.loop}, the gateway's HTTP/1.1 "
        f"client; "
        f"LiteLLM {litellm or 'skipped'} (one process)"
    )
    print(
        f"run       {args.duration:g} s per cell in {args.rounds} rounds ({WARMUP_S:g} s warm-up "
        f"before the first, {ROUND_WARMUP_S:g} s before the others); concurrency "
        f"{', '.join(map(str, args.concurrency))}; plain and stream (include_usage)"
    )
    print(
        f"gateway   --workers {', '.join(map(str, args.workers))}"
        + (f" and baseline {args.baseline}" if args.baseline else "")
        + (" and LiteLLM" if litellm else "")
        + " served at once, taking turns; "
        + ("then limits off and on (w1, plain) the same way" if args.limits else "no limits run")
    )


async def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    litellm = None if args.skip_litellm else ensure_litellm(LITELLM_VENV)
    print_header(args, litellm[1] if litellm else None)
    out = Outcome()
    with tempfile.TemporaryDirectory(prefix="gwproxy-", ignore_cleanup_errors=True) as tmp:
        home = Path(tmp)
        port = free_port()
        fake = f"http://127.0.0.1:{port}/v1"
        argv = [sys.executable, "-m", "bench._fake", str(port)]
        with spawned("fake upstream", argv, dict(os.environ), home / "fake.log") as child:
            await wait_port(port, child)
            direct = Endpoint(
                "direct", fake + "/chat/completions", "sk-direct", pid=child.process.pid
            )
            await load([direct], (False, True), args, out)
            async with contextlib.AsyncExitStack() as stack:
                served = None
                if litellm:
                    served = await stack.enter_async_context(
                        litellm_served(litellm[0], home, fake, START_TIMEOUT_S)
                    )
                if served is not None:
                    out.startup_s["litellm"] = served[2]
                await run_gateways(args, home, fake, out, [served[0]] if served else [])
                if served is not None:
                    out.memory["litellm"] = tree_memory(served[1].process.pid)
    print_report(args, out, time.monotonic() - started)
    return 0 if not out.failures else 1


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = new_parser("bench.proxy", __doc__)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per cell")
    parser.add_argument("--concurrency", type=positive_list, default=[1, 64])
    parser.add_argument("--rounds", type=int, default=3, help="parts of each cell, in turns")
    parser.add_argument(
        "--workers", type=positive_list, default=[1, 2], help="gateway worker counts"
    )
    parser.add_argument(
        "--limits",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also the gateway (one worker) with rate limits on vs off",
    )
    parser.add_argument("--skip-litellm", action="store_true", help="no LiteLLM column")
    parser.add_argument(
        "--baseline", metavar="REF", help="also the gateway as of this git commit (one worker)"
    )
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.rounds < 1:
        parser.error("--duration and --rounds must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.loop = event_loop()
    return run_main(run, args)


if __name__ == "__main__":
    sys.exit(main())
