"""Streamed calls: chunks relayed as server-sent events and metered as they pass; the call is
settled at the end whatever happens (upstream break, client gone, cancellation)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from gateway import outcomes, pipeline
from gateway.errors import error_body
from gateway.pipeline import Attempt, Call
from gateway.services import Services
from gateway.upstream import sse
from gateway.upstream.base import Completion, UpstreamError, UpstreamProtocolError, Usage
from policies import tokens
from policies.pricing import credits_number

log = logging.getLogger(__name__)

DRAIN_AFTER_DISCONNECT_S = 10.0  # how long to keep reading for usage once the client is gone
MAX_PENDING_BYTES = 1 << 16  # events queued for a client before the relay waits for it

Chunks = AsyncIterator[dict[str, Any]]


class StreamedResponse(web.StreamResponse):
    """An SSE response that can keep a copy of what it sent (for Idempotency-Key replays).

    Events are written by a task of their own: those the relay passes on while it still has
    more at hand (an upstream burst, the final usage and [DONE]) leave in one write, and so
    one system call, instead of one each; an event that arrives alone leaves at once. The
    headers wait for the first of them, and leave in the same write."""

    _send_headers_immediately = False  # aiohttp's switch (its Response's default)

    def __init__(self, *, capture: bool, headers: dict[str, str]) -> None:
        super().__init__(headers=headers)
        self.captured: bytearray | None = bytearray() if capture else None
        self._pending = bytearray()
        self._writer: asyncio.Task[None] | None = None
        self._writing = False  # the writer is waiting on a write
        self._broken = False

    async def send(self, data: bytes) -> None:
        """Queue `data`; raises ConnectionResetError once the client is known to be gone."""
        if self._broken:
            raise ConnectionResetError("the client has gone")
        if self.captured is not None:
            self.captured += data
        self._pending += data
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_pending())
        if len(self._pending) >= MAX_PENDING_BYTES:  # a slow reader holds the relay back
            await self.flush()

    @property
    def broken(self) -> bool:
        """A write failed: the client has gone."""
        return self._broken

    async def flush(self) -> None:
        """Wait until everything queued is written."""
        if self._writer is not None:
            await asyncio.shield(self._writer)
        if self._broken:
            raise ConnectionResetError("the client has gone")

    async def write_eof(self, data: bytes = b"") -> None:
        """The end of the body leaves in one write with whatever is still queued (the final
        usage and [DONE]), unless a write is under way: that one ends first."""
        if self._writing:
            await self.flush()
        if self._broken:
            raise ConnectionResetError("the client has gone")
        if self._pending:  # the writer has not started: it will find nothing left
            data = bytes(self._pending) + data
            self._pending.clear()
        await super().write_eof(data)

    async def _write_pending(self) -> None:
        try:
            while self._pending:
                data = bytes(self._pending)
                self._pending.clear()
                self._writing = True
                try:
                    await self.write(data)
                finally:
                    self._writing = False
        except ConnectionResetError:
            self._broken = True
            self._pending.clear()


def captured_body(response: web.StreamResponse) -> bytes:
    if isinstance(response, StreamedResponse):
        return bytes(response.captured or b"")
    body = getattr(response, "body", None)
    return body if isinstance(body, bytes) else b""


class Meter:
    """Counts what a stream produced, for when no usage arrives."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.template: dict[str, Any] = {}

    def add(self, chunk: dict[str, Any]) -> None:
        self.template = {k: chunk[k] for k in ("id", "object", "created", "model") if k in chunk}
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if isinstance(delta.get("content"), str):
                self.text.append(delta["content"])
            for call in delta.get("tool_calls") or ():
                arguments = (call.get("function") or {}).get("arguments")
                if isinstance(arguments, str):
                    self.text.append(arguments)

    def usage(self, prompt_tokens: int) -> Usage:
        return Usage(prompt_tokens, tokens.count_text_tokens("".join(self.text)))


async def open_stream(services: Services, call: Call) -> tuple[Attempt, Chunks, dict[str, Any]]:
    """The first candidate that yields a first chunk; fallbacks happen only before then."""

    async def start(attempt: Attempt) -> tuple[Chunks, dict[str, Any]]:
        client = services.clients[attempt.target.kind]
        body = pipeline.upstream_body(call, attempt)
        chunks = client.chat_stream(attempt.target, body, call.upstream_headers)
        try:
            return chunks, await anext(chunks)
        except StopAsyncIteration:
            raise UpstreamProtocolError("the upstream sent an empty stream") from None

    (chunks, first), attempt = await outcomes.first_answer(services, call, start)
    return attempt, chunks, first


async def stream(
    request: web.Request, services: Services, call: Call, *, capture: bool
) -> web.StreamResponse:
    try:
        attempt, chunks, first = await open_stream(services, call)
    except BaseException as exc:
        await outcomes.released(services, call, exc)
        raise
    headers = {
        **outcomes.response_headers(call, attempt),
        "Content-Type": "text/event-stream",
        "Cache-Control": "no-cache",
    }
    response = StreamedResponse(capture=capture, headers=headers)
    relay = Relay(request, call, response, wants_usage=_wants_usage(call.body))
    started = time.perf_counter()
    try:
        await relay.run(first, chunks)
    finally:
        call.upstream_s += time.perf_counter() - started
        try:
            await asyncio.shield(_close(chunks))
        finally:  # the call is settled whatever closing the upstream did
            await asyncio.shield(finish(request, services, call, attempt, relay))
    return response


async def _close(chunks: Chunks) -> None:
    """Close the upstream stream; a stream that fails to close has nothing left to bill."""
    try:
        await chunks.aclose()  # type: ignore[attr-defined]
    except (RuntimeError, UpstreamError, OSError) as exc:  # RuntimeError: still running
        log.warning("upstream stream did not close cleanly: %s", type(exc).__name__)


def _wants_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


class Relay:
    """Copies chunks to the client, keeping the usage chunk back until the call is settled."""

    def __init__(
        self, request: web.Request, call: Call, response: StreamedResponse, *, wants_usage: bool
    ) -> None:
        self.request = request
        self.call = call
        self.drain_deadline = 0.0
        self.response = response
        self.wants_usage = wants_usage
        self.meter = Meter()
        self.usage: Usage | None = None
        self.failure: UpstreamError | None = None
        self.client_gone = False
        self.prepared = False

    async def run(self, first: dict[str, Any], chunks: Chunks) -> None:
        try:
            await self.response.prepare(self.request)
            self.prepared = True
        except ConnectionResetError:  # gone before the first byte: still meter and drain
            self.client_gone = True
            self.drain_deadline = time.monotonic() + DRAIN_AFTER_DISCONNECT_S
        try:
            chunk: dict[str, Any] | None = first
            while chunk is not None:
                await self.take(chunk)
                chunk = await self.next(chunks)
        except UpstreamError as exc:
            self.failure = exc
        except ConnectionResetError:
            self.client_gone = True

    async def next(self, chunks: Chunks) -> dict[str, Any] | None:
        if self.client_gone and self.usage is None:
            remaining = self.drain_deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                return await asyncio.wait_for(anext(chunks), remaining)
            except (StopAsyncIteration, TimeoutError):
                return None
        if self.client_gone:
            return None
        return await anext(chunks, None)

    async def take(self, chunk: dict[str, Any]) -> None:
        usage = chunk.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
            self.usage = Usage(usage["prompt_tokens"], int(usage.get("completion_tokens") or 0))
        if not chunk.get("choices"):
            return
        self.meter.add(chunk)
        if self.client_gone:
            return
        # the usage goes out once, on the final chunk, after settling
        out = {k: v for k, v in chunk.items() if k != "usage"}
        try:
            await self.response.send(sse.encode(out))
        except ConnectionResetError:
            self.client_gone = True
            self.drain_deadline = time.monotonic() + DRAIN_AFTER_DISCONNECT_S


async def finish(
    request: web.Request, services: Services, call: Call, attempt: Attempt, relay: Relay
) -> None:
    """Settle from the reported usage (else from what was counted) and end the stream."""
    transport = request.transport
    if relay.response.broken or transport is None or transport.is_closing():
        relay.client_gone = True  # found by the writer, or by a cancelled handler
    usage = relay.usage or relay.meter.usage(call.prompt_tokens)
    settlement = await outcomes.settle_with_retry(services, call, attempt, Completion({}, usage))
    status = "200" if relay.failure is None else "upstream_error"
    if relay.client_gone:
        status = "client_disconnected"
    outcomes.observe(services, call, attempt, status)
    if relay.client_gone or not relay.prepared:
        return
    try:
        if relay.failure is not None:
            failure = error_body(
                f"The upstream broke off the stream: {relay.failure}",
                "upstream_error",
                "upstream_error",
            )
            await relay.response.send(sse.encode(failure))
            return
        if relay.wants_usage:
            final = {
                **relay.meter.template,
                "choices": [],
                "usage": {
                    "prompt_tokens": usage.prompt_tokens,
                    "completion_tokens": usage.completion_tokens,
                    "total_tokens": usage.prompt_tokens + usage.completion_tokens,
                    "credits_used": credits_number(settlement.charged_micro or 0),
                },
            }
            await relay.response.send(sse.encode(final))
        await relay.response.send(sse.DONE_EVENT)
        await relay.response.write_eof()
    except ConnectionResetError:
        relay.client_gone = True
