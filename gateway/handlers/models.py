"""GET /v1/models: what this key's plan may use, in OpenAI's list shape."""

from __future__ import annotations

from aiohttp import web

from gateway.auth import authenticate
from gateway.resources import SERVICES
from policies.access import allowed_models

CREATED = 1_700_000_000  # catalog entries carry no creation time; a fixed one keeps lists stable


async def list_models(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    principal = await authenticate(request, services.keys, services.pool)
    config = services.config
    data = [
        {
            "id": name,
            "object": "model",
            "created": CREATED,
            "owned_by": config.models[name].provider,
        }
        for name in allowed_models(config, principal.plan)
    ]
    return web.json_response({"object": "list", "data": data})
