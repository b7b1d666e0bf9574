"""Schema migrations: numbered up/down SQL files in sql/, applied under an advisory lock."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import asyncpg

from ledger.db import Conn, translated

# Any constant works; it only has to be the same for every process migrating this database.
MIGRATION_LOCK_ID = 0x6C6C_6D67_6174_6577
_FILE = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.(?P<direction>up|down)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    up: Path
    down: Path


@dataclass(frozen=True)
class MigrationStatus:
    version: int
    name: str
    applied_at: datetime | None


def sql_dir() -> Path:
    """Where the migration files are: $GATEWAY_SQL_DIR, else sql/ beside the packages."""
    explicit = os.environ.get("GATEWAY_SQL_DIR")
    return Path(explicit) if explicit else Path(__file__).resolve().parent.parent / "sql"


def discover(directory: Path | None = None) -> list[Migration]:
    """Every migration in order; each must have both an up and a down file."""
    directory = directory or sql_dir()
    found: dict[int, dict[str, Path]] = {}
    names: dict[int, str] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _FILE.match(path.name)
        if match is None:
            raise ValueError(f"{path}: not a migration file name (NNNN_name.up.sql)")
        version = int(match["version"])
        found.setdefault(version, {})[match["direction"]] = path
        names[version] = match["name"]
    migrations = []
    for version in sorted(found):
        files = found[version]
        if set(files) != {"up", "down"}:
            raise ValueError(f"migration {version:04d} needs both an up and a down file")
        migrations.append(Migration(version, names[version], files["up"], files["down"]))
    return migrations


_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


async def _applied(conn: asyncpg.Connection) -> dict[int, datetime]:
    await conn.execute(_CREATE_TABLE)
    rows = await conn.fetch("SELECT version, applied_at FROM schema_migrations")
    return {row["version"]: row["applied_at"] for row in rows}


async def status(conn: asyncpg.Connection) -> list[MigrationStatus]:
    """Each known migration and when it was applied (None: pending)."""
    with translated():
        applied = await _applied(conn)
    return [MigrationStatus(m.version, m.name, applied.get(m.version)) for m in discover()]


async def pending(conn: Conn) -> list[int]:
    """Versions not yet applied (without creating anything)."""
    with translated():
        exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
        applied = (
            {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            if exists
            else set()
        )
    return [m.version for m in discover() if m.version not in applied]


async def up(conn: asyncpg.Connection) -> list[Migration]:
    """Apply every pending migration, each in its own transaction. Returns those applied."""
    done = []
    with translated():
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
        try:
            applied = await _applied(conn)
            for migration in discover():
                if migration.version in applied:
                    continue
                async with conn.transaction():
                    await conn.execute(migration.up.read_text())
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        migration.version,
                        migration.name,
                    )
                done.append(migration)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
    return done


async def down(conn: asyncpg.Connection, steps: int | None = None) -> list[Migration]:
    """Roll back the last `steps` applied migrations (all of them when None)."""
    done = []
    with translated():
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
        try:
            applied = await _applied(conn)
            targets = [m for m in reversed(discover()) if m.version in applied]
            for migration in targets if steps is None else targets[:steps]:
                async with conn.transaction():
                    await conn.execute(migration.down.read_text())
                    await conn.execute(
                        "DELETE FROM schema_migrations WHERE version = $1", migration.version
                    )
                done.append(migration)
            if steps is None or not await conn.fetchval("SELECT count(*) FROM schema_migrations"):
                await conn.execute("DROP TABLE IF EXISTS schema_migrations")
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
    return done
