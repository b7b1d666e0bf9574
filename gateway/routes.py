"""The whole HTTP API on one screen."""

from __future__ import annotations

from aiohttp import web

from gateway.handlers import admin, chat, credits, health, metrics, models, webhooks


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/chat/completions", chat.chat_completions)
    r.add_post("/v1/embeddings", chat.embeddings)
    r.add_get("/v1/models", models.list_models)
    r.add_post("/v1/access-check", credits.access_check)
    r.add_get("/v1/credits/balance", credits.balance)
    r.add_get("/v1/credits/transactions", credits.transactions_page)
    r.add_get("/v1/credits/packages", credits.packages, name="packages")
    r.add_post("/v1/credits/purchase", credits.purchase)

    r.add_post("/admin/orgs", admin.create_org)
    r.add_get("/admin/orgs/{id}", admin.get_org)
    r.add_post("/admin/orgs/{id}/keys", admin.create_key)
    r.add_delete("/admin/keys/{id}", admin.revoke_key)
    r.add_get("/admin/orgs/{id}/balance", admin.org_balance)
    r.add_get("/admin/orgs/{id}/transactions", admin.org_transactions)
    r.add_post("/admin/orgs/{id}/credits", admin.grant_credits)
    r.add_post("/admin/orgs/{id}/plan", admin.change_plan)
    r.add_get("/admin/reservations", admin.pending_reservations)
    r.add_get("/admin/ledger/check", admin.ledger_check)

    r.add_post("/webhooks/stripe", webhooks.stripe_webhook)
    r.add_get("/metrics", metrics.metrics)
    r.add_get("/healthz", health.healthz)
    r.add_get("/readyz", health.readyz)
