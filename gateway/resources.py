"""Long-lived resources of the app, one cleanup context each, set up beside their teardown."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
from aiohttp import web
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.auth import KeyCache
from gateway.billing import stripe_api
from gateway.config import Config
from gateway.metrics import Metrics
from gateway.notifications import Notifier
from gateway.polling import Poller
from gateway.ratelimit import RateLimiter
from gateway.services import Services
from gateway.upstream.base import Target, UpstreamClient
from gateway.upstream.http1 import Http1Client
from gateway.upstream.openai import OpenAIClient
from gateway.upstream.translated import TranslatedClient
from ledger.db import keep_session
from ledger.group import GroupCommit
from policies.catalog import ProviderKind
from policies.pricing import Rate
from policies.rate_limit import SlidingWindowLimiter

CONFIG = web.AppKey("config", Config)
DATABASE_URL = web.AppKey("database_url", str)
REDIS_URL = web.AppKey("redis_url", str)
ADMIN_KEY = web.AppKey("admin_key", str)
SANDBOX = web.AppKey("sandbox", bool)
METRICS = web.AppKey("metrics", Metrics)
DB_POOL = web.AppKey("db_pool", asyncpg.Pool)
HTTP_SESSION = web.AppKey("http_session", aiohttp.ClientSession)
REDIS = web.AppKey("redis", Redis)
PROVIDER_BASES = web.AppKey("provider_bases", dict[str, str])  # provider name -> api_base
SERVICES = web.AppKey("services", Services)

UPSTREAM_READ_BUFSIZE = 1 << 20  # SSE lines (a large tool call) may be long


async def postgres_pool(app: web.Application) -> AsyncIterator[None]:
    server = app[CONFIG].server
    pool = await asyncpg.create_pool(
        app[DATABASE_URL],
        min_size=server.db_pool_min,
        max_size=server.db_pool_max,
        reset=keep_session,
    )
    app[DB_POOL] = pool
    yield
    await pool.close()


class StartupError(RuntimeError):
    """A service the gateway needs is not there; the message says which and how to fix it."""


def redacted(url: str) -> str:
    """A URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


async def redis_client(app: web.Application) -> AsyncIterator[None]:
    """The Redis connection pool; an unreachable Redis at start-up stops the process."""
    timeout = app[CONFIG].rate_limits.redis_timeout_s
    client: Redis = Redis.from_url(
        app[REDIS_URL],
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        health_check_interval=30,
        retry=Retry(NoBackoff(), 1),  # one quick retry, then the error policy decides
    )
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        await client.aclose()
        raise StartupError(
            f"Redis at {redacted(app[REDIS_URL])} is unreachable ({exc}); "
            "set REDIS_URL to a running Redis, or unset it to use the embedded one"
        ) from None
    app[REDIS] = client
    yield
    await client.aclose()


async def http_session(app: web.Application) -> AsyncIterator[None]:
    """One pooled aiohttp session for Stripe, webhooks and the jobs (OpenAI-compatible
    upstreams go through http1.Http1Client, made in `services`)."""
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30)
    async with aiohttp.ClientSession(
        connector=connector, read_bufsize=UPSTREAM_READ_BUFSIZE, auto_decompress=True
    ) as session:
        app[HTTP_SESSION] = session
        yield


async def provider_bases(app: web.Application) -> AsyncIterator[None]:
    """Where each provider is: its configured api_base, or the simulator in sandbox mode."""
    config = app[CONFIG]
    if not app[SANDBOX]:
        app[PROVIDER_BASES] = {name: p.api_base for name, p in config.providers.items()}
        yield
        return
    from gateway.upstream.sandbox import running_simulator

    async with running_simulator() as bases:
        app[PROVIDER_BASES] = {name: bases[p.kind] for name, p in config.providers.items()}
        yield


def _targets(config: Config, bases: dict[str, str], sandbox: bool) -> dict[str, Target]:
    targets = {}
    for name, model in config.models.items():
        provider = config.providers[model.provider]
        key = "sandbox" if sandbox else os.environ.get(provider.api_key_env)
        targets[name] = Target(
            name, model.upstream, model.provider, provider.kind, bases[model.provider], key
        )
    return targets


def rates(config: Config) -> dict[tuple[str, str], Rate]:
    """Every model's price at every quality level, worked out once rather than per call."""
    return {
        (name, quality): Rate(
            input_usd_per_mtok=model.input_usd_per_mtok,
            output_usd_per_mtok=model.output_usd_per_mtok,
            per_usd=config.credits.per_usd,
            multiplier=level.credit_multiplier,
        )
        for name, model in config.models.items()
        for quality, level in config.quality_levels.items()
    }


async def services(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    timeouts = {
        "timeout_s": config.server.upstream_timeout_s,
        "connect_timeout_s": config.server.upstream_connect_timeout_s,
    }
    translated = TranslatedClient(**timeouts)
    http = Http1Client(
        connect_timeout_s=config.server.upstream_connect_timeout_s,
        read_timeout_s=config.server.upstream_timeout_s,
    )
    clients: dict[ProviderKind, UpstreamClient] = {
        ProviderKind.OPENAI: OpenAIClient(http),
        ProviderKind.ANTHROPIC: translated,
        ProviderKind.GEMINI: translated,
    }
    poll_budget_s = config.server.poll_round_trips_us / 1_000_000
    poller = Poller(poll_budget_s)
    batch_sizes = app[METRICS].ledger_batch_size
    ledger = GroupCommit(
        app[DB_POOL],
        max_batch=config.server.ledger_batch_max,
        max_inflight=config.server.ledger_batches_in_flight,
        on_batch=lambda kind, size: batch_sizes.labels(kind).observe(size),
    )
    app[SERVICES] = Services(
        config=config,
        pool=app[DB_POOL],
        ledger=ledger,
        poller=poller,
        upstream_poller=Poller(poll_budget_s),
        keys=KeyCache(),
        clients=clients,
        targets=_targets(config, app[PROVIDER_BASES], app[SANDBOX]),
        rates=rates(config),
        limiter=RateLimiter(
            SlidingWindowLimiter(app[REDIS], prefix=config.rate_limits.key_prefix),
            config,
            app[METRICS],
            poller,
        ),
        notifier=Notifier(config.credits.low_balance_ratio, app[METRICS]),
        metrics=app[METRICS],
        admin_key=app[ADMIN_KEY],
        sandbox=app[SANDBOX],
        stripe=stripe_api(app[HTTP_SESSION]),
    )
    yield
    await ledger.drain()  # the last settlements, before the pool closes
    await http.close()
