"""OpenAI-compatible upstreams, proxied over pooled keep-alive connections (http1: no
litellm and no aiohttp client on this path, each costs several times its CPU)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

from gateway import jsonio
from gateway.upstream import http1, sse
from gateway.upstream.base import (
    Completion,
    Target,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeout,
    Usage,
)

DONE_GRACE_S = 1.0  # how long the rest of a stream may take to end after [DONE]


class OpenAIClient:
    def __init__(self, http: http1.Http1Client) -> None:
        self._http = http

    async def chat(
        self, target: Target, body: dict[str, Any], headers: Mapping[str, str]
    ) -> Completion:
        return await self._complete(target, "/chat/completions", body, headers)

    async def embeddings(
        self, target: Target, body: dict[str, Any], headers: Mapping[str, str]
    ) -> Completion:
        return await self._complete(target, "/embeddings", body, headers)

    async def chat_stream(
        self, target: Target, body: dict[str, Any], headers: Mapping[str, str]
    ) -> AsyncIterator[dict[str, Any]]:
        options = {**(body.get("stream_options") or {}), "include_usage": True}
        payload = {**body, "stream": True, "stream_options": options}
        try:
            async with self._post(target, "/chat/completions", payload, headers) as resp:
                await _check(resp)
                events = sse.DataReader(resp.next_chunk)
                while (data := await events.next()) is not None:
                    if data == sse.DONE:
                        await _finish_reading(resp)
                        return
                    yield _loads(data)
        except http1.HttpError as exc:
            raise _upstream_error(exc, streaming=True) from None

    async def _complete(
        self, target: Target, path: str, body: dict[str, Any], headers: Mapping[str, str]
    ) -> Completion:
        try:
            async with self._post(target, path, body, headers) as resp:
                await _check(resp)
                raw = await resp.read()
        except http1.HttpError as exc:
            raise _upstream_error(exc, streaming=False) from None
        data = _loads(raw)
        usage = data.get("usage")
        if not isinstance(usage, dict) or not isinstance(usage.get("prompt_tokens"), int):
            raise UpstreamProtocolError("the upstream's answer carries no usage")
        counted = Usage(usage["prompt_tokens"], int(usage.get("completion_tokens") or 0))
        return Completion(data, counted, raw)  # passed on as sent, not serialised again

    def _post(
        self, target: Target, path: str, payload: dict[str, Any], headers: Mapping[str, str]
    ) -> contextlib.AbstractAsyncContextManager[http1.Response]:
        send = [("Content-Type", "application/json"), *headers.items()]
        if target.api_key:
            send.append(("Authorization", f"Bearer {target.api_key}"))
        body = jsonio.dumps({**payload, "model": target.upstream_model})
        return self._http.post(target.api_base.rstrip("/") + path, body, send)


def _upstream_error(exc: http1.HttpError, *, streaming: bool) -> UpstreamError:
    if isinstance(exc, http1.ReadTimeout):
        what = "data" if streaming else "answer"
        return UpstreamTimeout(f"no {what} from the upstream within the timeout")
    if isinstance(exc, http1.BadResponse):
        return UpstreamProtocolError(str(exc))
    if streaming and isinstance(exc, http1.ConnectionBroken):
        return UpstreamConnectError(f"stream broken: {exc}")
    return UpstreamConnectError(str(exc))


async def _finish_reading(resp: http1.Response) -> None:
    """Read what follows [DONE] (the end of the chunked body), so that the connection goes
    back to the pool instead of being closed: otherwise every stream would open a new one,
    and against a real provider pay a new TLS handshake. An upstream that holds the stream
    open after [DONE] gets DONE_GRACE_S, then its connection is closed. (Usually the end
    came with [DONE]: then there is nothing to read, nor a timer to set.)"""
    if resp.received_all:
        return
    with contextlib.suppress(TimeoutError, http1.HttpError):
        async with asyncio.timeout(DONE_GRACE_S):
            await resp.read()


def _loads(data: bytes) -> dict[str, Any]:
    try:
        value = jsonio.loads(data)
    except ValueError:
        raise UpstreamProtocolError("the upstream sent something that is not JSON") from None
    if not isinstance(value, dict):
        raise UpstreamProtocolError("the upstream sent JSON that is not an object")
    return value


async def _check(resp: http1.Response) -> None:
    if resp.status < 400:
        return
    message = f"upstream answered {resp.status}"
    try:
        detail = jsonio.loads(await resp.read()).get("error", {}).get("message")
        if isinstance(detail, str):
            message = f"{message}: {detail}"
    except (ValueError, AttributeError, http1.HttpError):
        pass
    raise UpstreamStatusError(message, status=resp.status)


__all__ = ["OpenAIClient", "UpstreamError"]
