"""Everything a request handler needs, assembled once at start-up."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import asyncpg

from gateway.auth import KeyCache
from gateway.billing import StripeApi
from gateway.config import Config
from gateway.metrics import Metrics
from gateway.notifications import Notifier
from gateway.polling import Poller
from gateway.ratelimit import RateLimiter
from gateway.upstream.base import Target, UpstreamClient
from ledger.group import GroupCommit
from policies.catalog import ProviderKind
from policies.pricing import Rate


@dataclass(frozen=True)
class Services:
    config: Config
    pool: asyncpg.Pool
    ledger: GroupCommit  # holds and settlements, batched
    poller: Poller  # waits on the ledger and Redis, polled (gateway/polling.py)
    upstream_poller: Poller  # waits for an upstream's first byte (polled only if short)
    keys: KeyCache
    clients: Mapping[ProviderKind, UpstreamClient]
    targets: Mapping[str, Target]  # catalog model name -> where to call it
    rates: Mapping[tuple[str, str], Rate]  # (model, quality) -> what a token costs
    limiter: RateLimiter
    notifier: Notifier
    metrics: Metrics
    admin_key: str
    sandbox: bool
    stripe: StripeApi
