"""The app factory: nothing happens on import; everything a request needs hangs off the app."""

from __future__ import annotations

from aiohttp import web

from gateway import resources
from gateway.config import Config
from gateway.errors import error_middleware
from gateway.jobs import job_loop
from gateway.logs import access_log_middleware
from gateway.metrics import Metrics
from gateway.routes import add_routes


def create_app(
    config: Config,
    *,
    database_url: str,
    redis_url: str,
    admin_key: str,
    sandbox: bool = False,
    metrics: Metrics | None = None,
) -> web.Application:
    app = web.Application(
        client_max_size=config.server.max_body_bytes,
        middlewares=[access_log_middleware, error_middleware],
    )
    app[resources.CONFIG] = config
    app[resources.DATABASE_URL] = database_url
    app[resources.REDIS_URL] = redis_url
    app[resources.ADMIN_KEY] = admin_key
    app[resources.SANDBOX] = sandbox
    app[resources.METRICS] = metrics or Metrics()
    app.cleanup_ctx.extend(
        [
            resources.redis_client,
            resources.postgres_pool,
            resources.http_session,
            resources.provider_bases,
            resources.services,
            job_loop(resources.DATABASE_URL, resources.CONFIG, resources.HTTP_SESSION),
        ]
    )
    add_routes(app)
    return app
