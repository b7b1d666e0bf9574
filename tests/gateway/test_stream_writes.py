"""How a relayed stream reaches the socket: events at hand leave together, and the end of the
body leaves with what is still queued (the final usage and [DONE]): one system call, and one
wake-up of the client, fewer per stream."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.streaming import StreamedResponse


def _counting(transport: Any, writes: list[bytes]) -> None:
    """Record every write the response makes on `transport` (one entry per system call)."""
    write, writelines = transport.write, transport.writelines

    def counted_write(data: bytes) -> None:
        writes.append(bytes(data))
        write(data)

    def counted_writelines(chunks: Any) -> None:
        chunks = [bytes(c) for c in chunks]
        writes.append(b"".join(chunks))
        writelines(chunks)

    transport.write, transport.writelines = counted_write, counted_writelines


async def test_the_end_of_a_stream_leaves_with_the_last_events_in_one_write() -> None:
    writes: list[bytes] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        response = StreamedResponse(capture=True, headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        assert request.transport is not None
        _counting(request.transport, writes)
        await response.send(b"data: 1\n\n")
        await response.send(b"data: 2\n\n")  # at hand with the first: the same write
        await asyncio.sleep(0.01)
        await response.send(b"data: usage\n\n")
        await response.send(b"data: [DONE]\n\n")
        await response.write_eof()
        assert (
            bytes(response.captured or b"")
            == b"data: 1\n\ndata: 2\n\ndata: usage\n\ndata: [DONE]\n\n"
        )
        return response

    app = web.Application()
    app.router.add_get("/", handler)
    async with TestServer(app) as server, aiohttp.ClientSession() as session:
        async with session.get(server.make_url("/")) as resp:
            body = await resp.read()
    assert body == b"data: 1\n\ndata: 2\n\ndata: usage\n\ndata: [DONE]\n\n"
    assert len(writes) == 2, writes
    assert b"data: 1\n\ndata: 2\n\n" in writes[0]
    assert b"data: usage\n\ndata: [DONE]\n\n" in writes[1]
    assert writes[1].endswith(b"\r\n0\r\n\r\n")  # the chunked body's end, in the same write


async def test_a_write_under_way_ends_before_the_end_of_the_body() -> None:
    """A client slow to read: the writer waits on a full socket buffer, and what is queued
    meanwhile still leaves, in order, before the end of the body."""
    piece = b"data: " + b"x" * 60_000 + b"\n\n"  # below the relay's own flush threshold
    waited: list[bool] = []
    sent: list[bytes] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
        )
        response = StreamedResponse(capture=False, headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        while len(sent) < 40 and not response._writing:  # until a write waits for the client
            await response.send(piece)
            sent.append(piece)
            await asyncio.sleep(0.02)
        waited.append(response._writing)
        await response.send(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/", handler)
    async with TestServer(app) as server:
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting
        client.setblocking(False)
        await asyncio.get_running_loop().sock_connect(client, (server.host, server.port))
        reader, writer = await asyncio.open_connection(sock=client)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await asyncio.sleep(0.2)  # not reading yet
        raw = await reader.read(-1)
        writer.close()
    assert waited == [True]
    head, _, chunked = raw.partition(b"\r\n\r\n")
    body, rest = b"", chunked
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        body, rest = body + rest[:size], rest[size + 2 :]
    assert head.startswith(b"HTTP/1.1 200")
    assert body == b"".join(sent) + b"data: [DONE]\n\n"
