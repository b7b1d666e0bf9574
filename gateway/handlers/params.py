"""Query parameters shared by the paginated routes."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from aiohttp import web

from gateway.errors import InvalidRequest
from ledger.transactions import TransactionType

DEFAULT_PAGE = 50
MAX_PAGE = 500


def _time(request: web.Request, name: str) -> datetime | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"{name} must be an ISO 8601 time.", param=name) from None
    if value.tzinfo is None:
        raise InvalidRequest(f"{name} must carry a time zone (e.g. Z).", param=name)
    return value


def page_query(request: web.Request) -> dict[str, Any]:
    """limit, cursor, type (repeatable or comma-separated), since, until."""
    try:
        limit = int(request.query.get("limit", DEFAULT_PAGE))
    except ValueError:
        raise InvalidRequest("limit must be an integer.", param="limit") from None
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidRequest(f"limit must be between 1 and {MAX_PAGE}.", param="limit")
    names = [n for raw in request.query.getall("type", []) for n in raw.split(",") if n]
    try:
        types = frozenset(TransactionType(n) for n in names) or None
    except ValueError:
        raise InvalidRequest(
            f"type must be one of {', '.join(t.value for t in TransactionType)}.", param="type"
        ) from None
    return {
        "limit": limit,
        "cursor": request.query.get("cursor") or None,
        "types": types,
        "since": _time(request, "since"),
        "until": _time(request, "until"),
    }
