"""A TCP relay in front of a server (PostgreSQL, Redis) that a test can cut, as a network
partition would, and restore on the same address."""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from urllib.parse import urlsplit


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
        """The URL through the relay (credentials and path kept)."""
        await self.restore()
        userinfo, at, _ = self.url.netloc.rpartition("@")
        return self.url._replace(netloc=f"{userinfo}{at}127.0.0.1:{self.port}").geturl()

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

    def _abort(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        target = (self.url.hostname or "127.0.0.1", self.url.port)
        try:
            server_r, server_w = await asyncio.open_connection(*target)
        except OSError:
            client_w.transport.abort()
            return
        pair = {client_w, server_w}
        self.writers |= pair
        try:
            await asyncio.gather(_pipe(client_r, server_w), _pipe(server_r, client_w))
        finally:
            self.writers -= pair
