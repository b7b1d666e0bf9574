"""GET /metrics end to end: requests made with the real openai SDK are counted without any
organization id or key in the exposition, and a real Prometheus (Debian's `prometheus`
package) scrapes the gateway and answers the request count through its query API; the
Grafana dashboard's queries run on it too."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway.conftest import Gateway, Org, new_org
from tests.support import REPO

REQUESTS = 3
PROMETHEUS_MISSING = "Debian's prometheus package is not installed (.ci/run installs it)"
START_TIMEOUT_S = 30.0
SCRAPED_TIMEOUT_S = 30.0
POLL_S = 0.2


@pytest.fixture(scope="module")
async def traffic(sandbox_gateway: Gateway, pool: asyncpg.Pool) -> Org:
    """REQUESTS chat completions by a new organization, through the real openai SDK."""
    org = await new_org(pool)
    async with openai.AsyncOpenAI(
        base_url=sandbox_gateway.v1, api_key=org.key, max_retries=0
    ) as sdk:
        for n in range(REQUESTS):
            await sdk.chat.completions.create(
                model="auto", messages=[{"role": "user", "content": f"Question {n}?"}]
            )
    return org


async def test_metrics_count_the_requests_without_organization_or_key(
    sandbox_gateway: Gateway, traffic: Org
) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(sandbox_gateway.url + "/metrics") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            text = await response.text()
    assert str(traffic.id) not in text and traffic.id.hex not in text
    assert traffic.key not in text
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    assert not [name for s in samples for name in s.labels if "org" in name or "key" in name]
    requests = [s for s in samples if s.name == "gateway_requests_total"]
    assert {frozenset(s.labels) for s in requests} == {
        frozenset({"capability", "quality", "model", "status"})
    }
    assert sum(s.value for s in requests if s.labels["status"] == "200") == REQUESTS
    credits = [s for s in samples if s.name == "gateway_credits_consumed_total"]
    assert sum(s.value for s in credits if s.labels["plan"] == "pro") > 0


def prometheus_binary() -> str | None:
    found = shutil.which("prometheus")
    if found:
        return found
    return "/usr/bin/prometheus" if Path("/usr/bin/prometheus").is_file() else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def query(http: aiohttp.ClientSession, base: str, promql: str) -> dict[str, Any]:
    async with http.get(f"{base}/api/v1/query", params={"query": promql}) as response:
        body: dict[str, Any] = await response.json()
        return body


async def wait_ready(proc: asyncio.subprocess.Process, base: str, log: Path) -> None:
    deadline = asyncio.get_running_loop().time() + START_TIMEOUT_S
    async with aiohttp.ClientSession() as http:
        while asyncio.get_running_loop().time() < deadline:
            if proc.returncode is not None:
                pytest.fail(f"prometheus exited with {proc.returncode}:\n{log.read_text()}")
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(base + "/-/ready") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(POLL_S)
    pytest.fail(f"prometheus was not ready in {START_TIMEOUT_S}s:\n{log.read_text()}")


@pytest.fixture(scope="module")
async def prometheus(
    sandbox_gateway: Gateway, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[str]:
    """A real Prometheus scraping the gateway every second; yields its base URL."""
    binary = prometheus_binary()
    if binary is None:
        pytest.skip(PROMETHEUS_MISSING)
    home = tmp_path_factory.mktemp("prometheus")
    target = sandbox_gateway.url.removeprefix("http://")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "llm-gateway",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [target]}],
            }
        ],
    }
    (home / "prometheus.yml").write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{free_port()}"
    log = home / "prometheus.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            binary,
            f"--config.file={home / 'prometheus.yml'}",
            f"--storage.tsdb.path={home / 'data'}",
            f"--web.listen-address={address}",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
    try:
        await wait_ready(proc, f"http://{address}", log)
        yield f"http://{address}"
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def test_prometheus_scrapes_the_request_count(prometheus: str, traffic: Org) -> None:
    promql = 'sum(gateway_requests_total{status="200"})'
    deadline = asyncio.get_running_loop().time() + SCRAPED_TIMEOUT_S
    last: dict[str, Any] = {}
    async with aiohttp.ClientSession() as http:
        while asyncio.get_running_loop().time() < deadline:
            last = await query(http, prometheus, promql)
            assert last["status"] == "success", last
            result = last["data"]["result"]
            if result and float(result[0]["value"][1]) == REQUESTS:
                break
            await asyncio.sleep(POLL_S)
        else:
            pytest.fail(f"{promql} never returned {REQUESTS}: {last}")
        up = await query(http, prometheus, 'up{job="llm-gateway"}')
    assert [float(r["value"][1]) for r in up["data"]["result"]] == [1.0]


async def test_the_dashboard_queries_run_on_prometheus(prometheus: str) -> None:
    board = json.loads((REPO / "deploy" / "grafana-dashboard.json").read_text())
    expressions = [
        target["expr"]
        for panel in board["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    assert expressions
    async with aiohttp.ClientSession() as http:
        for expr in expressions:
            promql = expr.replace("$__rate_interval", "1m").replace("$job", ".*")
            answer = await query(http, prometheus, promql)
            assert answer["status"] == "success", (promql, answer)
