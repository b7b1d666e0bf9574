"""The protocol side of gateway/upstream/http1.py: one keep-alive connection, llhttp
(httptools) parsing each answer into it, the waits on the upstream with their read timeout,
and the failures a call can end in."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import cast

import httptools

HIGH_WATER = 1 << 18  # bytes of body buffered before the socket stops being read


class HttpError(Exception):
    """The call failed; nothing is known of the answer beyond what the subclass says."""


class ConnectFailed(HttpError):
    """No connection could be opened (refused, unresolvable, TLS, or connect timeout)."""


class ReadTimeout(HttpError):
    """The upstream sent nothing for `read_timeout_s` while an answer was awaited."""


class ConnectionBroken(HttpError):
    """The connection closed before the answer was complete."""


class BadResponse(HttpError):
    """The upstream's bytes are not an HTTP answer this client understands."""


class Connection(asyncio.Protocol):
    """One keep-alive connection and the answer being read on it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, read_timeout_s: float) -> None:
        self._loop = loop
        self._read_timeout_s = read_timeout_s
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._waiting_since = 0.0
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._error: HttpError | None = None
        self._paused = False
        # one parser for the connection's life: llhttp starts on the next answer by itself
        self._parser = httptools.HttpResponseParser(self)
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.headers_done = False
        self.complete = False
        self._keep_alive = False
        self._framed = False  # Content-Length or chunked: the end is known without a close
        self._chunks: deque[bytes] = deque()
        self._buffered = 0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._last_read = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(BadResponse("the upstream switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(BadResponse(f"not an HTTP/1.1 answer: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._stop_timer()
        if self._error is not None or self.complete:
            return  # failed already, or idle between answers
        if self.headers_done and not self._framed and exc is None:
            self.complete = True  # the body ran until the close: that was its end
            self._wake()
            return
        reason = f": {exc}" if exc else ""
        self._fail(ConnectionBroken(f"the upstream closed the connection{reason}"))

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        if self.status >= 200:
            self.headers_done = True
            framing = self.headers.get("transfer-encoding", "").lower()
            self._framed = "content-length" in self.headers or "chunked" in framing
            self._wake()

    def on_body(self, body: bytes) -> None:
        if not self.headers_done:
            return  # a 1xx has no body; nothing else comes before the headers
        self._chunks.append(bytes(body))
        self._buffered += len(body)
        if self._buffered >= HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if not self.headers_done:  # an informational answer: the real one follows
            self.headers = {}
            return
        self.complete = True
        self._keep_alive = bool(self._parser.should_keep_alive())  # known only at this point
        self._wake()

    # reading the answer

    def send(self, request: bytes) -> None:
        assert self.transport is not None
        self._reset()
        self._error = None
        self._last_read = self._loop.time()
        self.transport.write(request)

    async def wait_headers(self) -> None:
        while not self.headers_done:
            await self._wait()

    async def next_chunk(self) -> bytes | None:
        """The next piece of the body as received; None at its end."""
        while not self._chunks:
            if self.complete:
                return None
            await self._wait()
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._paused and self._buffered < HIGH_WATER // 2 and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return chunk

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        if self.closed:
            raise ConnectionBroken("the upstream closed the connection")
        waiter = self._waiter = self._loop.create_future()
        self._waiting_since = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_at(
                self._waiting_since + self._read_timeout_s, self._check_timeout
            )
        try:
            await waiter
        finally:
            self._waiter = None

    def _check_timeout(self) -> None:
        """Fires at most once per read_timeout_s; a wait with no data for that long fails."""
        self._timer = None
        if self._waiter is None:
            return
        quiet_since = max(self._last_read, self._waiting_since)
        due = quiet_since + self._read_timeout_s
        if self._loop.time() >= due:
            self._fail(ReadTimeout(f"no data from the upstream in {self._read_timeout_s:g} s"))
        else:
            self._timer = self._loop.call_at(due, self._check_timeout)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, error: HttpError) -> None:
        if self._error is None:
            self._error = error
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(error)
        self.abort()

    def abort(self) -> None:
        self.closed = True
        self._stop_timer()
        if self.transport is not None:
            self.transport.abort()

    def reusable(self) -> bool:
        return (
            self.complete
            and not self.closed
            and self._error is None
            and self.transport is not None
            and not self.transport.is_closing()
            and self._keep_alive
        )

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def park(self) -> None:
        """Between calls: no timer, and the time it went idle."""
        self._stop_timer()
        self.idle_since = time.monotonic()
