"""The benches' databases: each created for the run on a server and dropped after it,
migrated and seeded, with topped-up organizations and a history of settled calls."""

from __future__ import annotations

import contextlib
import secrets
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg

from gateway.config import load_config
from ledger import catalog_sync, migrations, reservations
from ledger.accounts import create_api_key, create_organization
from ledger.transactions import TransactionType, post
from tests.support import create_database, drop_database

HOLD_MICRO = 50_000  # held by each pair
CHARGE_MICRO = 20_000  # then charged; the rest goes back
TOPUP_MICRO = 10**15  # per organization / row: no hold is ever refused
TTL_S = 600
HISTORY_PAIRS = 3  # settled per organization during set-up, before any measurement
PLAN = "team"


@contextlib.asynccontextmanager
async def bench_database(server_url: str) -> AsyncIterator[str]:
    name = f"gwbench_{secrets.token_hex(4)}"
    url = await create_database(server_url, name)
    try:
        yield url
    finally:
        await drop_database(server_url, name)


async def prepare_gateway(
    url: str, config: Path, plan: str, topup_micro: int
) -> tuple[uuid.UUID, str]:
    """Migrate and seed the bench database; an organization on the plan, topped up, a key."""
    conn = await asyncpg.connect(url)
    try:
        await migrations.up(conn)
        await catalog_sync.seed(conn, load_config(config))
        org = await create_organization(conn, "proxy bench", plan)
        await post(conn, org.id, TransactionType.TOPUP_PURCHASE, topup_micro, "bench-topup")
        key = await create_api_key(conn, org.id, "bench")
    finally:
        await conn.close()
    return org.id, key.key


async def postgres_settings(url: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        version = await conn.fetchval("SHOW server_version")
        rows = await conn.fetch(
            """SELECT name, current_setting(name) AS value FROM pg_settings
                WHERE name IN ('fsync', 'synchronous_commit', 'shared_buffers') ORDER BY name"""
        )
    finally:
        await conn.close()
    settings = " ".join(f"{row['name']}={row['value']}" for row in rows)
    return f"gateway PostgreSQL {version}: {settings}"


async def create_raw_table(conn: asyncpg.Connection, rows: int) -> list[int]:
    await conn.execute(
        """CREATE TABLE bench_raw (
               id       integer PRIMARY KEY,
               balance  bigint NOT NULL,
               reserved bigint NOT NULL DEFAULT 0 CHECK (reserved >= 0))"""
    )
    await conn.execute(
        "INSERT INTO bench_raw (id, balance) SELECT g, $2 FROM generate_series(1, $1) g",
        rows,
        TOPUP_MICRO,
    )
    return list(range(1, rows + 1))


async def create_organizations(conn: asyncpg.Connection, count: int) -> list[uuid.UUID]:
    """`count` organizations on the plan, each topped up far beyond what the run spends."""
    organizations = []
    async with conn.transaction():
        for n in range(count):
            org = await create_organization(conn, f"bench {n}", PLAN)
            await post(conn, org.id, TransactionType.TOPUP_PURCHASE, TOPUP_MICRO, f"bench-{n}")
            organizations.append(org.id)
    return organizations


async def seed_history(conn: asyncpg.Connection, organizations: list[uuid.UUID]) -> None:
    """Settled pairs for every organization before anything is measured (then ANALYZE), so
    that plans are those of tables in use. A connection that first runs credit_reserve while
    credit_reservations is nearly empty can cache a sequential scan for its idempotency lookup
    and keep it, ever slower as the table grows, until something invalidates the plan; on a
    server without autovacuum nothing may."""
    await conn.execute(
        """WITH holds AS MATERIALIZED (
               SELECT o.org, r.reservation_id
                 FROM unnest($1::uuid[]) AS o (org)
                CROSS JOIN generate_series(1, $2) AS g (n)
                CROSS JOIN LATERAL credit_reserve(o.org, 'history-' || g.n, $3, $3, $4) AS r)
           SELECT count(*) FROM holds h
            CROSS JOIN LATERAL credit_settle(h.org, h.reservation_id, $5) AS s""",
        organizations,
        HISTORY_PAIRS,
        HOLD_MICRO,
        TTL_S,
        CHARGE_MICRO,
    )


async def ledger_floor(url: str, name: str, pairs: int = 300) -> tuple[float, float]:
    """(hold + settlement, a bare durable one-row UPDATE): p50 seconds, one connection, on
    an organization of its own. What two durable commits cost on this server, whatever the
    gateway does: the floor under its overhead at concurrency 1."""
    conn = await asyncpg.connect(url)
    try:
        [org] = await create_organizations(conn, 1)
        probe = f"floor_probe_{name}"
        await conn.execute(f"CREATE TABLE {probe} (id int PRIMARY KEY, n bigint)")
        await conn.execute(f"INSERT INTO {probe} VALUES (1, 0)")
        held, bare = [], []
        for n in range(pairs + 20):  # the first 20 warm up
            start = time.perf_counter()
            key = f"floor-{name}-{n}"
            hold = await reservations.reserve(
                conn, org, key, minimum_micro=HOLD_MICRO, requested_micro=HOLD_MICRO, ttl_s=TTL_S
            )
            await reservations.settle(conn, org, hold.id, CHARGE_MICRO)
            middle = time.perf_counter()
            await conn.execute(f"UPDATE {probe} SET n = n + 1 WHERE id = 1")
            if n >= 20:
                held.append(middle - start)
                bare.append(time.perf_counter() - middle)
        await conn.execute(f"DROP TABLE {probe}")
        return statistics.median(held), statistics.median(bare)
    finally:
        await conn.close()
