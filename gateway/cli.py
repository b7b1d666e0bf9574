"""`llm-gateway`: serve, migrate, seed, jobs, check-config and the operator verbs."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal, InvalidOperation

from gateway.config import Config, ConfigError, config_path, load_config
from gateway.embedded import EmbeddedUnavailable, Services, resolve_services
from gateway.logs import configure_logging
from gateway.resources import StartupError
from ledger import accounts, catalog_sync, migrations, transactions
from ledger.db import connect
from ledger.errors import LedgerError
from policies.catalog import credits_to_micro

log = logging.getLogger("gateway")


class UsageError(Exception):
    """A command-line argument that does not make sense."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-gateway", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="config file (default: $GATEWAY_CONFIG or config.yaml)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", parents=[common], help="run the HTTP gateway")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument("--sandbox", action="store_true", help="simulate every provider")
    serve.add_argument("--demo", action="store_true", help="create a demo organization and key")

    migrate = sub.add_parser("migrate", parents=[common], help="apply or roll back migrations")
    migrate.add_argument("action", nargs="?", choices=["up", "down", "status"], default="up")
    migrate.add_argument("steps", nargs="?", type=int, help="with down: how many (default all)")

    sub.add_parser("seed", parents=[common], help="sync the catalog into PostgreSQL")
    sub.add_parser("check-config", parents=[common], help="validate the config file")
    jobs = sub.add_parser("jobs", parents=[common], help="run the scheduled jobs")
    jobs.add_argument("--once", action="store_true", help="one pass, then exit")

    orgs = sub.add_parser("orgs", help="organizations").add_subparsers(dest="verb", required=True)
    create = orgs.add_parser("create", parents=[common], help="create an organization")
    create.add_argument("name")
    create.add_argument("--plan", required=True)

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="verb", required=True)
    key = keys.add_parser("create", parents=[common], help="create an API key (shown once)")
    key.add_argument("organization_id", type=uuid.UUID)
    key.add_argument("--name")

    credits = sub.add_parser("credits", help="credits").add_subparsers(dest="verb", required=True)
    grant = credits.add_parser("grant", parents=[common], help="grant or take back credits")
    grant.add_argument("organization_id", type=uuid.UUID)
    grant.add_argument("amount", help="credits, may be negative and fractional")
    grant.add_argument("--reason", required=True)
    grant.add_argument("--idempotency-key", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging()
    try:
        config = load_config(config_path(args.config))
        if args.command == "check-config":
            print(
                f"{config_path(args.config)}: ok ({len(config.models)} models, "
                f"{len(config.plans)} plans, {len(config.capabilities)} capabilities)"
            )
            return 0
        if args.command == "serve":
            from gateway.server import serve

            return serve(config, args)
        return asyncio.run(_run_verb(config, args))
    except (ConfigError, EmbeddedUnavailable, LedgerError, UsageError, StartupError) as exc:
        print(f"llm-gateway: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


async def _run_verb(config: Config, args: argparse.Namespace) -> int:
    verbs: dict[str, Callable[[str, Config, argparse.Namespace], Awaitable[object]]] = {
        "migrate": _migrate,
        "seed": _seed,
        "jobs": _jobs,
        "orgs": _orgs_create,
        "keys": _keys_create,
        "credits": _credits_grant,
    }
    services: Services = resolve_services(need_redis=False)
    try:
        result = await verbs[args.command](services.database_url, config, args)
    finally:
        services.stop()
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0


async def _migrate(dsn: str, config: Config, args: argparse.Namespace) -> object:
    async with connect(dsn) as conn:
        if args.action == "status":
            return [
                {"version": s.version, "name": s.name, "applied_at": s.applied_at}
                for s in await migrations.status(conn)
            ]
        if args.action == "down":
            done = await migrations.down(conn, args.steps)
            return {"rolled_back": [f"{m.version:04d}_{m.name}" for m in done]}
        return {"applied": [f"{m.version:04d}_{m.name}" for m in await migrations.up(conn)]}


async def _seed(dsn: str, config: Config, args: argparse.Namespace) -> object:
    async with connect(dsn) as conn:
        await migrations.up(conn)
        return vars(await catalog_sync.seed(conn, config))


async def _jobs(dsn: str, config: Config, args: argparse.Namespace) -> object:
    from gateway.jobs import run_jobs

    return await run_jobs(dsn, config, once=args.once)


async def _orgs_create(dsn: str, config: Config, args: argparse.Namespace) -> object:
    async with connect(dsn) as conn:
        org = await accounts.create_organization(conn, args.name, args.plan)
        return {"id": org.id, "name": org.name, "plan": org.plan, "created_at": org.created_at}


async def _keys_create(dsn: str, config: Config, args: argparse.Namespace) -> object:
    async with connect(dsn) as conn:
        key = await accounts.create_api_key(conn, args.organization_id, args.name)
        return {"id": key.id, "key": key.key}


async def _credits_grant(dsn: str, config: Config, args: argparse.Namespace) -> object:
    try:
        amount = credits_to_micro(Decimal(args.amount))
    except (InvalidOperation, ValueError):
        raise UsageError(f"amount: {args.amount!r} is not a number of credits") from None
    async with connect(dsn) as conn:
        posted = await transactions.post(
            conn,
            args.organization_id,
            transactions.TransactionType.ADMIN_ADJUSTMENT,
            amount,
            f"admin:{args.idempotency_key}",
            description=args.reason,
        )
        t = posted.transaction
        return {"id": t.id, "amount_micro": t.amount_micro, "replayed": posted.replayed}
