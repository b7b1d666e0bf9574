"""Migrations 0007 to 0012 (the batch functions and their successors) rolled back and
applied again: the single operations work at each end, the batches once they are back."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import asyncpg
import pytest

from gateway.config import Config
from ledger import catalog_sync, migrations, reservations
from ledger.check import check_ledger
from ledger.errors import (
    IdempotencyConflict,
    InsufficientCredits,
    InvalidArgument,
    UnknownOrganization,
)
from ledger.reservations import HoldRequest, Reservation, ReservationStatus
from tests.ledger.helpers import CREDIT, TTL_S, hold, new_org

PENDING = ReservationStatus.PENDING


async def _has_batches(conn: asyncpg.Connection) -> bool:
    names: Sequence[str] = ("credit_reserve_batch", "credit_settle_batch", "credit_check_batch")
    found = await conn.fetchval(
        "SELECT count(*) FROM pg_proc WHERE proname = ANY($1::text[])", list(names)
    )
    assert found in (0, len(names))
    return bool(found)


async def _single_operations_work(conn: asyncpg.Connection, tag: str) -> None:
    org = await new_org(conn, "pro")
    held = await hold(conn, org.id, f"{tag}-hold", CREDIT, 2 * CREDIT)
    assert (held.status, held.amount_micro, held.spendable_micro) == (PENDING, 2 * CREDIT,
                                                                      533 * CREDIT)  # fmt: skip
    again = await hold(conn, org.id, f"{tag}-hold", CREDIT, 2 * CREDIT)
    assert (again.id, again.replayed) == (held.id, True)
    done = await reservations.settle(conn, org.id, held.id, CREDIT)
    assert (done.applied, done.available_micro, done.spendable_micro) == (
        True, 524 * CREDIT, 534 * CREDIT)  # fmt: skip
    with pytest.raises(InsufficientCredits):
        await hold(conn, org.id, f"{tag}-big", 600 * CREDIT, 600 * CREDIT)
    with pytest.raises(UnknownOrganization):
        await hold(conn, uuid.uuid4(), f"{tag}-nobody", 1, 2)
    with pytest.raises(IdempotencyConflict):
        await reservations.settle(conn, org.id, held.id, 2 * CREDIT)
    with pytest.raises(InvalidArgument):
        await reservations.settle(conn, org.id, held.id, -1)


async def test_migrations_0007_to_0012_down_and_up_keep_the_single_operations(
    empty_db: asyncpg.Connection, config: Config
) -> None:
    await migrations.up(empty_db)
    await catalog_sync.seed(empty_db, config)
    assert await _has_batches(empty_db)
    # 0012 (both kinds at once), 0011 (fewer statements), 0010 (the rules), 0009
    # (credit_store_balance in PL/pgSQL), 0008 (the check), then 0007
    rolled_back = await migrations.down(empty_db, 6)
    assert [m.version for m in rolled_back] == [12, 11, 10, 9, 8, 7]
    assert not await _has_batches(empty_db)
    await _single_operations_work(empty_db, "down")  # the 0004 functions are back

    applied = await migrations.up(empty_db)
    assert [m.version for m in applied] == [7, 8, 9, 10, 11, 12]
    assert await _has_batches(empty_db)
    await _single_operations_work(empty_db, "up")
    org = await new_org(empty_db, "free")
    [batched] = await reservations.reserve_batch(
        empty_db, [HoldRequest(org.id, "batched", CREDIT, CREDIT, TTL_S)]
    )
    assert isinstance(batched, Reservation) and batched.spendable_micro == 19 * CREDIT
    assert await check_ledger(empty_db) == []
