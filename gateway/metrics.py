"""Prometheus metrics (SPEC §7). Labels never carry an organization id or a key."""

from __future__ import annotations

import os
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, multiprocess

# seconds; the gateway's own overhead is sub-millisecond, upstream calls take seconds
_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
)


class _ChildCache:
    """`labels(*values)` answered from a dict after the first time: prometheus_client
    validates, converts and locks on every call, a few microseconds each, several times per
    request. Every label value here comes from the configuration or a short fixed list, so
    the cache stays as small as the metric's own children."""

    _children: dict[tuple[Any, ...], Any]

    def labels(self, *values: Any, **named: Any) -> Any:
        if named:
            return super().labels(*values, **named)  # type: ignore[misc]
        try:
            return self._children[values]
        except AttributeError:
            self._children = {}
        except KeyError:
            pass
        child = self._children[values] = super().labels(*values)  # type: ignore[misc]
        return child


class Counter(_ChildCache, prometheus_client.Counter):
    pass


class Histogram(_ChildCache, prometheus_client.Histogram):
    pass


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # set by `serve --workers N` for every worker


class Metrics:
    def exposition_registry(self) -> CollectorRegistry:
        """What /metrics serves: this process's registry, or with several workers a
        collector that reads every worker's files."""
        if not os.environ.get(MULTIPROC_ENV):
            return self.registry
        combined = CollectorRegistry()
        multiprocess.MultiProcessCollector(combined)  # type: ignore[no-untyped-call]
        return combined

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gateway_requests_total",
            "Proxied requests by outcome",
            ["capability", "quality", "model", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "gateway_request_duration_seconds",
            "Whole request time",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead_duration = Histogram(
            "gateway_overhead_duration_seconds",
            "Request time minus upstream time",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "gateway_upstream_duration_seconds",
            "Upstream call time",
            ["provider", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "gateway_tokens_total", "Tokens charged", ["capability", "model", "kind"], registry=r
        )
        self.credits_consumed = Counter(
            "gateway_credits_consumed_total",
            "Credits charged",
            ["capability", "quality", "plan"],
            registry=r,
        )
        self.rate_limited = Counter(
            "gateway_rate_limited_total",
            "Requests refused for rate",
            ["capability", "window"],
            registry=r,
        )
        self.rate_limit_errors = Counter(
            "gateway_rate_limit_errors_total", "Redis failures met by the rate limiter", registry=r
        )
        self.access_denied = Counter(
            "gateway_access_denied_total", "Requests refused by policy", ["reason"], registry=r
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors_total",
            "Failed upstream attempts",
            ["provider", "model", "kind"],
            registry=r,
        )
        self.fallbacks = Counter(
            "gateway_fallbacks_total", "Attempts on a fallback model", registry=r
        )
        self.reservations = Counter(
            "gateway_reservations_total", "Reservations by outcome", ["outcome"], registry=r
        )
        self.ledger_batch_size = Histogram(
            "gateway_ledger_batch_size",
            "Holds or settlements sent to PostgreSQL in one statement and commit",
            ["operation"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.notifications = Counter(
            "gateway_low_balance_notifications_total",
            "Low-balance notifications",
            ["type"],
            registry=r,
        )
