"""The metered routes: thin wrappers over the one proxy pipeline."""

from __future__ import annotations

from aiohttp import web

from gateway import proxy
from gateway.pipeline import Endpoint


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions, streaming or not; every field is passed through."""
    return await proxy.run(request, Endpoint.CHAT)


async def embeddings(request: web.Request) -> web.StreamResponse:
    """POST /v1/embeddings, charged for its input tokens."""
    return await proxy.run(request, Endpoint.EMBEDDINGS)
