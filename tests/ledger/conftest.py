"""Fixtures of the ledger tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.support import RUN_ID, create_database, drop_database


@pytest.fixture
async def empty_db(
    postgres_server_url: str, request: pytest.FixtureRequest
) -> AsyncIterator[asyncpg.Connection]:
    """A connection to a database of this test module's own, with no migrations applied."""
    name = f"gwt_{RUN_ID}_empty_{request.module.__name__.rsplit('.', 1)[-1]}"
    conn = await asyncpg.connect(await create_database(postgres_server_url, name))
    try:
        yield conn
    finally:
        await conn.close()
        await drop_database(postgres_server_url, name)
