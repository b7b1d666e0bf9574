"""`llm-gateway serve`: bring the database up to date, then serve HTTP."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import uuid

from aiohttp import web

from gateway.app import create_app
from gateway.config import Config
from gateway.embedded import gateway_home, resolve_services
from ledger import accounts, catalog_sync, migrations
from ledger.db import connect

log = logging.getLogger(__name__)

DEMO_ORGANIZATION_ID = uuid.UUID("00000000-0000-4000-8000-00000000d3e0")  # fixed: one demo org


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


def serve(config: Config, args: argparse.Namespace) -> int:
    _fast_event_loop()
    services = resolve_services()
    try:
        asyncio.run(bootstrap(services.database_url, config))
        host = args.host or config.server.host
        port = args.port if args.port is not None else config.server.port
        admin = admin_key()
        if args.demo:
            key = asyncio.run(create_demo(services.database_url))
            _print_demo(host, port, key, admin)
        app = create_app(
            config,
            database_url=services.database_url,
            redis_url=services.redis_url,
            admin_key=admin,
            sandbox=args.sandbox,
        )
        web.run_app(app, host=host, port=port, print=None, access_log=None)
    finally:
        services.stop()
    return 0


def _print_demo(host: str, port: int, key: str, admin: str) -> None:
    base = f"http://{host}:{port}"
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
