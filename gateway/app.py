"""The app factory: nothing happens on import; everything a request needs hangs off the app."""

from __future__ import annotations

from aiohttp import web

from gateway import resources
from gateway.config import Config
from gateway.routes import add_routes


def create_app(config: Config, *, database_url: str) -> web.Application:
    app = web.Application(client_max_size=config.server.max_body_bytes)
    app[resources.CONFIG] = config
    app[resources.DATABASE_URL] = database_url
    app.cleanup_ctx.append(resources.postgres_pool)
    add_routes(app)
    return app
