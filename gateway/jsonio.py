"""JSON on the hot path: orjson's speed where it gives the same answer as the standard
library, the standard library where it would not.

`dumps` falls back to `json` for what orjson refuses (integers beyond 64 bits, non-string
keys, lone surrogates). `loads_request` (client bodies) gives what `json` gives: orjson
reads an integer beyond 64 bits as a float, so a body with a run of 19 digits or more goes
to `json`, as does one orjson refuses (lone surrogates, UTF-16, NaN: `json` then decides).
Upstream answers and stream chunks are read by orjson alone (`loads`; no OpenAI-compatible
upstream sends such integers)."""

from __future__ import annotations

import json
import re
from typing import Any

import orjson


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, separators=(",", ":")).encode()  # ASCII: escapes all


def dumps_text(value: Any, default: Any = None) -> str:
    """Compact JSON as text; `default` turns what JSON cannot hold into something it can."""
    try:
        return orjson.dumps(value, default=default).decode()
    except TypeError:
        return json.dumps(value, separators=(",", ":"), default=default)


def loads(data: bytes | str) -> Any:
    """Raises ValueError on anything that is not JSON."""
    return orjson.loads(data)


_LONG_NUMBER = re.compile(rb"[0-9]{19}")  # 18 digits always fit in 64 bits


def loads_request(data: bytes) -> Any:
    """As `json.loads` (NaN and Infinity refused): raises ValueError or UnicodeDecodeError on
    anything that is not JSON; integers of any size exact."""
    if not _LONG_NUMBER.search(data):
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass  # the standard library's own verdict, and its message
    return json.loads(data, parse_constant=_not_json)


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")
