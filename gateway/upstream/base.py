"""What every upstream client speaks: OpenAI shapes in and out, typed failures.

UpstreamError                 the call failed; `retryable` says a fallback may be tried
├── UpstreamConnectError      could not connect / connection dropped before an answer
├── UpstreamTimeout           no first byte (or next chunk) within the timeout
├── UpstreamStatusError       the provider answered with an error status
└── UpstreamProtocolError     the provider's answer could not be understood
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from policies.catalog import ProviderKind


@dataclass(frozen=True)
class Target:
    """One model to try: where it lives and what its provider calls it."""

    model: str  # the catalog's name (what X-Gateway-Model reports)
    upstream_model: str  # the provider's model id
    provider: str  # the catalog's provider name
    kind: ProviderKind
    api_base: str
    api_key: str | None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Completion:
    """A whole (non-streaming) answer, already in OpenAI's shape."""

    body: dict[str, Any]
    usage: Usage
    raw: bytes | None = None  # the upstream's own bytes, when `body` is exactly what they say


class UpstreamError(Exception):
    retryable = True
    kind = "error"

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class UpstreamConnectError(UpstreamError):
    kind = "connect"


class UpstreamTimeout(UpstreamError):
    kind = "timeout"


class UpstreamStatusError(UpstreamError):
    kind = "status"

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message, status=status)
        # 429 and 5xx may succeed elsewhere; other 4xx are the request's own fault
        self.retryable = status is None or status == 429 or status >= 500


class UpstreamProtocolError(UpstreamError):
    kind = "protocol"


class UpstreamClient(Protocol):
    """One client per provider kind. `body` is the client's OpenAI request with the model
    replaced by the target's and limits already set by the gateway; `headers` are extra
    headers to send (e.g. X-Sandbox-Fault in sandbox mode)."""

    async def chat(
        self, target: Target, body: dict[str, Any], headers: Mapping[str, str]
    ) -> Completion: ...

    def chat_stream(
        self, target: Target, body: dict[str, Any], headers: Mapping[str, str]
    ) -> AsyncIterator[dict[str, Any]]:
        """Yields OpenAI `chat.completion.chunk` dicts. Usage is always requested; the last
        chunk carries it (`choices: []`, `usage: {...}`). Raises UpstreamError on failure,
        before or during the stream."""
        ...

    async def embeddings(
        self, target: Target, body: dict[str, Any], headers: Mapping[str, str]
    ) -> Completion: ...
