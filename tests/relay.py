"""A TCP relay in front of a server (PostgreSQL, Redis) that a test can cut, as a network
partition would, and restore on the same address."""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from urllib.parse import parse_qs, urlsplit


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    writer.close()


class Relay:
    """`url` seen through a loopback port: `open` gives the relayed URL, `cut` drops every
    connection and refuses new ones, `restore` listens again on the same port."""

    def __init__(self, url: str) -> None:
        self.url = urlsplit(url)
        self.port = 0
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def open(self) -> str:
        """The URL through the relay (credentials and path kept; a Unix-socket `host=`
        query, as the embedded PostgreSQL's URL has, becomes the relay's TCP address)."""
        await self.restore()
        userinfo, at, _ = self.url.netloc.rpartition("@")
        query = "&".join(p for p in self.url.query.split("&") if p and not p.startswith("host="))
        return self.url._replace(
            netloc=f"{userinfo}{at}127.0.0.1:{self.port}", query=query
        ).geturl()

    async def restore(self) -> None:
        if self.server is None:
            self.server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
            self.port = self.server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        if self.server is not None:
            self.server.close()
            self._abort()
            await self.server.wait_closed()
            self.server = None
        await asyncio.sleep(0.05)  # let the clients notice their connections are gone

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self._abort()
            await self.server.wait_closed()
            self.server = None

    async def __aenter__(self) -> Relay:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        socket_dir = parse_qs(self.url.query).get("host", [""])[0]
        if socket_dir.startswith("/"):  # PostgreSQL on a Unix socket
            path = f"{socket_dir}/.s.PGSQL.{self.url.port or 5432}"
            return await asyncio.open_unix_connection(path)
        return await asyncio.open_connection(self.url.hostname or "127.0.0.1", self.url.port)

    def _abort(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await self._connect()
        except OSError:
            client_w.transport.abort()
            return
        pair = {client_w, server_w}
        self.writers |= pair
        try:
            await asyncio.gather(_pipe(client_r, server_w), _pipe(server_r, client_w))
        finally:
            self.writers -= pair
