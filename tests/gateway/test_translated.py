"""The litellm-backed client against the simulator: Anthropic and Gemini answers come back in
OpenAI's shape with the provider's token counts, and failures as typed upstream errors."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from gateway.upstream.base import (
    Target,
    UpstreamConnectError,
    UpstreamStatusError,
    UpstreamTimeout,
    Usage,
)
from gateway.upstream.sandbox import RecordedRequest, create_simulator_app
from gateway.upstream.sandbox_formats import Call, compose_answer
from gateway.upstream.sandbox_formats_translated import read_anthropic, read_gemini
from gateway.upstream.translated import TranslatedClient
from policies.catalog import ProviderKind

UPSTREAM_MODELS = {
    ProviderKind.ANTHROPIC: "claude-3-5-haiku-latest",
    ProviderKind.GEMINI: "gemini-2.0-flash",
}
EXPECTED_PATHS = {
    ProviderKind.ANTHROPIC: "/anthropic/v1/messages",
    ProviderKind.GEMINI: "/gemini/v1beta/models/gemini-2.0-flash:",
}
KEY_HEADERS = {ProviderKind.ANTHROPIC: "x-api-key", ProviderKind.GEMINI: "x-goog-api-key"}
KINDS = [ProviderKind.ANTHROPIC, ProviderKind.GEMINI]

# litellm ignores this pydantic warning itself, at import (litellm/_process_defaults.py), but
# pytest's per-test `error` filter takes precedence; it fires when litellm lazily imports its
# Gemini context-caching types on the first Gemini call
pytestmark = pytest.mark.filterwarnings("ignore:.*`ReadOnly` qualifier:UserWarning")
BODY: dict[str, Any] = {
    "model": "ignored",
    "messages": [{"role": "user", "content": "Ask me about photosynthesis."}],
    "max_tokens": 40,
    "temperature": 0.3,
}


@pytest.fixture
def recorder() -> list[RecordedRequest]:
    return []


@pytest.fixture
async def simulator(aiohttp_server: AiohttpServer, recorder: list[RecordedRequest]) -> TestServer:
    return await aiohttp_server(create_simulator_app(recorder))


def target_for(simulator: TestServer, kind: ProviderKind) -> Target:
    model = UPSTREAM_MODELS[kind]
    api_base = str(simulator.make_url(f"/{kind.value}"))
    return Target(model, model, kind.value, kind, api_base, api_key=f"key-{kind.value}")


def simulated_call(recorded: RecordedRequest) -> Call:
    """What the simulator made of the request it received: its token counts and answer."""
    assert isinstance(recorded.body, dict)
    if recorded.kind is ProviderKind.ANTHROPIC:
        return read_anthropic(recorded.body)
    return read_gemini(UPSTREAM_MODELS[ProviderKind.GEMINI], recorded.body)


@pytest.fixture
def client() -> TranslatedClient:
    return TranslatedClient(timeout_s=5, connect_timeout_s=2)


@pytest.mark.parametrize("kind", KINDS)
async def test_chat_comes_back_in_openai_shape_with_the_providers_usage(
    simulator: TestServer,
    recorder: list[RecordedRequest],
    client: TranslatedClient,
    kind: ProviderKind,
) -> None:
    completion = await client.chat(target_for(simulator, kind), BODY, {"X-Trace": "t1"})
    (recorded,) = recorder
    assert recorded.path.startswith(EXPECTED_PATHS[kind])
    assert recorded.headers[KEY_HEADERS[kind]] == f"key-{kind.value}"
    assert recorded.headers["x-trace"] == "t1"
    call = simulated_call(recorded)
    answer = compose_answer(call.seed, call.max_tokens, call.tool_name)
    assert completion.usage == Usage(call.prompt_tokens, answer.completion_tokens)
    body = completion.body
    assert body["object"] == "chat.completion"
    assert body["choices"] == [
        {
            "index": 0,
            "finish_reason": "stop",
            "logprobs": None,
            "message": {"role": "assistant", "content": answer.text, "refusal": None},
        }
    ]
    assert body["usage"]["total_tokens"] == call.prompt_tokens + answer.completion_tokens


@pytest.mark.parametrize("kind", KINDS)
async def test_stream_ends_with_one_usage_chunk(
    simulator: TestServer,
    recorder: list[RecordedRequest],
    client: TranslatedClient,
    kind: ProviderKind,
) -> None:
    body = {**BODY, "max_tokens": 9}
    chunks = [chunk async for chunk in client.chat_stream(target_for(simulator, kind), body, {})]
    *content, last = chunks
    assert all(c["object"] == "chat.completion.chunk" and c["usage"] is None for c in content)
    assert [c["choices"][0]["finish_reason"] for c in content][-1] == "length"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in content)
    call = simulated_call(recorder[0])
    assert text == compose_answer(call.seed, 9, None).text
    assert last["choices"] == []
    assert last["usage"] == {
        "prompt_tokens": call.prompt_tokens,
        "completion_tokens": 9,
        "total_tokens": call.prompt_tokens + 9,
    }


@pytest.mark.parametrize("kind", KINDS)
async def test_misreported_usage_is_what_the_client_returns(
    simulator: TestServer, client: TranslatedClient, kind: ProviderKind
) -> None:
    headers = {"X-Sandbox-Usage": "prompt=11,completion=777"}
    completion = await client.chat(target_for(simulator, kind), BODY, headers)
    assert completion.usage == Usage(11, 777)


@pytest.mark.parametrize("kind", KINDS)
async def test_required_tool_is_called(
    simulator: TestServer, client: TranslatedClient, kind: ProviderKind
) -> None:
    tool = {"type": "function", "function": {"name": "save_quiz", "parameters": {"type": "object"}}}
    body = {**BODY, "tools": [tool], "tool_choice": "required"}
    completion = await client.chat(target_for(simulator, kind), body, {})
    choice = completion.body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"] == {
        "name": "save_quiz",
        "arguments": "{}",
    }


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("fault", "status"), [("error_500", 500), ("error_429", 429)])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_provider_errors_are_retryable_status_errors(
    simulator: TestServer,
    client: TranslatedClient,
    kind: ProviderKind,
    fault: str,
    status: int,
    stream: bool,
) -> None:
    target, headers = target_for(simulator, kind), {"X-Sandbox-Fault": fault}
    with pytest.raises(UpstreamStatusError) as failure:
        if stream:
            _ = [chunk async for chunk in client.chat_stream(target, BODY, headers)]
        else:
            await client.chat(target, BODY, headers)
    assert failure.value.status == status and failure.value.retryable


@pytest.mark.parametrize("kind", KINDS)
async def test_timeouts_and_dropped_streams_are_typed(
    simulator: TestServer, kind: ProviderKind
) -> None:
    client = TranslatedClient(timeout_s=0.3, connect_timeout_s=1)
    target = target_for(simulator, kind)
    with pytest.raises(UpstreamTimeout):
        await client.chat(target, BODY, {"X-Sandbox-Fault": "timeout"})
    received: list[dict[str, Any]] = []
    with pytest.raises(UpstreamConnectError):
        async for chunk in client.chat_stream(
            target, BODY, {"X-Sandbox-Fault": "disconnect_mid_stream"}
        ):
            received.append(chunk)
    assert received and all(chunk["choices"] for chunk in received)


async def test_embeddings_are_refused_without_retry(
    simulator: TestServer, client: TranslatedClient
) -> None:
    with pytest.raises(UpstreamStatusError) as failure:
        await client.embeddings(target_for(simulator, ProviderKind.GEMINI), {"input": "x"}, {})
    assert failure.value.status == 400 and not failure.value.retryable
