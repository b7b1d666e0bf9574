"""The upstream client for Anthropic and Gemini: OpenAI requests translated to their wire
formats by litellm, and their answers and failures translated back. litellm takes seconds to
import, so it is imported on the first call, offline."""

from __future__ import annotations

import functools
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

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
from policies.catalog import ProviderKind

_LITELLM_PREFIXES = {ProviderKind.ANTHROPIC: "anthropic", ProviderKind.GEMINI: "gemini"}
# litellm appends `models/{model}:generateContent` to a Gemini api_base as it is, so a bare
# host (https://generativelanguage.googleapis.com) needs the API version the real API serves
_GEMINI_API_VERSION = "v1beta"
_GEMINI_VERSIONS = frozenset({"v1", "v1beta", "v1alpha"})
# body fields this client sets itself, or that would steer litellm's transport
_CONTROLLED_FIELDS = frozenset(
    {"model", "messages", "stream", "stream_options", "timeout", "request_timeout", "api_base"}
    | {"base_url", "api_key", "api_version", "organization", "default_headers", "extra_headers"}
    | {"max_retries", "deployment_id"}
)
_MESSAGE_FIELDS = ("role", "content", "tool_calls", "function_call", "refusal", "reasoning_content")
_CHOICE_FIELDS = ("index", "finish_reason", "logprobs")
_ENVELOPE_FIELDS = ("id", "object", "created", "model", "system_fingerprint")


@dataclass(frozen=True)
class _Litellm:
    """What this client uses of litellm, loaded once."""

    acompletion: Callable[..., Awaitable[Any]]
    chat_params: frozenset[str]  # the OpenAI request fields litellm knows how to translate
    errors: tuple[type[Exception], ...]  # every failure litellm reports
    timeout_errors: tuple[type[Exception], ...]
    connect_errors: tuple[type[Exception], ...]
    # errors that carry the provider's error as `original_exception`
    wrapping_errors: tuple[type[Exception], ...]


@functools.cache
def _litellm() -> _Litellm:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no price map download
    import litellm
    import openai
    from litellm.constants import OPENAI_CHAT_COMPLETION_PARAMS
    from litellm.exceptions import MidStreamFallbackError

    litellm.telemetry = False
    litellm.suppress_debug_info = True  # no "Give Feedback / Get Help" banners on stdout
    return _Litellm(
        acompletion=litellm.acompletion,
        chat_params=frozenset(OPENAI_CHAT_COMPLETION_PARAMS) - _CONTROLLED_FIELDS,
        errors=(openai.APIError,),  # litellm's exceptions all derive from the OpenAI SDK's
        timeout_errors=(openai.APITimeoutError,),
        connect_errors=(openai.APIConnectionError,),
        wrapping_errors=(MidStreamFallbackError,),
    )


def _translate_error(library: _Litellm, error: Exception) -> UpstreamError:
    message = str(error) or type(error).__name__
    if isinstance(error, library.wrapping_errors):  # litellm wraps stream failures, even early ones
        original = getattr(error, "original_exception", None)
        if isinstance(original, library.errors):
            return _translate_error(library, original)
        return UpstreamConnectError(message)
    if isinstance(error, library.timeout_errors):  # before connect: a timeout is a connect error
        return UpstreamTimeout(message)
    if isinstance(error, library.connect_errors):
        return UpstreamConnectError(message)
    status = getattr(error, "status_code", None)
    return UpstreamStatusError(message, status=status if isinstance(status, int) else None)


def _api_base(target: Target) -> str:
    if target.kind is not ProviderKind.GEMINI:
        return target.api_base
    base = target.api_base.rstrip("/")
    if base.rsplit("/", 1)[-1] in _GEMINI_VERSIONS:
        return base
    return f"{base}/{_GEMINI_API_VERSION}"


def _pick(source: Mapping[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    return {name: source[name] for name in fields if source.get(name) is not None}


def _usage(raw: Any) -> Usage:
    if not isinstance(raw, Mapping):
        raise UpstreamProtocolError("the provider reported no usage")
    return Usage(int(raw.get("prompt_tokens") or 0), int(raw.get("completion_tokens") or 0))


def _usage_body(usage: Usage) -> dict[str, int]:
    total = usage.prompt_tokens + usage.completion_tokens
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": total,
    }


def _completion_body(raw: Mapping[str, Any], usage: Usage) -> dict[str, Any]:
    """litellm's response as OpenAI's `chat.completion`, without litellm's extra fields."""
    choices = []
    for choice in raw.get("choices") or []:
        # OpenAI's schema requires these, as nulls when there is nothing to say
        picked = _pick(choice.get("message") or {}, _MESSAGE_FIELDS)
        message = {"content": None, "refusal": None, **picked}
        choices.append({"logprobs": None, **_pick(choice, _CHOICE_FIELDS), "message": message})
    body = _pick(raw, _ENVELOPE_FIELDS)
    return {**body, "object": "chat.completion", "choices": choices, "usage": _usage_body(usage)}


def _chunk_body(raw: Mapping[str, Any]) -> dict[str, Any]:
    """litellm's stream chunk as OpenAI's `chat.completion.chunk` (usage left to the end)."""
    choices = []
    for choice in raw.get("choices") or []:
        delta = _pick(choice.get("delta") or {}, _MESSAGE_FIELDS)
        choices.append({**_pick(choice, _CHOICE_FIELDS), "delta": delta})
        choices[-1].setdefault("finish_reason", None)
    body = _pick(raw, _ENVELOPE_FIELDS)
    return {**body, "object": "chat.completion.chunk", "choices": choices, "usage": None}


class TranslatedClient:
    """An `UpstreamClient` for the provider kinds litellm translates (Anthropic, Gemini)."""

    def __init__(self, *, timeout_s: float, connect_timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s

    def _arguments(
        self, library: _Litellm, target: Target, body: Mapping[str, Any], headers: Mapping[str, str]
    ) -> dict[str, Any]:
        import httpx  # a dependency of litellm, loaded with it

        prefix = _LITELLM_PREFIXES.get(target.kind)
        if prefix is None:
            raise ValueError(f"{target.kind} upstreams are not translated by litellm")
        arguments = {name: value for name, value in body.items() if name in library.chat_params}
        arguments.update(
            model=f"{prefix}/{target.upstream_model}",
            messages=body.get("messages", []),
            api_base=_api_base(target),
            api_key=target.api_key,
            timeout=httpx.Timeout(self._timeout_s, connect=self._connect_timeout_s),
            extra_headers=dict(headers),
            drop_params=True,  # a field one provider lacks must not break a fallback to it
            num_retries=0,  # the gateway retries, on the next model
        )
        return arguments

    async def chat(
        self, target: Target, body: dict[str, Any], headers: Mapping[str, str]
    ) -> Completion:
        library = _litellm()
        arguments = self._arguments(library, target, body, headers)
        try:
            response = await library.acompletion(**arguments)
        except library.errors as error:
            raise _translate_error(library, error) from error
        raw = response.model_dump()
        usage = _usage(raw.get("usage"))
        return Completion(body=_completion_body(raw, usage), usage=usage)

    async def chat_stream(
        self, target: Target, body: dict[str, Any], headers: Mapping[str, str]
    ) -> AsyncIterator[dict[str, Any]]:
        """OpenAI chunks, then one last chunk with no choices and the usage, wherever litellm
        put it (on its own chunk or on the last content chunk)."""
        library = _litellm()
        arguments = self._arguments(library, target, body, headers)
        arguments.update(stream=True, stream_options={"include_usage": True})
        usage: Usage | None = None
        last: dict[str, Any] = {}
        try:
            stream = await library.acompletion(**arguments)
            try:
                async for chunk in stream:
                    raw = chunk.model_dump()
                    if raw.get("usage"):
                        usage = _usage(raw["usage"])
                    if raw.get("choices"):
                        last = _chunk_body(raw)
                        yield last
            finally:
                await stream.aclose()
        except library.errors as error:
            raise _translate_error(library, error) from error
        if usage is None:
            raise UpstreamProtocolError("the stream ended without reporting usage")
        final = {name: last[name] for name in _ENVELOPE_FIELDS if name in last}
        yield {
            **final,
            "object": "chat.completion.chunk",
            "choices": [],
            "usage": _usage_body(usage),
        }

    async def embeddings(
        self, target: Target, body: dict[str, Any], headers: Mapping[str, str]
    ) -> Completion:
        raise UpstreamStatusError("embeddings are not supported for this provider", status=400)
