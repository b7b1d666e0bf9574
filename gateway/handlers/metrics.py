"""GET /metrics: Prometheus text format; with --workers N, every worker's counts together."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.resources import METRICS


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[METRICS].exposition_registry()
    return web.Response(
        body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )
