"""Migrations apply on an empty database, roll back to nothing, and apply again; the seed is
idempotent and yields the seed plan's counts."""

from __future__ import annotations

import asyncpg

from gateway.config import Config
from ledger import catalog_sync, migrations


async def _objects(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch(
        """SELECT c.relname AS name FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = 'public'
           UNION ALL
           SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
            WHERE n.nspname = 'public'"""
    )
    return {row["name"] for row in rows}


async def test_up_down_up_round_trip(empty_db: asyncpg.Connection) -> None:
    applied = await migrations.up(empty_db)
    assert [m.version for m in applied] == [m.version for m in migrations.discover()]
    assert await migrations.pending(empty_db) == []
    created = await _objects(empty_db)
    assert {
        "credit_transactions",
        "credit_reservations",
        "organization_credit_balances",
        "plan_quality_level_models",
        "credit_reserve",
        "get_spendable_credits",
    } <= created

    assert await migrations.up(empty_db) == []  # nothing left to apply

    rolled_back = await migrations.down(empty_db)
    assert len(rolled_back) == len(applied)
    assert await _objects(empty_db) == set()

    await migrations.up(empty_db)
    assert await _objects(empty_db) == created


async def test_down_by_steps(empty_db: asyncpg.Connection) -> None:
    await migrations.up(empty_db)
    await migrations.down(empty_db, 1)
    assert await migrations.pending(empty_db) == [migrations.discover()[-1].version]
    status = await migrations.status(empty_db)
    assert [s.applied_at is None for s in status] == [False] * (len(status) - 1) + [True]


async def test_seed_is_idempotent_and_matches_the_seed_plan(
    empty_db: asyncpg.Connection, config: Config
) -> None:
    await migrations.up(empty_db)
    first = await catalog_sync.seed(empty_db, config)
    second = await catalog_sync.seed(empty_db, config)
    assert first == second
    # ADR-023 T1.5: 7 plan capabilities, 16 quality levels, 48 model mappings for the
    # seed's three capabilities; SPEC adds `embeddings` for pro and team (one model each).
    seed_caps = ("question_generation", "testimonial_assembly", "testimonial_polish")
    counts = await empty_db.fetchrow(
        """SELECT count(DISTINCT pac.id) AS caps, count(DISTINCT x.id) AS levels,
                  count(m.id) AS mappings
             FROM plan_ai_capabilities pac
             JOIN ai_capabilities c ON c.id = pac.ai_capability_id
             JOIN plan_ai_capability_quality_levels x ON x.plan_ai_capability_id = pac.id
             JOIN plan_quality_level_models m ON m.plan_ai_capability_quality_level_id = x.id
            WHERE c.unique_name = ANY($1::text[])""",
        list(seed_caps),
    )
    assert counts is not None and dict(counts) == {"caps": 7, "levels": 16, "mappings": 48}
    assert first.model_mappings == 50 and first.models == 8 and first.topup_packages == 3
    plans = await empty_db.fetch(
        """SELECT unique_name, monthly_ai_credits_micro, welcome_bonus_micro
             FROM plans ORDER BY display_order"""
    )
    assert [(p[0], p[1] // 10**6, p[2] // 10**6) for p in plans] == [
        ("free", 10, 10),
        ("pro", 500, 25),
        ("team", 2000, 50),
    ]
    defaults = await empty_db.fetch(
        """SELECT DISTINCT m.unique_name FROM plan_quality_level_models x
             JOIN llm_models m ON m.id = x.llm_model_id WHERE x.is_default ORDER BY 1"""
    )
    assert [d[0] for d in defaults] == ["gpt-4o", "gpt-4o-mini", "text-embedding-3-small"]
