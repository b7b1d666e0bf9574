"""The whole HTTP API on one screen."""

from __future__ import annotations

from aiohttp import web

from gateway.handlers import chat, credits, health, models


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/chat/completions", chat.chat_completions)
    r.add_post("/v1/embeddings", chat.embeddings)
    r.add_get("/v1/models", models.list_models)
    r.add_post("/v1/access-check", credits.access_check)
    r.add_get("/v1/credits/balance", credits.balance)
    r.add_get("/v1/credits/packages", credits.packages, name="packages")

    r.add_get("/healthz", health.healthz)
    r.add_get("/readyz", health.readyz)
