"""config.yaml: read once at start-up into frozen models; a bad file names the key at fault."""

from __future__ import annotations

import os
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import Field, ValidationError

from policies.catalog import Catalog, Frozen

DEFAULT_CONFIG_PATH = Path("config.yaml")


class ServerSettings(Frozen):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    max_body_bytes: int = Field(default=10 * 1024 * 1024, gt=0)
    upstream_timeout_s: float = Field(default=60, gt=0)
    upstream_connect_timeout_s: float = Field(default=5, gt=0)
    db_pool_min: int = Field(default=2, ge=1)
    db_pool_max: int = Field(default=10, ge=1)
    ledger_batch_max: int = Field(default=32, ge=1, le=1000)  # holds + settlements per commit
    ledger_batches_in_flight: int = Field(default=2, ge=1)  # per worker, each on a connection
    # poll the event loop for up to this long while a ledger or Redis round trip is in
    # flight, instead of sleeping until the reply (gateway/polling.py); 0: never
    poll_round_trips_us: int = Field(default=2000, ge=0, le=1_000_000)
    shutdown_timeout_s: float = Field(default=30, ge=0)


class CreditSettings(Frozen):
    per_usd: Annotated[Decimal, Field(gt=0, max_digits=12, decimal_places=4)] = Decimal(100)
    reservation_ttl_s: int = Field(default=600, gt=0)
    low_balance_ratio: Annotated[Decimal, Field(ge=0, le=1)] = Decimal("0.2")
    notify_webhook_url: str | None = None


class RedisErrorPolicy(StrEnum):
    FAIL_OPEN = "fail_open"
    FAIL_CLOSED = "fail_closed"


class RateLimitSettings(Frozen):
    on_redis_error: RedisErrorPolicy = RedisErrorPolicy.FAIL_OPEN
    key_prefix: str = Field(default="gw:", pattern=r"^[A-Za-z0-9:_.-]*$")
    redis_timeout_s: float = Field(default=0.5, gt=0)  # per command; a dead Redis fails fast


class StripeSettings(Frozen):
    currency: str = Field(default="usd", pattern=r"^[a-z]{3}$")
    success_url: str = "http://127.0.0.1:8080/billing/success?session_id={CHECKOUT_SESSION_ID}"
    cancel_url: str = "http://127.0.0.1:8080/billing/cancel"


class Config(Catalog):
    """The whole of config.yaml."""

    server: ServerSettings = ServerSettings()
    credits: CreditSettings = CreditSettings()
    rate_limits: RateLimitSettings = RateLimitSettings()
    stripe: StripeSettings = StripeSettings()


class ConfigError(Exception):
    """config.yaml is missing, unreadable or invalid; the message names the key."""


def config_path(explicit: str | None = None) -> Path:
    """The config file: an explicit path, else $GATEWAY_CONFIG, else ./config.yaml."""
    return Path(explicit or os.environ.get("GATEWAY_CONFIG") or DEFAULT_CONFIG_PATH)


def load_config(path: Path) -> Config:
    """Read and validate a config file."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    try:
        return Config.model_validate(raw if raw is not None else {})
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_describe(exc)}") from None


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        lines.append(f"{key}: {message}" if key else message)
    return "; ".join(lines)
