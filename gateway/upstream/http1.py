"""A lean HTTP/1.1 client for OpenAI-compatible upstreams: POST a JSON body, read the answer
whole or as it streams, over pooled keep-alive connections.

Why not aiohttp's client, which the rest of the gateway uses: per call it builds request,
response, header, payload and timer objects and a task to write the body; on the proxy's
hot path that was about a quarter of a worker's CPU. Here a call is one write of the
request and llhttp (httptools, the parser uvloop's authors maintain) reading the answer
into a protocol object that is reused with its connection.

What it does, and only that: HTTP/1.1 over TCP or TLS (the system's CA store), bodies framed
by Content-Length, chunked or by the connection's close; gzip/deflate answers decompressed;
informational (1xx) answers skipped; `connect_timeout_s` for opening a connection and
`read_timeout_s` for each wait on the upstream (the first byte, then every next piece). A
connection is reused only once its answer was read to the end and both sides keep it alive;
idle ones are closed after `keepalive_s` or when the server closes them. No proxies, cookies,
redirects or retries: a failed call fails, and the gateway's fallbacks decide what next.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import httptools

HIGH_WATER = 1 << 18  # bytes of body buffered before the socket stops being read
MAX_LINE = 1 << 24  # bytes in one line of a streamed body (an SSE event's data)
MAX_IDLE_PER_ORIGIN = 256  # idle connections kept per upstream
USER_AGENT = "llm-gateway"


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


@dataclass(frozen=True)
class Origin:
    host: str
    port: int
    tls: bool

    @property
    def host_header(self) -> str:
        default = 443 if self.tls else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


def split_url(url: str) -> tuple[Origin, str]:
    """(origin, path with query) of an http(s) URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Origin(parts.hostname, port, tls), path


class _Connection(asyncio.Protocol):
    """One keep-alive connection and the answer being read on it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, read_timeout_s: float) -> None:
        self._loop = loop
        self._read_timeout_s = read_timeout_s
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser: Any = None
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
        self._header_names: list[bytes] = []
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

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._error is not None or self.complete:
            return  # failed already, or idle between answers
        if self.headers_done and not self._framed and exc is None:
            self.complete = True  # the body ran until the close: that was its end
            self._wake()
            return
        reason = f": {exc}" if exc else ""
        self._fail(ConnectionBroken(f"the upstream closed the connection{reason}"))

    def pause_writing(self) -> None:  # requests are small: nothing to hold back
        pass

    def resume_writing(self) -> None:
        pass

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_names.append(name)
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
            self._header_names = []
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
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
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

    def park(self) -> None:
        """Between calls: no timer, and the time it went idle."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.idle_since = time.monotonic()


class Response:
    """An answer whose headers have arrived; its body is read with `read` or `iter_chunks`.
    Leave the `async with` of `Http1Client.post` to give the connection back (or close it,
    if the body was not read to the end)."""

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self.status = conn.status
        self.headers = conn.headers
        encoding = self.headers.get("content-encoding", "identity").lower()
        if encoding in ("gzip", "x-gzip"):
            self._decoder: Any = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._decoder = zlib.decompressobj()
        elif encoding == "identity":
            self._decoder = None
        else:
            raise BadResponse(f"unsupported Content-Encoding {encoding!r}")

    async def read(self) -> bytes:
        parts = [chunk async for chunk in self.iter_chunks()]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        while (chunk := await self._conn.next_chunk()) is not None:
            if self._decoder is None:
                yield chunk
                continue
            try:
                data = self._decoder.decompress(chunk)
            except zlib.error as exc:
                raise BadResponse(f"the body does not decompress: {exc}") from None
            if data:
                yield data
        if self._decoder is not None and (rest := self._decoder.flush()):
            yield rest

    async def iter_lines(self) -> AsyncIterator[bytes]:
        """The body line by line, each with its line ending (the last may have none)."""
        pending = b""
        async for chunk in self.iter_chunks():
            pending += chunk
            start = 0
            while (end := pending.find(b"\n", start)) >= 0:
                yield pending[start : end + 1]
                start = end + 1
            pending = pending[start:]
            if len(pending) > MAX_LINE:
                raise BadResponse(f"a line of the body is longer than {MAX_LINE} bytes")
        if pending:
            yield pending


class Http1Client:
    def __init__(
        self,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        keepalive_s: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._keepalive_s = keepalive_s
        self._ssl = ssl_context
        self._idle: dict[Origin, list[_Connection]] = {}
        self._urls: dict[str, tuple[Origin, str]] = {}
        self._closed = False

    @contextlib.asynccontextmanager
    async def post(
        self, url: str, body: bytes, headers: Sequence[tuple[str, str]]
    ) -> AsyncIterator[Response]:
        """POST `body` (with Host, Content-Length, User-Agent and Accept-Encoding added to
        `headers`) and yield the answer once its headers have arrived."""
        target = self._urls.get(url)
        if target is None:
            target = self._urls[url] = split_url(url)
        origin, path = target
        head = [f"POST {path} HTTP/1.1", f"Host: {origin.host_header}"]
        for name, value in headers:
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                raise ValueError(f"header {name!r} would break the request's framing")
            head.append(f"{name}: {value}")
        head += [
            f"Content-Length: {len(body)}",
            f"User-Agent: {USER_AGENT}",
            "Accept-Encoding: gzip, deflate",
        ]
        # as the server side decoded them: the client's own bytes, if they were not UTF-8
        request = ("\r\n".join(head) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body
        conn = await self._acquire(origin)
        try:
            conn.send(request)
            await conn.wait_headers()
            yield Response(conn)
        except BaseException:
            conn.abort()
            raise
        else:
            self._release(origin, conn)

    async def close(self) -> None:
        self._closed = True
        for conns in self._idle.values():
            for conn in conns:
                conn.abort()
        self._idle.clear()

    async def _acquire(self, origin: Origin) -> _Connection:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.closed or now - conn.idle_since > self._keepalive_s:
                conn.abort()
                continue
            return conn
        return await self._connect(origin)

    async def _connect(self, origin: Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        context = None
        if origin.tls:
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop, self._read_timeout_s),
                    origin.host,
                    origin.port,
                    ssl=context,
                    server_hostname=origin.host if context else None,
                )
        except TimeoutError:
            raise ConnectFailed(
                f"no connection to {origin.host_header} in {self._connect_timeout_s:g} s"
            ) from None
        except (OSError, ssl.SSLError) as exc:
            raise ConnectFailed(f"cannot connect to {origin.host_header}: {exc}") from None
        return conn

    def _release(self, origin: Origin, conn: _Connection) -> None:
        if self._closed or not conn.reusable():
            conn.abort()
            return
        idle = self._idle.setdefault(origin, [])
        # the stack is used from its top: under steady traffic its bottom would stay idle
        # (and open) forever, so those past keepalive_s are closed here
        now = time.monotonic()
        while idle and now - idle[0].idle_since > self._keepalive_s:
            idle.pop(0).abort()
        if len(idle) >= MAX_IDLE_PER_ORIGIN:
            conn.abort()
            return
        conn.park()
        idle.append(conn)
