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
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from gateway.upstream.http1_connection import (
    BadResponse,
    ConnectFailed,
    Connection,
    ConnectionBroken,
    HttpError,
    ReadTimeout,
)

__all__ = [
    "BadResponse",
    "ConnectFailed",
    "ConnectionBroken",
    "Http1Client",
    "HttpError",
    "ReadTimeout",
    "Response",
    "split_url",
]

MAX_IDLE_PER_ORIGIN = 256  # idle connections kept per upstream
USER_AGENT = "llm-gateway"


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


class Response:
    """An answer whose headers have arrived; its body is read with `read` or `next_chunk`.
    Leave the `async with` of `Http1Client.post` to give the connection back (or close it,
    if the body was not read to the end)."""

    def __init__(self, conn: Connection) -> None:
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
        self._ended = False

    @property
    def received_all(self) -> bool:
        """The whole answer has arrived: reading the rest of it will not wait."""
        return self._conn.complete

    async def read(self) -> bytes:
        parts = []
        while (chunk := await self.next_chunk()) is not None:
            parts.append(chunk)
        return b"".join(parts)

    async def next_chunk(self) -> bytes | None:
        """The next piece of the body, decoded, as it arrives; None at its end. (A method,
        not an async generator: one abandoned mid-body would be finalized by a task of the
        event loop's, scheduled through a thread-safe wake-up, a system call.)"""
        while not self._ended:
            chunk = await self._conn.next_chunk()
            if chunk is None:
                self._ended = True
                if self._decoder is not None and (rest := self._decoder.flush()):
                    return bytes(rest)
                return None
            if self._decoder is None:
                return chunk
            try:
                data = self._decoder.decompress(chunk)
            except zlib.error as exc:
                raise BadResponse(f"the body does not decompress: {exc}") from None
            if data:
                return bytes(data)
        return None


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
        self._idle: dict[Origin, list[Connection]] = {}
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

    async def _acquire(self, origin: Origin) -> Connection:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.closed or now - conn.idle_since > self._keepalive_s:
                conn.abort()
                continue
            return conn
        return await self._connect(origin)

    async def _connect(self, origin: Origin) -> Connection:
        loop = asyncio.get_running_loop()
        context = None
        if origin.tls:
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: Connection(loop, self._read_timeout_s),
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

    def _release(self, origin: Origin, conn: Connection) -> None:
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
