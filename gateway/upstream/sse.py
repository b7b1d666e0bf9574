"""Server-sent events: reading a provider's stream and writing the client's."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

from gateway import jsonio

DONE = b"[DONE]"


async def iter_data(content: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """The `data:` payload of each event (multi-line data joined with newlines), from the
    body's lines."""
    lines: list[bytes] = []
    async for raw in content:
        line = raw.rstrip(b"\r\n")
        if not line:
            if lines:
                yield b"\n".join(lines)
                lines = []
            continue
        if line.startswith(b"data:"):
            lines.append(line[5:].removeprefix(b" "))
    if lines:
        yield b"\n".join(lines)


def encode(payload: dict[str, Any]) -> bytes:
    """One `data:` event for a JSON payload."""
    return b"data: " + jsonio.dumps(payload) + b"\n\n"


DONE_EVENT = b"data: [DONE]\n\n"
