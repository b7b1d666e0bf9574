"""Writes the catalog from config.yaml into PostgreSQL, idempotently (`llm-gateway seed`).

Entries that left the config are deactivated, not deleted: ledger rows still refer to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from ledger.db import translated
from policies.catalog import Catalog, credits_to_micro

SEED_LOCK_ID = 0x6C6C_6D67_7365_6564  # serialises seeders starting at once


@dataclass(frozen=True)
class SeedCounts:
    quality_levels: int
    capabilities: int
    plans: int
    models: int
    plan_capabilities: int
    plan_quality_levels: int
    model_mappings: int
    topup_packages: int


async def seed(conn: asyncpg.Connection, catalog: Catalog) -> SeedCounts:
    """Sync the catalog in one transaction and return the resulting row counts."""
    with translated():
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", SEED_LOCK_ID)
            await _providers(conn, catalog)
            await _quality_levels(conn, catalog)
            await _capabilities(conn, catalog)
            await _plans(conn, catalog)
            await _models(conn, catalog)
            await _plan_access(conn, catalog)
            await _packages(conn, catalog)
            return await counts(conn)


async def counts(conn: asyncpg.Connection) -> SeedCounts:
    row = await conn.fetchrow(
        """SELECT (SELECT count(*) FROM quality_levels WHERE is_active) AS quality_levels,
                  (SELECT count(*) FROM ai_capabilities WHERE is_active) AS capabilities,
                  (SELECT count(*) FROM plans WHERE is_active) AS plans,
                  (SELECT count(*) FROM llm_models WHERE is_active) AS models,
                  (SELECT count(*) FROM plan_ai_capabilities) AS plan_capabilities,
                  (SELECT count(*) FROM plan_ai_capability_quality_levels) AS plan_quality_levels,
                  (SELECT count(*) FROM plan_quality_level_models) AS model_mappings,
                  (SELECT count(*) FROM credit_topup_packages WHERE is_active) AS topup_packages"""
    )
    assert row is not None  # an aggregate query always returns its row
    return SeedCounts(**dict(row))


async def _deactivate(conn: asyncpg.Connection, table: str, keep: list[str]) -> None:
    # table names come from this module only, never from input
    await conn.execute(
        f"UPDATE {table} SET is_active = false WHERE is_active AND unique_name <> ALL($1::text[])",
        keep,
    )


async def _providers(conn: asyncpg.Connection, cat: Catalog) -> None:
    await conn.executemany(
        """INSERT INTO llm_providers (unique_name, kind, api_base) VALUES ($1, $2, $3)
           ON CONFLICT (unique_name) DO UPDATE
              SET kind = excluded.kind, api_base = excluded.api_base""",
        [(name, p.kind.value, p.api_base) for name, p in cat.providers.items()],
    )


async def _quality_levels(conn: asyncpg.Connection, cat: Catalog) -> None:
    await conn.executemany(
        """INSERT INTO quality_levels (unique_name, name, description, display_order,
               credit_multiplier)
           VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT (unique_name) DO UPDATE SET name = excluded.name,
               description = excluded.description, display_order = excluded.display_order,
               credit_multiplier = excluded.credit_multiplier, is_active = true""",
        [
            (name, q.name or name, q.description, order, q.credit_multiplier)
            for order, (name, q) in enumerate(cat.quality_levels.items())
        ],
    )
    await _deactivate(conn, "quality_levels", list(cat.quality_levels))


async def _capabilities(conn: asyncpg.Connection, cat: Catalog) -> None:
    await conn.executemany(
        """INSERT INTO ai_capabilities (unique_name, name, description, category, icon,
               estimated_credits_fast, estimated_credits_enhanced, estimated_credits_premium,
               max_output_tokens)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
           ON CONFLICT (unique_name) DO UPDATE SET name = excluded.name,
               description = excluded.description, category = excluded.category,
               icon = excluded.icon, estimated_credits_fast = excluded.estimated_credits_fast,
               estimated_credits_enhanced = excluded.estimated_credits_enhanced,
               estimated_credits_premium = excluded.estimated_credits_premium,
               max_output_tokens = excluded.max_output_tokens, is_active = true""",
        [
            (
                name,
                c.name or name,
                c.description,
                c.category,
                c.icon,
                c.estimated_credits.get("fast"),
                c.estimated_credits.get("enhanced"),
                c.estimated_credits.get("premium"),
                c.max_output_tokens,
            )
            for name, c in cat.capabilities.items()
        ],
    )
    await _deactivate(conn, "ai_capabilities", list(cat.capabilities))


async def _plans(conn: asyncpg.Connection, cat: Catalog) -> None:
    await conn.executemany(
        """INSERT INTO plans (unique_name, name, display_order, monthly_ai_credits_micro,
               welcome_bonus_micro, overdraft_limit_micro)
           VALUES ($1, $2, $3, $4, $5, $6)
           ON CONFLICT (unique_name) DO UPDATE SET name = excluded.name,
               display_order = excluded.display_order,
               monthly_ai_credits_micro = excluded.monthly_ai_credits_micro,
               welcome_bonus_micro = excluded.welcome_bonus_micro,
               overdraft_limit_micro = excluded.overdraft_limit_micro, is_active = true""",
        [
            (
                name,
                p.name or name,
                order,
                credits_to_micro(p.monthly_credits),
                credits_to_micro(p.welcome_bonus),
                credits_to_micro(p.overdraft),
            )
            for order, (name, p) in enumerate(cat.plans.items())
        ],
    )
    await _deactivate(conn, "plans", list(cat.plans))


async def _models(conn: asyncpg.Connection, cat: Catalog) -> None:
    await conn.executemany(
        """INSERT INTO llm_models (unique_name, provider, model_id, mode, display_name,
               quality_tier, input_cost_per_million, output_cost_per_million, context_window,
               max_output_tokens, deprecated_at, display_order)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
           ON CONFLICT (unique_name) DO UPDATE SET provider = excluded.provider,
               model_id = excluded.model_id, mode = excluded.mode,
               display_name = excluded.display_name, quality_tier = excluded.quality_tier,
               input_cost_per_million = excluded.input_cost_per_million,
               output_cost_per_million = excluded.output_cost_per_million,
               context_window = excluded.context_window,
               max_output_tokens = excluded.max_output_tokens,
               deprecated_at = excluded.deprecated_at, display_order = excluded.display_order,
               is_active = true""",
        [
            (
                name,
                m.provider,
                m.upstream,
                m.mode.value,
                m.display_name or name,
                m.tier,
                m.input_usd_per_mtok,
                m.output_usd_per_mtok,
                m.context_window,
                m.max_output_tokens,
                m.deprecated_at,
                order,
            )
            for order, (name, m) in enumerate(cat.models.items())
        ],
    )
    await conn.executemany(
        """UPDATE llm_models SET replacement_model_id =
               (SELECT id FROM llm_models r WHERE r.unique_name = $2)
           WHERE unique_name = $1""",
        [(name, m.replacement) for name, m in cat.models.items()],
    )
    await _deactivate(conn, "llm_models", list(cat.models))


async def _plan_access(conn: asyncpg.Connection, cat: Catalog) -> None:
    """plan_ai_capabilities, their quality levels and the models of each, in priority order."""
    rows = [
        (plan, cap, pc.rpm, pc.rpd, pc.max_output_tokens)
        for plan, p in cat.plans.items()
        for cap, pc in p.capabilities.items()
    ]
    await conn.execute(
        """DELETE FROM plan_ai_capabilities pac USING plans p, ai_capabilities c
           WHERE pac.plan_id = p.id AND pac.ai_capability_id = c.id
             AND (p.unique_name, c.unique_name) NOT IN
                 (SELECT * FROM unnest($1::text[], $2::text[]))""",
        [r[0] for r in rows],
        [r[1] for r in rows],
    )
    await conn.executemany(
        """INSERT INTO plan_ai_capabilities (plan_id, ai_capability_id, rate_limit_rpm,
               rate_limit_rpd, max_output_tokens)
           SELECT p.id, c.id, $3, $4, $5 FROM plans p, ai_capabilities c
            WHERE p.unique_name = $1 AND c.unique_name = $2
           ON CONFLICT (plan_id, ai_capability_id) DO UPDATE SET is_enabled = true,
               rate_limit_rpm = excluded.rate_limit_rpm, rate_limit_rpd = excluded.rate_limit_rpd,
               max_output_tokens = excluded.max_output_tokens""",
        rows,
    )
    mappings = [
        (plan, cap, quality, list(cat.models_for(plan, cap, quality)))
        for plan, p in cat.plans.items()
        for cap, pc in p.capabilities.items()
        for quality in pc.quality
    ]
    await conn.execute(
        """DELETE FROM plan_ai_capability_quality_levels x
           USING plan_ai_capabilities pac, plans p, ai_capabilities c, quality_levels q
           WHERE x.plan_ai_capability_id = pac.id AND pac.plan_id = p.id
             AND pac.ai_capability_id = c.id AND x.quality_level_id = q.id
             AND (p.unique_name, c.unique_name, q.unique_name) NOT IN
                 (SELECT * FROM unnest($1::text[], $2::text[], $3::text[]))""",
        [m[0] for m in mappings],
        [m[1] for m in mappings],
        [m[2] for m in mappings],
    )
    await conn.executemany(
        """INSERT INTO plan_ai_capability_quality_levels (plan_ai_capability_id, quality_level_id)
           SELECT pac.id, q.id FROM plan_ai_capabilities pac
             JOIN plans p ON p.id = pac.plan_id
             JOIN ai_capabilities c ON c.id = pac.ai_capability_id
             JOIN quality_levels q ON q.unique_name = $3
            WHERE p.unique_name = $1 AND c.unique_name = $2
           ON CONFLICT (plan_ai_capability_id, quality_level_id) DO NOTHING""",
        [m[:3] for m in mappings],
    )
    # The model lists are small: rewrite them whole rather than diff them.
    await conn.execute("DELETE FROM plan_quality_level_models")
    await conn.executemany(
        """INSERT INTO plan_quality_level_models (plan_ai_capability_quality_level_id,
               llm_model_id, is_default, priority)
           SELECT x.id, m.id, models.ordinal = 1, models.ordinal - 1
             FROM plan_ai_capability_quality_levels x
             JOIN plan_ai_capabilities pac ON pac.id = x.plan_ai_capability_id
             JOIN plans p ON p.id = pac.plan_id
             JOIN ai_capabilities c ON c.id = pac.ai_capability_id
             JOIN quality_levels q ON q.id = x.quality_level_id
             CROSS JOIN unnest($4::text[]) WITH ORDINALITY AS models (name, ordinal)
             JOIN llm_models m ON m.unique_name = models.name
            WHERE p.unique_name = $1 AND c.unique_name = $2 AND q.unique_name = $3""",
        mappings,
    )


async def _packages(conn: asyncpg.Connection, cat: Catalog) -> None:
    await conn.executemany(
        """INSERT INTO credit_topup_packages (unique_name, name, credits_micro, price_usd_cents,
               is_popular, display_order)
           VALUES ($1, $2, $3, $4, $5, $6)
           ON CONFLICT (unique_name) DO UPDATE SET name = excluded.name,
               credits_micro = excluded.credits_micro, price_usd_cents = excluded.price_usd_cents,
               is_popular = excluded.is_popular, display_order = excluded.display_order,
               is_active = true""",
        [
            (name, p.name or name, credits_to_micro(p.credits), p.price_usd_cents, p.popular, order)
            for order, (name, p) in enumerate(cat.topup_packages.items())
        ],
    )
    await _deactivate(conn, "credit_topup_packages", list(cat.topup_packages))
