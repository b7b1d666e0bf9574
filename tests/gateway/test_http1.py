"""The upstream HTTP/1.1 client (gateway/upstream/http1.py) against small servers that write
exact bytes: every framing, keep-alive and reuse, and each way an answer can fail. Each
test runs on asyncio's loop and on uvloop's (the one `serve` uses)."""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest
import uvloop

from gateway.upstream import http1, sse

Reply = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
JSON = [("Content-Type", "application/json")]


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, None]], None]:
    def runner(coro: Coroutine[Any, Any, None]) -> None:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as loop:
            loop.run(asyncio.wait_for(coro, 20))

    return runner


class Server:
    """Answers each request on a connection with the next of `replies`; counts connections
    and keeps the requests' heads."""

    def __init__(self, *replies: Reply) -> None:
        self.replies = list(replies)
        self.connections = 0
        self.closed = 0
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1/chat/completions"

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.replies:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                self.heads.append(head)
                self.bodies.append(await reader.readexactly(length))
                await self.replies.pop(0)(reader, writer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed += 1
            writer.close()


def raw(data: bytes, *, close: bool = False, pause_s: float = 0.0) -> Reply:
    async def reply(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        if pause_s:
            await writer.drain()
            await asyncio.sleep(pause_s)
        if close:
            await writer.drain()
            writer.close()

    return reply


def sized(body: bytes, extra: str = "") -> Reply:
    return raw(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body)


def client(read_timeout_s: float = 5.0) -> http1.Http1Client:
    return http1.Http1Client(connect_timeout_s=2.0, read_timeout_s=read_timeout_s)


async def post(http: http1.Http1Client, url: str, body: bytes = b"{}") -> tuple[int, bytes]:
    async with http.post(url, body, JSON) as resp:
        return resp.status, await resp.read()


def test_answers_are_read_whole_and_the_connection_reused(run: Any) -> None:
    async def scenario() -> None:
        server = Server(sized(b'{"a":1}'), sized(b'{"b":2}'))
        async with server as url:
            http = client()
            assert await post(http, url, b'{"x":"y"}') == (200, b'{"a":1}')
            assert await post(http, url) == (200, b'{"b":2}')
            await http.close()
        assert server.connections == 1
        head = server.heads[0].decode()
        assert head.startswith("POST /v1/chat/completions HTTP/1.1\r\n")
        assert f"Host: 127.0.0.1:{url.split(':')[2].split('/')[0]}\r\n" in head
        assert "Content-Type: application/json\r\n" in head
        assert server.bodies[0] == b'{"x":"y"}'

    run(scenario())


def test_chunked_bodies_stream_in_events(run: Any) -> None:
    events = [b"data: {}\n\n", b"data: [DONE]\n\n"]
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"

    async def simple() -> None:
        async def in_two_parts(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(head + chunked[:9])
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(chunked[9:])

        server = Server(in_two_parts, sized(b"next"))
        async with server as url:
            http = client()
            async with http.post(url, b"{}", JSON) as resp:
                reader = sse.DataReader(resp.next_chunk)
                events = []
                while (event := await reader.next()) is not None:
                    events.append(event)
            assert events == [b"{}", b"[DONE]"]
            assert await post(http, url) == (200, b"next")
            await http.close()
        assert server.connections == 1

    run(simple())


def test_a_body_ended_by_the_close_and_connection_close_are_not_reused(run: Any) -> None:
    async def scenario() -> None:
        server = Server(
            raw(b"HTTP/1.1 200 OK\r\n\r\nuntil the end", close=True),
            sized(b"closing", "Connection: close\r\n"),
            sized(b"third"),
        )
        async with server as url:
            http = client()
            assert await post(http, url) == (200, b"until the end")
            assert await post(http, url) == (200, b"closing")
            assert await post(http, url) == (200, b"third")
            await http.close()
        assert server.connections == 3

    run(scenario())


def test_informational_answers_are_skipped_and_gzip_decoded(run: Any) -> None:
    packed = gzip.compress(b'{"ok":true}')
    deflated = zlib.compress(b'{"deflated":true}')

    async def scenario() -> None:
        server = Server(
            raw(b"HTTP/1.1 100 Continue\r\n\r\n"),
            sized(packed, "Content-Encoding: gzip\r\n"),
            sized(deflated, "Content-Encoding: deflate\r\n"),
        )
        # the 100 and the gzip answer go to the same request
        first, second = server.replies[0], server.replies[1]

        async def both(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await first(r, w)
            await second(r, w)

        server.replies[:2] = [both]
        async with server as url:
            http = client()
            assert await post(http, url) == (200, b'{"ok":true}')
            assert await post(http, url) == (200, b'{"deflated":true}')
            await http.close()

    run(scenario())


def test_a_body_left_unread_closes_its_connection(run: Any) -> None:
    async def scenario() -> None:
        server = Server(sized(b"x" * 4_000_000), sized(b"fresh"))  # beyond HIGH_WATER
        async with server as url:
            http = client()
            async with http.post(url, b"{}", JSON) as resp:
                assert resp.status == 200  # the body is never read
            assert await post(http, url) == (200, b"fresh")
            await http.close()
        assert server.connections == 2

    run(scenario())


def test_failures_are_typed(run: Any) -> None:
    async def scenario() -> None:
        http = client(read_timeout_s=0.2)
        server = Server(raw(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", close=True))
        async with server as url:
            with pytest.raises(http1.ConnectionBroken):
                await post(http, url)
        server = Server(raw(b"not http at all\r\n\r\n"))
        async with server as url:
            with pytest.raises(http1.BadResponse):
                await post(http, url)
        server = Server(raw(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", pause_s=1))
        async with server as url:
            with pytest.raises(http1.ReadTimeout):
                await post(http, url)
        server = Server(raw(b"", pause_s=1))  # not even the headers
        async with server as url:
            with pytest.raises(http1.ReadTimeout):
                await post(http, url)
        with pytest.raises(http1.ConnectFailed):
            await post(http, url)  # that server is gone: nothing listens there
        with pytest.raises(ValueError, match="framing"):
            async with http.post(url, b"{}", [("X-Evil", "a\r\nHost: elsewhere")]):
                pass
        await http.close()

    run(scenario())


def test_a_connection_the_server_closed_while_idle_is_not_used(run: Any) -> None:
    async def scenario() -> None:
        async def answer_then_hang_up(_: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await sized(b"one")(_, w)
            await w.drain()
            w.close()

        server = Server(answer_then_hang_up, sized(b"two"))
        async with server as url:
            http = client()
            assert await post(http, url) == (200, b"one")
            await asyncio.sleep(0.1)  # the close arrives while the connection is idle
            assert await post(http, url) == (200, b"two")
            await http.close()
        assert server.connections == 2

    run(scenario())


def test_connections_idle_past_keepalive_are_closed_under_steady_traffic(run: Any) -> None:
    async def scenario() -> None:
        server = Server(*[sized(b"ok") for _ in range(200)])
        async with server as url:
            http = http1.Http1Client(connect_timeout_s=2, read_timeout_s=5, keepalive_s=0.2)
            await asyncio.gather(*(post(http, url) for _ in range(3)))  # three connections
            assert server.connections == 3
            for _ in range(8):  # one call at a time: only the top connection is used
                assert await post(http, url) == (200, b"ok")
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.05)
            assert server.connections == 3 and server.closed == 2  # the two left idle
            await http.close()

    run(scenario())
