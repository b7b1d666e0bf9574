"""JSON on the hot path: orjson's speed where it gives the same answer as the standard
library, the standard library where it would not.

`dumps` falls back to `json` for what orjson refuses (integers beyond 64 bits, non-string
keys, lone surrogates). Request bodies are still parsed by `json` (exact integers of any
size, passed upstream untouched); upstream answers and stream chunks by orjson, which reads
an integer beyond 64 bits as a float (no OpenAI-compatible upstream sends one)."""

from __future__ import annotations

import json
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
