"""The processes and servers the benches run against: child processes (each started,
measured and stopped by its pid), PostgreSQL and Redis (from the environment when
reachable, else embedded), and the gateway's command line, environment and configuration."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil  # type: ignore[import-untyped]
import yaml
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.embedded import EmbeddedPostgres, EmbeddedRedis
from tests.support import postgres_reachable, redis_reachable

STOP_TIMEOUT_S = 15.0
SCAN_COUNT = 1000

# --- child processes ----------------------------------------------------------------------


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


def tree_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of a process and its descendants so far."""
    if pid is None:
        return None
    try:
        root = psutil.Process(pid)
        return _cpu_s([root, *root.children(recursive=True)])
    except psutil.NoSuchProcess:
        return None


def postgres_cpu_s() -> float:
    """User + system CPU seconds of every PostgreSQL process of this machine so far (the
    server the gateways use; the bench runs one)."""
    names = ("postgres", "postgres.bin")
    return _cpu_s([p for p in psutil.process_iter(["name"]) if p.info["name"] in names])


def _cpu_s(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


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


# --- PostgreSQL and Redis -----------------------------------------------------------------


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


@contextlib.contextmanager
def redis_url() -> Iterator[tuple[str, str]]:
    """REDIS_URL and where it is when reachable, else an embedded Redis in a temp directory."""
    url = os.environ.get("REDIS_URL", "")
    if url and redis_reachable(url):
        parts = urlsplit(url)
        yield url, f"REDIS_URL ({parts.hostname or 'socket'}:{parts.port or 6379})"
        return
    if url:
        print("REDIS_URL is set but not reachable: starting an embedded Redis")
    with tempfile.TemporaryDirectory(prefix="gwrl-", ignore_cleanup_errors=True) as home:
        server = EmbeddedRedis(Path(home) / "redis").start()
        try:
            yield server.url, "embedded Redis"
        finally:
            server.stop()


@contextlib.asynccontextmanager
async def redis_client(url: str, timeout_s: float) -> AsyncIterator[Redis]:
    """A client set up as the gateway's (gateway.resources.redis_client)."""
    client: Redis = Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=30,
        retry=Retry(NoBackoff(), 1),
    )
    try:
        yield client
    finally:
        await client.aclose()


async def delete_prefix(client: Redis, prefix: str) -> int:
    """Delete every key under `prefix`; how many there were."""
    deleted = 0
    batch: list[bytes] = []
    async for key in client.scan_iter(match=f"{prefix}*", count=SCAN_COUNT):
        batch.append(key)
        if len(batch) >= SCAN_COUNT:
            deleted += await client.unlink(*batch)
            batch.clear()
    if batch:
        deleted += await client.unlink(*batch)
    return deleted


# --- the gateway --------------------------------------------------------------------------


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
