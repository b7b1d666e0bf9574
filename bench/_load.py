"""Helpers of ``bench.proxy``: a fast fake OpenAI upstream, the child processes (each
started, measured and stopped by its pid), the gateway's PostgreSQL and Redis, the load
generator with its statistics, and LiteLLM's virtualenv and configuration.

The fake runs in a process of its own: ``python -m bench._load PORT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import psutil  # type: ignore[import-untyped]
import yaml
from aiohttp import web
from redis.asyncio import Redis

from gateway.config import load_config
from gateway.embedded import EmbeddedPostgres, EmbeddedRedis
from ledger import catalog_sync, migrations
from ledger.accounts import create_api_key, create_organization
from ledger.check import Violation, check_ledger
from ledger.transactions import TransactionType, post
from policies.rate_limit import keys
from tests.support import create_database, drop_database, postgres_reachable, redis_reachable

MODEL = "gpt-4o-mini"
USAGE = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
REQUEST_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
ERROR_SAMPLES = 5  # distinct error messages kept per cell
MODES = ("plain", "stream")
INSTALL_TIMEOUT_S = 1200.0


# --- the fake upstream --------------------------------------------------------------------


def _envelope(kind: str) -> dict[str, Any]:
    return {"id": "chatcmpl-bench", "object": kind, "created": int(time.time()), "model": MODEL}


def _chat_body() -> bytes:
    message = {"role": "assistant", "content": "Hello there, bench!", "refusal": None}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
    return json.dumps(
        {**_envelope("chat.completion"), "choices": [choice], "usage": USAGE}
    ).encode()


def _stream_body(include_usage: bool) -> bytes:
    """A short SSE stream: role, two pieces, finish; then the usage chunk when asked."""
    head = _envelope("chat.completion.chunk")
    tail: dict[str, Any] = {"usage": None} if include_usage else {}
    deltas: list[tuple[dict[str, Any], str | None]] = [
        ({"role": "assistant", "content": ""}, None),
        ({"content": "Hello there,"}, None),
        ({"content": " bench!"}, None),
        ({}, "stop"),
    ]
    chunks = [
        {**head, "choices": [{"index": 0, "delta": d, "finish_reason": f}], **tail}
        for d, f in deltas
    ]
    if include_usage:
        chunks.append({**head, "choices": [], "usage": USAGE})
    frames = [f"data: {json.dumps(chunk)}\n\n" for chunk in chunks] + ["data: [DONE]\n\n"]
    return "".join(frames).encode()


def fake_upstream_app() -> web.Application:
    """POST /v1/chat/completions with fixed answers, prepared once: the cheapest upstream."""
    plain, stream, stream_usage = _chat_body(), _stream_body(False), _stream_body(True)

    async def chat(request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        if not body.get("stream"):
            return web.Response(body=plain, content_type="application/json")
        include = bool((body.get("stream_options") or {}).get("include_usage"))
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        await response.write(stream_usage if include else stream)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


# --- child processes ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Child:
    """A process this benchmark started, and when."""

    name: str
    process: subprocess.Popen[bytes]
    started: float  # time.monotonic() just before it was spawned
    log: Path

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


@contextlib.contextmanager
def spawned(name: str, argv: Sequence[str], env: dict[str, str], log: Path) -> Iterator[Child]:
    """Run `argv` with its output in `log`; on the way out stop it and its children."""
    with log.open("wb") as out:
        started = time.monotonic()
        process = subprocess.Popen(list(argv), env=env, stdout=out, stderr=subprocess.STDOUT)
    child = Child(name, process, started, log)
    try:
        yield child
    finally:
        stop(child)


def stop(child: Child) -> None:
    """SIGTERM the process, then its leftover children; SIGKILL whatever outlives the wait."""
    if child.process.poll() is not None:
        return
    try:
        descendants = psutil.Process(child.process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    child.process.send_signal(signal.SIGTERM)
    try:
        child.process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        child.process.kill()
        child.process.wait()
    for proc in descendants:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(descendants, timeout=5)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


@dataclass(frozen=True)
class Memory:
    """Resident memory of a process tree: RSS summed (shared pages counted in every process
    that maps them) and PSS summed (shared pages split between their processes)."""

    rss: int
    pss: int
    processes: int


def tree_memory(pid: int) -> Memory:
    """The memory of a process and all its descendants."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return Memory(0, 0, 0)
    rss = pss = count = 0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            info = proc.memory_full_info()
            rss, pss, count = rss + int(info.rss), pss + int(getattr(info, "pss", 0)), count + 1
    return Memory(rss, pss, count)


async def wait_listeners(pid: int, port: int, count: int, timeout_s: float = 60.0) -> int:
    """Wait until `count` processes of the tree under `pid` listen on `port` (each worker of
    a multi-process server binds its own socket once it is ready); how many do."""
    deadline = time.monotonic() + timeout_s
    listening = 0
    while time.monotonic() < deadline:
        listening = 0
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    listening += any(
                        c.status == psutil.CONN_LISTEN and c.laddr.port == port
                        for c in proc.net_connections(kind="tcp")
                    )
        if listening >= count:
            break
        await asyncio.sleep(0.05)
    return listening


async def wait_port(port: int, child: Child, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child.process.poll() is not None:
            raise RuntimeError(f"{child.name} exited:\n{child.log_tail()}")
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{child.name} did not listen on {port} within {timeout_s:g} s")


# --- the gateway's services --------------------------------------------------------------


@contextlib.asynccontextmanager
async def postgres_server(home: Path) -> AsyncIterator[tuple[str, str]]:
    """A server URL and where it is: DATABASE_URL when reachable, else an embedded one."""
    url = os.environ.get("DATABASE_URL", "")
    if url and await postgres_reachable(url):
        parts = urlsplit(url)
        yield url, f"DATABASE_URL ({parts.hostname or 'socket'}:{parts.port or 5432})"
        return
    if url:
        print("DATABASE_URL is set but not reachable: starting an embedded PostgreSQL")
    pg = EmbeddedPostgres(home / "pg").start()
    try:
        yield pg.dsn, "embedded PostgreSQL"
    finally:
        pg.stop()


@contextlib.asynccontextmanager
async def bench_database(server_url: str) -> AsyncIterator[str]:
    name = f"gwbench_{secrets.token_hex(4)}"
    url = await create_database(server_url, name)
    try:
        yield url
    finally:
        await drop_database(server_url, name)


@contextlib.contextmanager
def redis_server(home: Path) -> Iterator[str]:
    """REDIS_URL when reachable, else an embedded Redis (outside the gateway's process tree,
    so that its memory is not counted as the gateway's)."""
    url = os.environ.get("REDIS_URL", "")
    if url and redis_reachable(url):
        yield url
        return
    redis = EmbeddedRedis(home / "redis").start()
    try:
        yield redis.url
    finally:
        redis.stop()


async def prepare_gateway(
    url: str, config: Path, plan: str, topup_micro: int
) -> tuple[uuid.UUID, str]:
    """Migrate and seed the bench database; an organization on the plan, topped up, a key."""
    conn = await asyncpg.connect(url)
    try:
        await migrations.up(conn)
        await catalog_sync.seed(conn, load_config(config))
        org = await create_organization(conn, "proxy bench", plan)
        await post(conn, org.id, TransactionType.TOPUP_PURCHASE, topup_micro, "bench-topup")
        key = await create_api_key(conn, org.id, "bench")
    finally:
        await conn.close()
    return org.id, key.key


async def postgres_settings(url: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        version = await conn.fetchval("SHOW server_version")
        rows = await conn.fetch(
            """SELECT name, current_setting(name) AS value FROM pg_settings
                WHERE name IN ('fsync', 'synchronous_commit', 'shared_buffers') ORDER BY name"""
        )
    finally:
        await conn.close()
    settings = " ".join(f"{row['name']}={row['value']}" for row in rows)
    return f"gateway PostgreSQL {version}: {settings}"


def write_config(
    source: Path, path: Path, fake_base: str, prefix: str, limits: dict[str, dict[str, Any]]
) -> None:
    """`source` (the repo's config.yaml) with the openai provider aimed at the fake, Redis keys
    under `prefix`, and `limits` ({plan: {capability: {rpm, rpd}}}) over the plans' own."""
    data = yaml.safe_load(source.read_text())
    data["providers"]["openai"]["api_base"] = fake_base
    data["rate_limits"]["key_prefix"] = prefix
    for plan, capabilities in limits.items():
        for capability, values in capabilities.items():
            data["plans"][plan]["capabilities"][capability] |= values
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def gateway_argv(config: Path, port: int, workers: int) -> list[str]:
    script = Path(sys.executable).parent / "llm-gateway"
    head = [str(script)] if script.exists() else [sys.executable, "-m", "gateway"]
    tail = ["--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    return [*head, "serve", "--config", str(config), *tail]


def gateway_env(home: Path, database_url: str, redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_CONFIG"}
    return env | {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "GATEWAY_ADMIN_KEY": secrets.token_urlsafe(24),
        "GATEWAY_HOME": str(home / "gateway-home"),
        "OPENAI_API_KEY": "sk-bench",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    }


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


# --- the load -----------------------------------------------------------------------------


@dataclass
class Endpoint:
    """Where a target takes chat completions; `responses` counts every HTTP answer."""

    name: str
    url: str
    key: str
    responses: int = 0
    non_200: int = 0


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

    def ms(self, q: float) -> float:
        return percentile(self.latencies, q) * 1000 if self.latencies else float("nan")

    def fail(self, problem: str) -> None:
        self.errors += 1
        if problem not in self.error_samples and len(self.error_samples) < ERROR_SAMPLES:
            self.error_samples.append(problem)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


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
    session: aiohttp.ClientSession, endpoint: Endpoint, body: bytes, stream: bool
) -> tuple[float, str | None]:
    """One chat completion read to its end: (seconds, what was wrong or None)."""
    headers = {"Authorization": f"Bearer {endpoint.key}", "Content-Type": "application/json"}
    start = time.perf_counter()
    try:
        async with session.post(endpoint.url, data=body, headers=headers) as resp:
            payload = await resp.read()
            status = resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        return time.perf_counter() - start, f"{type(exc).__name__}: {exc}"
    elapsed = time.perf_counter() - start
    endpoint.responses += 1
    endpoint.non_200 += status != 200
    return elapsed, _problem(status, payload, stream)


def client_session(concurrency: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=max(concurrency, 1), limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    return aiohttp.ClientSession(connector=connector, timeout=timeout)


async def drive(
    session: aiohttp.ClientSession, endpoint: Endpoint, stream: bool, cell: Cell, seconds: float
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
    async with client_session(concurrency) as session:
        warm = Cell(endpoint.name, cell.mode, concurrency)
        await drive(session, endpoint, stream, warm, warmup_s)
        await drive(session, endpoint, stream, cell, seconds)
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
    print(f"{head} {'req/s':>8} {'rounds':>11} {'p50 ms':>8} {'p99 ms':>8}")
    for c in cells:
        spread = f"{min(c.rounds):.0f}-{max(c.rounds):.0f}" if c.rounds else "-"
        print(
            f"{c.target:<10} {c.mode:<6} {c.concurrency:>4} {len(c.latencies):>8} {c.errors:>6} "
            f"{c.rate:>8.0f} {spread:>11} {c.ms(0.5):>8.2f} {c.ms(0.99):>8.2f}"
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
    async with client_session(1) as session:
        while time.monotonic() < deadline:
            if child.process.poll() is not None:
                raise RuntimeError(f"{child.name} exited:\n{child.log_tail()}")
            _, problem = await call(session, endpoint, body, False)
            if problem is None:
                return time.monotonic() - child.started
            await asyncio.sleep(0.02)
    raise RuntimeError(f"{child.name}: no good answer within {timeout_s:g} s\n{child.log_tail()}")


# --- LiteLLM ------------------------------------------------------------------------------


def _litellm_version(python: Path) -> str | None:
    probe = "import importlib.metadata as m, fastapi, uvicorn; print(m.version('litellm'))"
    if not python.exists():
        return None
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def ensure_litellm(venv: Path) -> tuple[Path, str] | None:
    """The LiteLLM venv's bin directory and version, installing it the first time."""
    bin_dir = venv / "bin"
    version = _litellm_version(bin_dir / "python")
    if version and (bin_dir / "litellm").exists():
        return bin_dir, version
    print(f"installing litellm[proxy] into {venv} (once; may take minutes)", flush=True)
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(bin_dir / "pip"), "install", "--quiet", "litellm[proxy]"],
    ]
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            print(f"LiteLLM skipped: {' '.join(step)}: {exc}")
            return None
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).splitlines()[-15:])
            print(f"LiteLLM skipped: {' '.join(step)} failed:\n{tail}")
            return None
    version = _litellm_version(bin_dir / "python")
    return (bin_dir, version) if version else None


def litellm_config(home: Path, fake_base: str) -> Path:
    entry = {
        "model_name": MODEL,
        "litellm_params": {"model": f"openai/{MODEL}", "api_base": fake_base, "api_key": "sk"},
    }
    path = home / "litellm.yaml"
    path.write_text(yaml.safe_dump({"model_list": [entry]}, sort_keys=False))
    return path


def litellm_env(master_key: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    return keep | {
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_LOG": "ERROR",
        "LITELLM_MASTER_KEY": master_key,  # it refuses to start without one
    }


def main() -> None:
    port = int(sys.argv[1])
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    web.run_app(fake_upstream_app(), host="127.0.0.1", port=port, print=None, access_log=None)


if __name__ == "__main__":
    main()
