"""The whole HTTP API on one screen."""

from __future__ import annotations

from aiohttp import web

from gateway.handlers import health


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/readyz", health.readyz)
