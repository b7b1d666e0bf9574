"""`llm-gateway serve`: bring the database up to date, then serve HTTP, in one process or
in N worker processes sharing one port (SO_REUSEPORT) under a small supervisor."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import multiprocessing
import os
import secrets
import shutil
import signal
import tempfile
import time
import uuid
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from types import FrameType

from aiohttp import web

from gateway.app import create_app
from gateway.config import Config
from gateway.embedded import gateway_home, resolve_services
from gateway.logs import configure_logging
from gateway.metrics import MULTIPROC_ENV
from ledger import accounts, catalog_sync, migrations
from ledger.db import connect

log = logging.getLogger(__name__)

DEMO_ORGANIZATION_ID = uuid.UUID("00000000-0000-4000-8000-00000000d3e0")  # fixed: one demo org
RESTARTS_PER_MINUTE = 5  # a worker that keeps dying is not restarted faster than this
# The cycle collector's young-generation threshold once serving (Python's default is 700):
# 64 calls in flight keep some 30 000 objects alive, so at 700 it ran every few calls and
# rescanned them; at this it runs about every 20 000 allocations. Measured against the
# default (start-up objects frozen in both) in alternating rounds at concurrency 64:
# +4% calls per second, -7% worker CPU per call.
GC_YOUNG_THRESHOLD = 20_000


@dataclass(frozen=True)
class Worker:
    """What each serving process needs; picklable, so workers can be spawned."""

    config: Config
    host: str
    port: int
    database_url: str
    redis_url: str
    admin_key: str
    sandbox: bool
    reuse_port: bool


async def bootstrap(database_url: str, config: Config) -> None:
    """Migrate and sync the catalog; safe to run from many processes at once."""
    async with connect(database_url) as conn:
        applied = await migrations.up(conn)
        if applied:
            log.info("applied migrations %s", [m.version for m in applied])
        await catalog_sync.seed(conn, config)


async def create_demo(database_url: str) -> str:
    """The demo organization on the pro plan (created once) and a fresh key for it."""
    async with connect(database_url) as conn:
        await accounts.create_organization(
            conn, "Demo organization", "pro", organization_id=DEMO_ORGANIZATION_ID
        )
        return (await accounts.create_api_key(conn, DEMO_ORGANIZATION_ID, "demo")).key


def admin_key() -> str:
    """$GATEWAY_ADMIN_KEY, else one generated once and kept in $GATEWAY_HOME/admin_key."""
    key = os.environ.get("GATEWAY_ADMIN_KEY")
    if key:
        return key
    path = gateway_home() / "admin_key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(32))
        path.chmod(0o600)
    return path.read_text().strip()


def _fast_event_loop() -> None:
    """uvloop where it is installed: about a quarter more requests per CPU second here."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run_worker(worker: Worker) -> None:
    """Serve until SIGTERM/SIGINT: then stop accepting, let in-flight calls finish (up to
    server.shutdown_timeout_s), settle or release what is left, close the pools."""
    configure_logging()
    _fast_event_loop()
    try:
        asyncio.run(_serve_until_stopped(worker))
    finally:
        for handler in logging.getLogger().handlers:  # a spawned worker skips logging's atexit
            handler.flush()


async def _serve_until_stopped(worker: Worker) -> None:
    app = create_app(
        worker.config,
        database_url=worker.database_url,
        redis_url=worker.redis_url,
        admin_key=worker.admin_key,
        sandbox=worker.sandbox,
    )
    runner = web.AppRunner(
        app,
        handle_signals=False,  # our own handlers: a second signal must not cut the drain short
        shutdown_timeout=worker.config.server.shutdown_timeout_s,
        access_log=None,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, worker.host, worker.port, reuse_port=worker.reuse_port or None)
        await site.start()
        _settle_heap()
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stopping.set)  # a repeated signal changes nothing
        await stopping.wait()
        log.info(
            "stopping: draining in-flight calls for up to %s s",
            worker.config.server.shutdown_timeout_s,
        )
    finally:
        await runner.cleanup()


def _settle_heap() -> None:
    """Once serving: what start-up made (modules, the app, the pools) lives as long as the
    process, so it is frozen out of the cycle collector's sight, and its full passes scan only
    what calls made; and young collections run less often (GC_YOUNG_THRESHOLD)."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def serve(config: Config, args: argparse.Namespace) -> int:
    services = resolve_services()
    try:
        asyncio.run(bootstrap(services.database_url, config))
        host = args.host or config.server.host
        port = args.port if args.port is not None else config.server.port
        admin = admin_key()
        if args.demo:
            _print_demo(host, port, asyncio.run(create_demo(services.database_url)), admin)
        worker = Worker(
            config,
            host,
            port,
            services.database_url,
            services.redis_url,
            admin,
            args.sandbox,
            reuse_port=args.workers > 1,
        )
        if args.workers > 1:
            return Supervisor(worker, args.workers).run()
        run_worker(worker)
        return 0
    finally:
        services.stop()


class Supervisor:
    """N spawned workers on one port; SIGTERM/SIGINT are passed on and waited for. A worker
    that dies is replaced (at most RESTARTS_PER_MINUTE a minute)."""

    def __init__(self, worker: Worker, count: int) -> None:
        self.worker = worker
        self.count = count
        self.context = multiprocessing.get_context("spawn")  # fresh interpreters: no
        # inherited event loop, atexit hooks or single-process metrics
        self.processes: list[BaseProcess] = []
        self.signalled: set[int] = set()
        self.stopping = False
        self.restarts: list[float] = []

    def run(self) -> int:
        metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
        os.environ[MULTIPROC_ENV] = metrics_dir  # read by each worker's prometheus_client
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        try:
            for _ in range(self.count):
                if self.stopping:  # a signal during start-up: start no more
                    break
                self.processes.append(self._spawn())
            log.info(
                "serving on %s:%d with %d workers", self.worker.host, self.worker.port, self.count
            )
            while not self.stopping:
                self._replace_dead()
                time.sleep(0.2)
            self._forward(signal.SIGTERM)
            return self._wait_all()
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)

    def _spawn(self) -> BaseProcess:
        process = self.context.Process(target=run_worker, args=(self.worker,), daemon=False)
        process.start()
        return process

    def _replace_dead(self) -> None:
        from prometheus_client import multiprocess

        for index, process in enumerate(self.processes):
            if process.is_alive() or self.stopping:
                continue
            multiprocess.mark_process_dead(process.pid)  # type: ignore[no-untyped-call]
            now = time.monotonic()
            self.restarts = [t for t in self.restarts if now - t < 60] + [now]
            if len(self.restarts) > RESTARTS_PER_MINUTE:
                log.error("workers keep dying; stopping")
                self._stop(signal.SIGTERM, None)
                return
            log.warning("worker %s exited with %s; starting another", process.pid, process.exitcode)
            self.processes[index] = self._spawn()

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True
        self._forward(signal.SIGTERM)

    def _forward(self, signum: int) -> None:
        """Signal each live worker once (a worker may already have had it from systemd)."""
        for process in self.processes:
            pid = process.pid
            if pid is not None and pid not in self.signalled and process.is_alive():
                self.signalled.add(pid)
                os.kill(pid, signum)

    def _wait_all(self) -> int:
        deadline = time.monotonic() + self.worker.config.server.shutdown_timeout_s + 10
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.error("worker %s did not stop in time; killing it", process.pid)
                process.kill()
                process.join()
        failed = [p.exitcode for p in self.processes if p.exitcode not in (0, -signal.SIGTERM)]
        return 1 if failed else 0


def _print_demo(host: str, port: int, key: str, admin: str) -> None:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # where a local client goes
    base = f"http://{shown}:{port}"
    print(
        f"""
Gateway on {base} (sandbox: every provider is simulated, nothing is billed upstream)
  demo organization key: {key}
  admin key:             {admin}

  curl {base}/v1/chat/completions -H "Authorization: Bearer {key}" \\
       -H "Content-Type: application/json" \\
       -d '{{"messages": [{{"role": "user", "content": "Hello"}}]}}'

  python -c "import openai; c = openai.OpenAI(base_url='{base}/v1', api_key='{key}'); \\
print(c.chat.completions.create(model='auto', messages=[{{'role': 'user', 'content': 'Hi'}}]))"
""",
        flush=True,
    )
