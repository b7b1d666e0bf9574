"""Helpers of ``bench.proxy``: a fast fake OpenAI upstream, the child processes (each
started, measured and stopped by its pid), the gateway's PostgreSQL and Redis, and the load
generator with its statistics.

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
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import psutil  # type: ignore[import-untyped]
from aiohttp import web

from gateway.embedded import EmbeddedPostgres, EmbeddedRedis
from tests.support import create_database, drop_database, postgres_reachable, redis_reachable

MODEL = "gpt-4o-mini"
USAGE = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
REQUEST_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
ERROR_SAMPLES = 5  # distinct error messages kept per cell


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


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += int(proc.memory_info().rss)
    return total


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

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def ms(self, q: float) -> float:
        return percentile(self.latencies, q) * 1000 if self.latencies else float("nan")

    def fail(self, problem: str) -> None:
        self.errors += 1
        if problem not in self.error_samples and len(self.error_samples) < ERROR_SAMPLES:
            self.error_samples.append(problem)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


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


def main() -> None:
    port = int(sys.argv[1])
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    web.run_app(fake_upstream_app(), host="127.0.0.1", port=port, print=None, access_log=None)


if __name__ == "__main__":
    main()
