"""Low-balance notifications (SPEC §4): after a charge, an organization whose available
credits fell below `low_balance_ratio` of its monthly allocation, or whose spendable credits
are at most one credit, is notified: logged, counted, and POSTed to `notify_webhook_url`
by the jobs (with retries) — at most once per threshold per organization per day."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import aiohttp

from gateway.metrics import Metrics
from ledger import notifications
from ledger.db import Conn
from ledger.reservations import Settlement
from policies.catalog import MICRO_PER_CREDIT
from policies.pricing import credits_number

log = logging.getLogger(__name__)

DEPLETED_AT_MICRO = MICRO_PER_CREDIT  # spendable at or below one credit is "depleted"
DELIVERY_TIMEOUT_S = 10.0


def thresholds(settlement: Settlement, ratio: Decimal) -> list[str]:
    crossed = []
    if settlement.available_micro < ratio * settlement.monthly_credits_micro:
        crossed.append("low_balance")
    if settlement.spendable_micro <= DEPLETED_AT_MICRO:
        crossed.append("depleted")
    return crossed


class Notifier:
    """Records notifications on the hot path; remembers what it recorded today, so an
    organization that stays low costs no further database round trips."""

    def __init__(self, ratio: Decimal, metrics: Metrics) -> None:
        self.ratio = ratio
        self.metrics = metrics
        self.seen: set[tuple[str, str, str]] = set()

    async def after_charge(
        self, conn: Conn, organization_id: uuid.UUID, settlement: Settlement
    ) -> None:
        crossed = thresholds(settlement, self.ratio)
        if not crossed:
            return
        now = datetime.now(UTC)
        today = now.date()
        for threshold in crossed:
            marker = (str(organization_id), threshold, today.isoformat())
            if marker in self.seen:
                continue
            payload = {
                "type": threshold,
                "organization_id": str(organization_id),
                "available": credits_number(settlement.available_micro),
                "spendable": credits_number(settlement.spendable_micro),
                "monthly_credits": credits_number(settlement.monthly_credits_micro),
                "at": now.isoformat().replace("+00:00", "Z"),
            }
            recorded = await notifications.record(conn, organization_id, threshold, today, payload)
            if len(self.seen) > 100_000:
                self.seen.clear()
            self.seen.add(marker)  # only once PostgreSQL has the row (or had it already)
            if recorded:
                self.metrics.notifications.labels(threshold).inc()
                log.warning(
                    "%s: organization %s", threshold, organization_id, extra={"fields": payload}
                )


async def deliver(conn: Conn, session: aiohttp.ClientSession, url: str | None) -> int:
    """POST undelivered notifications; returns how many got through."""
    delivered = 0
    for item in await notifications.undelivered(conn):
        ok = url is None  # no webhook configured: logging and counting was the delivery
        if url is not None:
            try:
                async with session.post(
                    url, json=item.payload, timeout=aiohttp.ClientTimeout(total=DELIVERY_TIMEOUT_S)
                ) as r:
                    ok = r.status < 300
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("notification webhook failed: %s", type(exc).__name__)
        await notifications.mark(conn, item, delivered=ok)
        delivered += ok
    return delivered
