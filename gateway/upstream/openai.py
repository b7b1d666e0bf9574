"""OpenAI-compatible upstreams, proxied over the gateway's one pooled aiohttp session
(no litellm on this path: a pooled request costs a fraction of its CPU)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp

from gateway import jsonio
from gateway.upstream import sse
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
    def __init__(
        self, session: aiohttp.ClientSession, *, timeout_s: float, connect_timeout_s: float
    ):
        self._session = session
        # sock_read bounds the wait for the first byte and then for each chunk
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=connect_timeout_s,
            sock_connect=connect_timeout_s,
            sock_read=timeout_s,
        )

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
                async for data in sse.iter_data(resp.content):
                    if data == sse.DONE:
                        await _finish_reading(resp)
                        return
                    yield _loads(data)
        # aiohttp's timeouts are also ClientConnectionErrors: catch them first
        except TimeoutError:
            raise UpstreamTimeout("no data from the upstream within the timeout") from None
        except aiohttp.ClientPayloadError as exc:
            raise UpstreamConnectError(f"stream broken: {exc}") from None
        except aiohttp.ClientConnectionError as exc:
            raise UpstreamConnectError(str(exc) or type(exc).__name__) from None

    async def _complete(
        self, target: Target, path: str, body: dict[str, Any], headers: Mapping[str, str]
    ) -> Completion:
        try:
            async with self._post(target, path, body, headers) as resp:
                await _check(resp)
                raw = await resp.read()
                data = _loads(raw)
        except TimeoutError:  # before ClientConnectionError: aiohttp's timeouts are both
            raise UpstreamTimeout("no answer from the upstream within the timeout") from None
        except aiohttp.ClientConnectionError as exc:
            raise UpstreamConnectError(str(exc) or type(exc).__name__) from None
        usage = data.get("usage")
        if not isinstance(usage, dict) or not isinstance(usage.get("prompt_tokens"), int):
            raise UpstreamProtocolError("the upstream's answer carries no usage")
        counted = Usage(usage["prompt_tokens"], int(usage.get("completion_tokens") or 0))
        return Completion(data, counted, raw)  # passed on as sent, not serialised again

    def _post(
        self, target: Target, path: str, payload: dict[str, Any], headers: Mapping[str, str]
    ) -> Any:
        send = {"Content-Type": "application/json", **headers}
        if target.api_key:
            send["Authorization"] = f"Bearer {target.api_key}"
        return self._session.post(
            target.api_base.rstrip("/") + path,
            data=jsonio.dumps({**payload, "model": target.upstream_model}),
            headers=send,
            timeout=self._timeout,
        )


async def _finish_reading(resp: aiohttp.ClientResponse) -> None:
    """Read what follows [DONE] (the end of the chunked body), so that the connection goes
    back to the pool instead of being closed: otherwise every stream would open a new one,
    and against a real provider pay a new TLS handshake. An upstream that holds the stream
    open after [DONE] gets DONE_GRACE_S, then its connection is closed."""
    try:
        await asyncio.wait_for(resp.read(), DONE_GRACE_S)
    except (TimeoutError, aiohttp.ClientError):
        resp.close()


def _loads(data: bytes) -> dict[str, Any]:
    try:
        value = jsonio.loads(data)
    except ValueError:
        raise UpstreamProtocolError("the upstream sent something that is not JSON") from None
    if not isinstance(value, dict):
        raise UpstreamProtocolError("the upstream sent JSON that is not an object")
    return value


async def _check(resp: aiohttp.ClientResponse) -> None:
    if resp.status < 400:
        return
    message = f"upstream answered {resp.status}"
    try:
        detail = (await resp.json(content_type=None)).get("error", {}).get("message")
        if isinstance(detail, str):
            message = f"{message}: {detail}"
    except (ValueError, AttributeError, aiohttp.ClientError):
        pass
    raise UpstreamStatusError(message, status=resp.status)


__all__ = ["OpenAIClient", "UpstreamError"]
