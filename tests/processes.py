"""Running the real `llm-gateway` command in a subprocess, for tests of what only a whole
process shows: signals, workers, crashes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import yaml

from gateway.config import Config

READY_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class GatewayProcess:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def wait(self, timeout_s: float) -> int:
        """The exit code, waiting at most `timeout_s`."""
        return await asyncio.wait_for(asyncio.to_thread(self.process.wait), timeout_s)


def write_config(config: Config, directory: Path) -> Path:
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path


async def _wait_ready(gw: GatewayProcess) -> None:
    deadline = asyncio.get_running_loop().time() + READY_TIMEOUT_S
    async with aiohttp.ClientSession() as http:
        while asyncio.get_running_loop().time() < deadline:
            if gw.process.poll() is not None:
                raise RuntimeError(f"gateway exited with {gw.process.returncode}:\n{gw.log()}")
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(gw.url + "/readyz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"gateway not ready within {READY_TIMEOUT_S} s:\n{gw.log()}")


@contextlib.asynccontextmanager
async def running_gateway(
    config: Config,
    *,
    database_url: str,
    redis_url: str,
    admin_key: str,
    args: tuple[str, ...] = ("--sandbox",),
    env: dict[str, str] | None = None,
) -> AsyncIterator[GatewayProcess]:
    """`llm-gateway serve` on a free port, once ready; stopped (SIGTERM, then SIGKILL) on the
    way out."""
    async with started_gateway(
        config,
        database_url=database_url,
        redis_url=redis_url,
        admin_key=admin_key,
        args=args,
        env=env,
    ) as gw:
        await _wait_ready(gw)
        yield gw


@contextlib.asynccontextmanager
async def started_gateway(
    config: Config,
    *,
    database_url: str,
    redis_url: str,
    admin_key: str,
    args: tuple[str, ...] = ("--sandbox",),
    env: dict[str, str] | None = None,
) -> AsyncIterator[GatewayProcess]:
    """`llm-gateway serve` just started (not yet ready), for tests of its start-up."""
    with tempfile.TemporaryDirectory(prefix="gateway-proc-") as tmp:
        directory = Path(tmp)
        port = free_port()
        log_path = directory / "gateway.log"
        command = [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--config",
            str(write_config(config, directory)),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *args,
        ]
        environment = {
            **os.environ,
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "GATEWAY_ADMIN_KEY": admin_key,
            "GATEWAY_HOME": str(directory),
            **(env or {}),
        }
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                command,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=environment,
                start_new_session=True,
            )
        try:
            yield GatewayProcess(process, f"http://127.0.0.1:{port}", log_path)
        finally:
            _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
