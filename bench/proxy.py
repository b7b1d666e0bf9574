"""What the gateway costs per call, against calling the upstream directly and against the
LiteLLM proxy, all three in front of one fast fake OpenAI upstream.

Targets, measured in one run and one after the other (each server stopped before the next):

* direct: the client calls the fake upstream itself (the baseline);
* gateway: ``llm-gateway serve`` with every feature on: API-key authentication, plan
  policy, a credit reservation in PostgreSQL before the call and its settlement after it
  (an organization on the ``team`` plan, no rate limits, topped up far beyond the run);
* litellm: the LiteLLM proxy (``litellm[proxy]`` from PyPI, in its own virtualenv under
  ``.gateway/bench-litellm-venv``, no database, checking a master key, ``LITELLM_LOG=ERROR``).

The fake upstream, the gateway and LiteLLM each run in their own process; the fake answers
``POST /v1/chat/completions`` with a fixed small body carrying usage, or a short SSE stream
with a usage chunk when ``stream_options.include_usage`` is set. The same request (model
``gpt-4o-mini``, ``max_tokens`` 16) goes to every target, non-streaming ("plain") and
streaming with ``include_usage`` ("stream"), at each ``--concurrency`` (closed loop: every
worker sends its next request when the last one is read to its end), for ``--duration``
seconds after a one-second warm-up.

Reading the output: ``req/s`` is completed requests over wall time; ``p50``/``p99`` are
per-request latencies (a stream counts until its last byte). The overhead of a proxy is
its latency minus the direct latency at concurrency 1, where nothing queues; the throughput
ratios at the highest concurrency show what each proxy sustains relative to the other and to
the bare upstream. Memory is the resident set of each server process and its children after
its load; start-up is from spawning the process to its first good answer (the gateway's
database is migrated beforehand). The client, the fake and the server share this machine's
few cores, so absolute numbers describe this machine; compare the ratios.

Correctness is checked on the way: every gateway answer must be 200 with usage, and after
the run the ledger invariant (``ledger.check``) must hold on the bench database and the
organization must have exactly one consumption entry per gateway request. The exit status
is 1 when any of that fails. The bench database is dropped at the end, even on error.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import yaml

from bench._load import (
    Cell,
    Endpoint,
    bench_database,
    first_success,
    free_port,
    measure,
    postgres_server,
    redis_server,
    spawned,
    tree_rss,
    wait_port,
)
from gateway.config import load_config
from ledger import catalog_sync, migrations
from ledger.accounts import create_api_key, create_organization
from ledger.check import check_ledger
from ledger.transactions import TransactionType, post

REPO = Path(__file__).resolve().parent.parent
LITELLM_VENV = REPO / ".gateway" / "bench-litellm-venv"
TOPUP_MICRO = 10**13  # ten million credits: no reservation is ever refused
WARMUP_S = 1.0
START_TIMEOUT_S = 180.0
INSTALL_TIMEOUT_S = 1200.0
PLAN = "team"


@dataclass
class Outcome:
    cells: list[Cell] = field(default_factory=list)
    startup_s: dict[str, float] = field(default_factory=dict)
    rss: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # the gateway's: the exit status
    notes: list[str] = field(default_factory=list)


async def load_target(endpoint: Endpoint, args: argparse.Namespace, out: Outcome) -> None:
    for stream in (False, True):
        for concurrency in args.concurrency:
            cell = await measure(endpoint, stream, concurrency, args.duration, WARMUP_S)
            print(
                f"  {cell.target:<8} {cell.mode:<6} x{concurrency:<3} {cell.rate:8.0f} req/s"
                f"  p50 {cell.ms(0.5):7.2f} ms  errors {cell.errors}",
                flush=True,
            )
            for sample in cell.error_samples:
                print(f"      error: {sample}", flush=True)
            out.cells.append(cell)


# --- the gateway's services ---------------------------------------------------------------


async def prepare_gateway(url: str) -> tuple[uuid.UUID, str]:
    """Migrate and seed the bench database; an organization on the plan, topped up, a key."""
    conn = await asyncpg.connect(url)
    try:
        await migrations.up(conn)
        await catalog_sync.seed(conn, load_config(REPO / "config.yaml"))
        org = await create_organization(conn, "proxy bench", PLAN)
        await post(conn, org.id, TransactionType.TOPUP_PURCHASE, TOPUP_MICRO, "bench-topup")
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


def gateway_config(home: Path, fake_base: str) -> Path:
    """The repo's config.yaml with the openai provider aimed at the fake."""
    data = yaml.safe_load((REPO / "config.yaml").read_text())
    data["providers"]["openai"]["api_base"] = fake_base
    path = home / "gateway.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def gateway_argv(config: Path, port: int) -> list[str]:
    script = Path(sys.executable).parent / "llm-gateway"
    head = [str(script)] if script.exists() else [sys.executable, "-m", "gateway"]
    return [*head, "serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]


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


async def run_gateway(args: argparse.Namespace, home: Path, fake: str, out: Outcome) -> None:
    async with postgres_server(home) as (server_url, where), bench_database(server_url) as url:
        out.notes.append(f"gateway database: {where}")
        org, key = await prepare_gateway(url)
        out.notes.append(await postgres_settings(url))
        port = free_port()
        endpoint = Endpoint("gateway", f"http://127.0.0.1:{port}/v1/chat/completions", key)
        with redis_server(home) as redis_url:
            env = gateway_env(home, url, redis_url)
            argv = gateway_argv(gateway_config(home, fake), port)
            with spawned("gateway", argv, env, home / "gateway.log") as child:
                out.startup_s["gateway"] = await first_success(endpoint, child, START_TIMEOUT_S)
                await load_target(endpoint, args, out)
                out.rss["gateway"] = tree_rss(child.process.pid)
                log_tail = child.log_tail(10)
        if any(c.errors for c in out.cells if c.target == "gateway") and log_tail:
            out.notes.append("gateway log tail:\n" + log_tail)
        await verify_gateway(url, org, endpoint, out)


async def verify_gateway(url: str, org: uuid.UUID, endpoint: Endpoint, out: Outcome) -> None:
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
    errors = sum(c.errors for c in out.cells if c.target == "gateway")
    out.notes.append(
        f"gateway check: {endpoint.responses} HTTP answers ({endpoint.non_200} not 200, "
        f"{errors} failed requests in all), {entries} consumption entries, "
        f"{pending} pending reservations, ledger invariant "
        + ("held" if not violations else f"BROKEN ({len(violations)} violations)")
    )
    if errors or endpoint.non_200:
        out.failures.append(f"{errors} gateway requests failed ({endpoint.non_200} not 200)")
    if entries != endpoint.responses:
        out.failures.append(f"{entries} consumption entries for {endpoint.responses} requests")
    out.failures += [f"ledger: {v.organization_id} {v.kind}: {v.detail}" for v in violations]


# --- LiteLLM ------------------------------------------------------------------------------


def _litellm_version(python: Path) -> str | None:
    probe = "import importlib.metadata as m, fastapi, uvicorn; print(m.version('litellm'))"
    if not python.exists():
        return None
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def ensure_litellm() -> tuple[Path, str] | None:
    """The LiteLLM venv's bin directory and version, installing it the first time."""
    bin_dir = LITELLM_VENV / "bin"
    version = _litellm_version(bin_dir / "python")
    if version and (bin_dir / "litellm").exists():
        return bin_dir, version
    print(f"installing litellm[proxy] into {LITELLM_VENV} (once; may take minutes)", flush=True)
    steps = [
        [sys.executable, "-m", "venv", str(LITELLM_VENV)],
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
        "model_name": "gpt-4o-mini",
        "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": fake_base, "api_key": "sk"},
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


async def run_litellm(
    args: argparse.Namespace, home: Path, fake: str, bin_dir: Path, out: Outcome
) -> None:
    port = free_port()
    argv = [str(bin_dir / "litellm"), "--config", str(litellm_config(home, fake))]
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    key = f"sk-{secrets.token_hex(32)}"
    endpoint = Endpoint("litellm", f"http://127.0.0.1:{port}/v1/chat/completions", key)
    with spawned("litellm", argv, litellm_env(key), home / "litellm.log") as child:
        try:
            out.startup_s["litellm"] = await first_success(endpoint, child, START_TIMEOUT_S)
        except RuntimeError as exc:
            print(f"LiteLLM skipped: it did not start: {exc}")
            return
        await load_target(endpoint, args, out)
        out.rss["litellm"] = tree_rss(child.process.pid)


# --- the report ---------------------------------------------------------------------------


def print_header(args: argparse.Namespace, litellm: str | None) -> None:
    print("Proxy benchmark: direct to a fake OpenAI upstream vs this gateway vs LiteLLM proxy")
    print(
        f"machine   {os.cpu_count()} CPUs shared by the load client, the fake upstream and the "
        f"server under test (each its own process, none pinned); "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"client    Python {platform.python_version()}, aiohttp {aiohttp.__version__}; "
        f"LiteLLM {litellm or 'skipped'}"
    )
    print(
        f"run       {args.duration:g} s per cell after {WARMUP_S:g} s warm-up; concurrency "
        f"{', '.join(map(str, args.concurrency))}; plain and stream (include_usage)"
    )


def find(cells: Sequence[Cell], target: str, mode: str, concurrency: int) -> Cell | None:
    for cell in cells:
        if (cell.target, cell.mode, cell.concurrency) == (target, mode, concurrency):
            return cell
    return None


def print_table(cells: Sequence[Cell]) -> None:
    print()
    head = f"{'target':<8} {'mode':<6} {'conc':>4} {'requests':>8} {'errors':>6}"
    print(f"{head} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for c in cells:
        print(
            f"{c.target:<8} {c.mode:<6} {c.concurrency:>4} {len(c.latencies):>8} {c.errors:>6} "
            f"{c.rate:>8.0f} {c.ms(0.5):>8.2f} {c.ms(0.99):>8.2f}"
        )
    print()


def print_overheads(cells: Sequence[Cell], low: int) -> None:
    print(f"overhead over direct at concurrency {low} (latency - direct latency):")
    for target in ("gateway", "litellm"):
        parts = []
        for mode in ("plain", "stream"):
            proxy, direct = find(cells, target, mode, low), find(cells, "direct", mode, low)
            if proxy and direct:
                p50 = proxy.ms(0.5) - direct.ms(0.5)
                p99 = proxy.ms(0.99) - direct.ms(0.99)
                parts.append(f"{mode} p50 {p50:+.2f} ms, p99 {p99:+.2f} ms")
        print(f"  {target:<8} " + ("; ".join(parts) or "not measured"))


def print_ratios(cells: Sequence[Cell], high: int) -> None:
    print(f"throughput ratios at concurrency {high}:")
    for other in ("litellm", "direct"):
        parts = []
        for mode in ("plain", "stream"):
            gateway, base = find(cells, "gateway", mode, high), find(cells, other, mode, high)
            if gateway and base and base.rate:
                parts.append(f"{mode} {gateway.rate / base.rate:.2f}")
        print(f"  gateway / {other:<8} " + (", ".join(parts) or "not measured"))


def print_report(args: argparse.Namespace, out: Outcome) -> None:
    print_table(out.cells)
    print_overheads(out.cells, min(args.concurrency))
    print_ratios(out.cells, max(args.concurrency))
    for name in ("gateway", "litellm"):
        rss = out.rss.get(name)
        start = out.startup_s.get(name)
        memory = f"{rss / 2**20:.0f} MiB" if rss else "not measured"
        started = f"{start:.2f} s" if start is not None else "not measured"
        print(f"{name:<8} RSS after load (with children) {memory}; start to 1st answer {started}")
    print()
    for note in out.notes:
        print(note)
    print("RESULT: " + ("ok" if not out.failures else "FAILED"))
    for failure in out.failures[:20]:
        print(f"  {failure}")


async def run(args: argparse.Namespace) -> int:
    litellm = None if args.skip_litellm else ensure_litellm()
    print_header(args, litellm[1] if litellm else None)
    out = Outcome()
    with tempfile.TemporaryDirectory(prefix="gwproxy-", ignore_cleanup_errors=True) as tmp:
        home = Path(tmp)
        port = free_port()
        fake = f"http://127.0.0.1:{port}/v1"
        argv = [sys.executable, "-m", "bench._load", str(port)]
        with spawned("fake upstream", argv, dict(os.environ), home / "fake.log") as child:
            await wait_port(port, child)
            direct = Endpoint("direct", fake + "/chat/completions", "sk-direct")
            await load_target(direct, args, out)
            await run_gateway(args, home, fake, out)
            if litellm:
                await run_litellm(args, home, fake, litellm[0], out)
    print_report(args, out)
    return 0 if not out.failures else 1


def concurrency_list(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers")
    return list(dict.fromkeys(values))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.proxy", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per cell")
    parser.add_argument("--concurrency", type=concurrency_list, default=[1, 64])
    parser.add_argument("--skip-litellm", action="store_true", help="no LiteLLM column")
    args = parser.parse_args(argv)
    if args.duration <= 0:
        parser.error("--duration must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
