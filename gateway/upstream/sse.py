"""Server-sent events: reading a provider's stream and writing the client's."""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from gateway import jsonio
from gateway.upstream.base import UpstreamProtocolError

DONE = b"[DONE]"
MAX_LINE = 1 << 24  # bytes in one line of a stream (an event's data)


class DataReader:
    """The `data:` payload of each event of a stream (multi-line data joined with newlines),
    from the body's pieces as `next_chunk` returns them (None at the end)."""

    def __init__(
        self, next_chunk: Callable[[], Awaitable[bytes | None]], max_line: int = MAX_LINE
    ) -> None:
        self._next_chunk = next_chunk
        self._max_line = max_line
        self._partial = b""  # the start of a line whose end has not arrived yet
        self._data: list[bytes] = []  # the data lines of the event being read
        self._events: deque[bytes] = deque()
        self._ended = False

    async def next(self) -> bytes | None:
        """The next event's data; None once the body has ended."""
        while not self._events:
            if self._ended:
                return None
            chunk = await self._next_chunk()
            if chunk is None:
                self._ended = True
                self._line(self._partial)
                self._dispatch()  # an event the body ended without a blank line after
            else:
                self._feed(chunk)
        return self._events.popleft()

    def _feed(self, chunk: bytes) -> None:
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > self._max_line:
            raise UpstreamProtocolError(f"an event line is longer than {self._max_line} bytes")
        for line in lines:
            self._line(line)

    def _line(self, line: bytes) -> None:
        line = line.rstrip(b"\r")
        if not line:
            self._dispatch()
        elif line.startswith(b"data:"):
            self._data.append(line[5:].removeprefix(b" "))

    def _dispatch(self) -> None:
        if self._data:
            self._events.append(b"\n".join(self._data))
            self._data = []


def encode(payload: dict[str, Any]) -> bytes:
    """One `data:` event for a JSON payload."""
    return b"data: " + jsonio.dumps(payload) + b"\n\n"


DONE_EVENT = b"data: [DONE]\n\n"
