"""The ledger invariant (SPEC §4): each balance equals the sum of its entries, bucket by
bucket; reserved credits equal the pending holds; no reservation is charged twice.
The query is the function credit_check (sql/0008_credit_check.up.sql)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from ledger.db import Conn, fetch


@dataclass(frozen=True)
class Violation:
    organization_id: uuid.UUID
    kind: str
    detail: str


async def check_ledger(conn: Conn, organization_id: uuid.UUID | None = None) -> list[Violation]:
    """Every violation of the invariant, for one organization or all; empty when sound."""
    rows = await fetch(conn, "SELECT * FROM credit_check($1)", organization_id)
    return [Violation(row["organization_id"], row["kind"], row["detail"]) for row in rows]
