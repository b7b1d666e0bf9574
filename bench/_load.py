"""The load of ``bench.proxy``: endpoints called by closed-loop workers, cells of
latencies with their percentiles and ratios, and what a gateway left behind once loaded."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from redis.asyncio import Redis

from bench._cli import percentile
from bench._fake import MODEL
from bench._servers import Child, postgres_cpu_s, tree_cpu_s
from gateway.upstream.http1 import Http1Client, HttpError
from ledger.check import Violation, check_ledger
from policies.rate_limit import keys

REQUEST_TIMEOUT_S = 30.0
ERROR_SAMPLES = 5  # distinct error messages kept per cell
MODES = ("plain", "stream")


@dataclass
class Endpoint:
    """Where a target takes chat completions; `responses` counts every HTTP answer."""

    name: str
    url: str
    key: str
    responses: int = 0
    non_200: int = 0
    pid: int | None = None  # the server's process (tree), whose CPU time each cell measures


@dataclass
class Cell:
    target: str
    mode: str  # plain | stream
    concurrency: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    rounds: list[float] = field(default_factory=list)  # req/s of each part absorbed
    cpu_s: float | None = None  # CPU time the server's processes spent in the timed parts
    db_cpu_s: float = 0.0  # and PostgreSQL's (its backends exit with their connections)
    client_cpu_s: float = 0.0  # and the load client's (this process)

    @property
    def cpu_ms_per_call(self) -> float | None:
        """Server CPU per answered request: robust to the machine's other load, unlike req/s."""
        if self.cpu_s is None or not self.latencies:
            return None
        return self.cpu_s * 1000 / len(self.latencies)

    @property
    def db_ms_per_call(self) -> float | None:
        return self.db_cpu_s * 1000 / len(self.latencies) if self.latencies else None

    @property
    def client_ms_per_call(self) -> float | None:
        return self.client_cpu_s * 1000 / len(self.latencies) if self.latencies else None

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def absorb(self, part: Cell) -> None:
        """Pool a part measured on its own (one round) into this cell."""
        self.seconds += part.seconds
        self.latencies += part.latencies
        self.errors += part.errors
        self.error_samples += [p for p in part.error_samples if p not in self.error_samples]
        self.rounds.append(part.rate)
        if part.cpu_s is not None:
            self.cpu_s = (self.cpu_s or 0.0) + part.cpu_s
        self.db_cpu_s += part.db_cpu_s
        self.client_cpu_s += part.client_cpu_s

    def ms(self, q: float) -> float:
        return percentile(self.latencies, q) * 1000 if self.latencies else float("nan")

    def fail(self, problem: str) -> None:
        self.errors += 1
        if problem not in self.error_samples and len(self.error_samples) < ERROR_SAMPLES:
            self.error_samples.append(problem)


def find(cells: Sequence[Cell], target: str, mode: str, concurrency: int) -> Cell | None:
    for cell in cells:
        if (cell.target, cell.mode, cell.concurrency) == (target, mode, concurrency):
            return cell
    return None


def overhead(cells: Sequence[Cell], target: str, mode: str, low: int, q: float) -> float | None:
    proxy, direct = find(cells, target, mode, low), find(cells, "direct", mode, low)
    return proxy.ms(q) - direct.ms(q) if proxy and direct else None


def ratio(cells: Sequence[Cell], a: str, b: str, mode: str, conc: int, p50: bool) -> float | None:
    """a / b: req/s (or p50 latency) at `conc`."""
    first, second = find(cells, a, mode, conc), find(cells, b, mode, conc)
    if not first or not second or not second.rate:
        return None
    return first.ms(0.5) / second.ms(0.5) if p50 else first.rate / second.rate


def text(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def request_body(stream: bool) -> bytes:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
        "max_tokens": 16,
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return json.dumps(body).encode()


def _problem(status: int, payload: bytes, stream: bool) -> str | None:
    if status != 200:
        return f"HTTP {status}: {payload[:300].decode(errors='replace')}"
    if stream and b"[DONE]" not in payload:
        return "a stream that did not end with [DONE]"
    if b'"prompt_tokens"' not in payload:
        return "an answer without usage"
    return None


async def call(
    session: Http1Client, endpoint: Endpoint, body: bytes, stream: bool
) -> tuple[float, str | None]:
    """One chat completion read to its end: (seconds, what was wrong or None)."""
    headers = (("Authorization", f"Bearer {endpoint.key}"), ("Content-Type", "application/json"))
    start = time.perf_counter()
    try:
        async with session.post(endpoint.url, body, headers) as resp:
            payload = await resp.read()
            status = resp.status
    except (HttpError, OSError) as exc:
        return time.perf_counter() - start, f"{type(exc).__name__}: {exc}"
    elapsed = time.perf_counter() - start
    endpoint.responses += 1
    endpoint.non_200 += status != 200
    return elapsed, _problem(status, payload, stream)


@contextlib.asynccontextmanager
async def client_session() -> AsyncIterator[Http1Client]:
    """The load client: the gateway's own lean HTTP/1.1 client (a keep-alive connection per
    worker), so that the client takes as little as it can of the CPU the servers share."""
    client = Http1Client(connect_timeout_s=REQUEST_TIMEOUT_S, read_timeout_s=REQUEST_TIMEOUT_S)
    try:
        yield client
    finally:
        await client.close()


async def drive(
    session: Http1Client, endpoint: Endpoint, stream: bool, cell: Cell, seconds: float
) -> None:
    """`cell.concurrency` workers calling back to back for `seconds`; results into `cell`."""
    body = request_body(stream)
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            elapsed, problem = await call(session, endpoint, body, stream)
            if problem is None:
                cell.latencies.append(elapsed)
            else:
                cell.fail(problem)

    start = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(cell.concurrency):
            group.create_task(worker())
    cell.seconds = time.perf_counter() - start


async def measure(
    endpoint: Endpoint, stream: bool, concurrency: int, seconds: float, warmup_s: float
) -> Cell:
    """A warm-up (untimed, its errors counted all the same), then the timed run."""
    cell = Cell(endpoint.name, "stream" if stream else "plain", concurrency)
    async with client_session() as session:
        warm = Cell(endpoint.name, cell.mode, concurrency)
        await drive(session, endpoint, stream, warm, warmup_s)
        before, db_before = tree_cpu_s(endpoint.pid), postgres_cpu_s()
        client_before = time.process_time()
        await drive(session, endpoint, stream, cell, seconds)
        cell.client_cpu_s = time.process_time() - client_before
        after, cell.db_cpu_s = tree_cpu_s(endpoint.pid), postgres_cpu_s() - db_before
    if before is not None and after is not None:
        cell.cpu_s = after - before
    cell.errors += warm.errors
    cell.error_samples += [p for p in warm.error_samples if p not in cell.error_samples]
    return cell


async def measure_in_turns(
    endpoints: Sequence[Endpoint],
    stream: bool,
    concurrency: int,
    seconds: float,
    rounds: int,
    warmups_s: tuple[float, float],
) -> list[Cell]:
    """A cell per endpoint, each measured in `rounds` parts of `seconds` after a warm-up
    (the first of `warmups_s` before a cell's first part, the second before the others); the
    endpoints take turns in each round, in reverse order every other round, so that drift
    and bursts of noise fall on all of them alike."""
    cells = [Cell(e.name, MODES[stream], concurrency) for e in endpoints]
    for n in range(rounds):
        turns = list(zip(endpoints, cells, strict=True))
        for endpoint, cell in turns if n % 2 == 0 else turns[::-1]:
            warmup = warmups_s[0] if n == 0 else warmups_s[1]
            cell.absorb(await measure(endpoint, stream, concurrency, seconds, warmup))
    return cells


def print_table(cells: Sequence[Cell]) -> None:
    print()
    head = f"{'target':<10} {'mode':<6} {'conc':>4} {'requests':>8} {'errors':>6}"
    print(
        f"{head} {'req/s':>8} {'rounds':>11} {'p50 ms':>8} {'p99 ms':>8} {'cpu ms/req':>10} "
        f"{'db ms/req':>9} {'client ms/req':>13}"
    )
    for c in cells:
        spread = f"{min(c.rounds):.0f}-{max(c.rounds):.0f}" if c.rounds else "-"
        print(
            f"{c.target:<10} {c.mode:<6} {c.concurrency:>4} {len(c.latencies):>8} {c.errors:>6} "
            f"{c.rate:>8.0f} {spread:>11} {c.ms(0.5):>8.2f} {c.ms(0.99):>8.2f} "
            f"{text(c.cpu_ms_per_call, '.3f'):>10} {text(c.db_ms_per_call, '.3f'):>9} "
            f"{text(c.client_ms_per_call, '.3f'):>13}"
        )
    print()


def print_cell(cell: Cell) -> None:
    rounds = " ".join(f"{rate:.0f}" for rate in cell.rounds)
    print(
        f"  {cell.target:<10} {cell.mode:<6} x{cell.concurrency:<3} {cell.rate:8.0f} req/s"
        f"  p50 {cell.ms(0.5):7.2f} ms  errors {cell.errors}  (rounds: {rounds})",
        flush=True,
    )
    for sample in cell.error_samples:
        print(f"      error: {sample}", flush=True)


async def first_success(endpoint: Endpoint, child: Child, timeout_s: float) -> float:
    """Seconds from the child's spawn to its first good chat completion."""
    body = request_body(False)
    deadline = time.monotonic() + timeout_s
    async with client_session() as session:
        while time.monotonic() < deadline:
            if child.process.poll() is not None:
                raise RuntimeError(f"{child.name} exited:\n{child.log_tail()}")
            _, problem = await call(session, endpoint, body, False)
            if problem is None:
                return time.monotonic() - child.started
            await asyncio.sleep(0.02)
    raise RuntimeError(f"{child.name}: no good answer within {timeout_s:g} s\n{child.log_tail()}")


# --- what a gateway left behind -----------------------------------------------------------


async def take_limiter_log(redis_url: str, prefix: str, org: uuid.UUID, capability: str) -> int:
    """The entries in the organization's day log; then every key under `prefix` is deleted."""
    client: Redis = Redis.from_url(redis_url)
    try:
        entries = int(await client.zcard(keys(prefix, org, capability)[1]))
        stale = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        if stale:
            await client.unlink(*stale)
    finally:
        await client.aclose()
    return entries


async def ledger_state(url: str, org: uuid.UUID) -> tuple[list[Violation], int, int]:
    """The ledger's invariant violations, the organization's consumption entries and the
    reservations still pending, in the database at `url`."""
    conn = await asyncpg.connect(url)
    try:
        violations = await check_ledger(conn)
        entries = await conn.fetchval(
            """SELECT count(*) FROM credit_transactions
                WHERE organization_id = $1 AND transaction_type = 'consumption'""",
            org,
        )
        pending = await conn.fetchval(
            "SELECT count(*) FROM credit_reservations WHERE status = 'pending'"
        )
    finally:
        await conn.close()
    return violations, int(entries), int(pending)


async def gateway_check(
    url: str, org: uuid.UUID, endpoint: Endpoint, errors: int, logged: int, expected_log: int
) -> tuple[str, list[str]]:
    """What a gateway configuration left behind, against what it was asked: a note, and the
    failures (answers not 200, consumption entries other than one per request, rate-limit
    log entries other than `expected_log`, a broken ledger invariant)."""
    violations, entries, pending = await ledger_state(url, org)
    name, answers = endpoint.name, endpoint.responses
    note = (
        f"{name} check: {answers} HTTP answers ({endpoint.non_200} not 200, "
        f"{errors} failed requests in all), {entries} consumption entries, "
        f"{pending} pending reservations, {logged} rate-limit log entries, ledger invariant "
        + ("held" if not violations else f"BROKEN ({len(violations)} violations)")
    )
    failures = [f"{name} ledger: {v.organization_id} {v.kind}: {v.detail}" for v in violations]
    if errors or endpoint.non_200:
        failures.append(f"{name}: {errors} requests failed ({endpoint.non_200} not 200)")
    if entries != answers:
        failures.append(f"{name}: {entries} consumption entries for {answers} requests")
    if logged != expected_log:
        failures.append(f"{name}: {logged} rate-limit log entries, {expected_log} expected")
    return note, failures
