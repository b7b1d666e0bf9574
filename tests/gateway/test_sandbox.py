"""The provider simulator speaks each provider's wire format: the real OpenAI SDK talks to it,
answers are deterministic with real token counts, and faults fail the way providers do."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
import openai
import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from gateway.upstream.sandbox import RecordedRequest, create_simulator_app, running_simulator
from gateway.upstream.sandbox_formats import EMBEDDING_DIMENSIONS, SENTENCES
from policies.catalog import ProviderKind
from policies.tokens import (
    count_chat_prompt_tokens,
    count_embedding_input_tokens,
    count_text_tokens,
)

MESSAGES: list[Any] = [
    {"role": "system", "content": "You write quiz questions."},
    {"role": "user", "content": "Ask me about photosynthesis.", "name": "ada"},
]
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "save_quiz", "parameters": {"type": "object"}}},
]


@pytest.fixture
def recorder() -> list[RecordedRequest]:
    return []


@pytest.fixture
async def simulator(aiohttp_server: AiohttpServer, recorder: list[RecordedRequest]) -> TestServer:
    return await aiohttp_server(create_simulator_app(recorder))


@pytest.fixture
async def client(simulator: TestServer) -> AsyncIterator[openai.AsyncOpenAI]:
    base_url = str(simulator.make_url("/openai/v1"))
    async with openai.AsyncOpenAI(base_url=base_url, api_key="sk-sandbox", max_retries=0) as sdk:
        yield sdk


async def post(
    simulator: TestServer, path: str, body: dict[str, Any], headers: dict[str, str]
) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.post(simulator.make_url(path), json=body, headers=headers) as response:
            return response.status, await response.read()


def sse_data(raw: bytes) -> list[str]:
    lines = raw.decode().splitlines()
    return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


def test_prompt_tokens_follow_the_cookbook_formula() -> None:
    messages = [{"role": "user", "content": "hi", "name": "ada"}]
    expected = 3 + count_text_tokens("user") + count_text_tokens("hi")
    expected += count_text_tokens("ada") + 1 + 3
    assert count_chat_prompt_tokens(messages) == expected
    tools_json = json.dumps(TOOLS, separators=(",", ":"))
    assert count_chat_prompt_tokens(messages, TOOLS) == expected + count_text_tokens(tools_json)
    assert count_embedding_input_tokens([[1, 2, 3], [4]]) == 4


async def test_chat_answers_deterministically_with_real_token_counts(
    client: openai.AsyncOpenAI,
) -> None:
    first = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    again = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    text = first.choices[0].message.content
    assert text and text == again.choices[0].message.content
    assert any(sentence in text for sentence in SENTENCES)
    assert first.choices[0].finish_reason == "stop"
    assert first.model == "gpt-4o-mini"
    assert first.usage is not None
    assert first.usage.prompt_tokens == count_chat_prompt_tokens(MESSAGES)
    assert first.usage.completion_tokens == count_text_tokens(text)


async def test_running_simulator_serves_on_a_free_port() -> None:
    async with running_simulator() as bases:
        assert set(bases) == set(ProviderKind)
        async with openai.AsyncOpenAI(base_url=bases[ProviderKind.OPENAI], api_key="k") as sdk:
            answer = await sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, n=2)
    first, second = (choice.message.content or "" for choice in answer.choices)
    assert first != second
    assert answer.usage is not None
    assert answer.usage.completion_tokens == count_text_tokens(first) + count_text_tokens(second)


@pytest.mark.parametrize("limit", ["max_tokens", "max_completion_tokens"])
async def test_output_limit_stops_with_finish_reason_length(
    client: openai.AsyncOpenAI, limit: str
) -> None:
    answer = await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, extra_body={limit: 5}
    )
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None and answer.usage.completion_tokens == 5


async def test_stream_puts_usage_on_a_last_chunk_without_choices(
    client: openai.AsyncOpenAI,
) -> None:
    whole = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    stream = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    *content_chunks, last = chunks
    assert len(content_chunks) > 3 and all(c.usage is None for c in content_chunks)
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text == whole.choices[0].message.content
    assert content_chunks[-1].choices[0].finish_reason == "stop"
    assert last.choices == [] and last.usage is not None
    assert whole.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (
        whole.usage.prompt_tokens,
        whole.usage.completion_tokens,
    )


async def test_stream_without_include_usage_has_no_usage(simulator: TestServer) -> None:
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
    headers = {"Authorization": "Bearer sk-sandbox"}
    status, raw = await post(simulator, "/openai/v1/chat/completions", body, headers)
    events = sse_data(raw)
    assert status == 200 and events[-1] == "[DONE]"
    assert all("usage" not in json.loads(event) for event in events[:-1])


@pytest.mark.parametrize(
    ("tool_choice", "expected"),
    [
        ("required", "lookup"),
        ({"type": "function", "function": {"name": "save_quiz"}}, "save_quiz"),
    ],
)
async def test_required_or_named_tool_is_called(
    client: openai.AsyncOpenAI, tool_choice: Any, expected: str
) -> None:
    answer = await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, tools=TOOLS, tool_choice=tool_choice
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.type == "function"
    assert (call.function.name, call.function.arguments) == (expected, "{}")
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == count_chat_prompt_tokens(MESSAGES, TOOLS)
    plain = await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, tools=TOOLS
    )
    assert plain.choices[0].message.tool_calls is None


async def test_embeddings_in_float_and_base64(client: openai.AsyncOpenAI) -> None:
    inputs = ["first text", "second, longer text"]
    default = await client.embeddings.create(model="text-embedding-3-small", input=inputs)
    floats = await client.embeddings.create(
        model="text-embedding-3-small", input=inputs, encoding_format="float"
    )
    assert [len(item.embedding) for item in default.data] == [EMBEDDING_DIMENSIONS] * 2
    assert default.data[0].embedding == pytest.approx(floats.data[0].embedding, abs=1e-6)
    assert default.data[0].embedding != default.data[1].embedding
    assert default.usage.prompt_tokens == count_embedding_input_tokens(inputs)
    narrow = await client.embeddings.create(model="m", input="one", dimensions=8)
    assert len(narrow.data[0].embedding) == 8


async def test_error_faults_answer_in_openai_error_shape(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as server_error:
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers={"X-Sandbox-Fault": "error_500"}
        )
    assert server_error.value.status_code == 500
    assert isinstance(server_error.value.body, dict)
    assert set(server_error.value.body) == {"message", "type", "param", "code"}
    with pytest.raises(openai.RateLimitError) as rate_limited:
        await client.embeddings.create(
            model="m", input="x", extra_headers={"X-Sandbox-Fault": "error_429"}
        )
    assert rate_limited.value.response.headers["Retry-After"] == "1"


async def test_timeout_fault_outlasts_the_client_timeout(client: openai.AsyncOpenAI) -> None:
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        await client.with_options(timeout=0.3).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers={"X-Sandbox-Fault": "timeout"}
        )
    assert time.monotonic() - started < 5


async def test_disconnect_fault_breaks_the_connection(client: openai.AsyncOpenAI) -> None:
    fault = {"X-Sandbox-Fault": "disconnect_mid_stream"}
    with pytest.raises(openai.APIConnectionError):
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers=fault
        )
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_headers=fault
    )
    received: list[str] = []
    with pytest.raises((httpx.HTTPError, openai.APIError)):
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received)  # some content arrived before the connection dropped


async def test_fault_can_target_one_upstream_model(client: openai.AsyncOpenAI) -> None:
    fault = {"X-Sandbox-Fault": "error_500@gpt-4o-mini, timeout@claude-x"}
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers=fault
        )
    fallback = await client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, extra_headers=fault
    )
    assert fallback.choices[0].message.content


async def test_usage_and_delay_headers(client: openai.AsyncOpenAI) -> None:
    headers = {"X-Sandbox-Usage": "prompt=7,completion=900", "X-Sandbox-Delay-Ms": "200"}
    started = time.monotonic()
    answer = await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, extra_headers=headers
    )
    assert time.monotonic() - started >= 0.2
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (7, 900)


async def test_recorder_keeps_every_request(
    client: openai.AsyncOpenAI, recorder: list[RecordedRequest]
) -> None:
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=3)
    with pytest.raises(openai.InternalServerError):
        await client.embeddings.create(
            model="m", input="x", extra_headers={"X-Sandbox-Fault": "error_500"}
        )
    chat, embeddings = recorder
    assert (chat.kind, chat.path) == (ProviderKind.OPENAI, "/openai/v1/chat/completions")
    assert chat.headers["authorization"] == "Bearer sk-sandbox"
    assert chat.body == {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 3}
    assert embeddings.path == "/openai/v1/embeddings"
    assert embeddings.headers["x-sandbox-fault"] == "error_500"


async def test_bad_directives_and_missing_keys_are_refused(simulator: TestServer) -> None:
    body = {"model": "gpt-4o-mini", "messages": MESSAGES}
    status, raw = await post(simulator, "/openai/v1/chat/completions", body, {})
    assert status == 401 and json.loads(raw)["error"]["code"] == "invalid_api_key"
    headers = {"Authorization": "Bearer k", "X-Sandbox-Fault": "error_418"}
    status, raw = await post(simulator, "/openai/v1/chat/completions", body, headers)
    assert status == 400 and "error_418" in json.loads(raw)["error"]["message"]


async def test_anthropic_requires_max_tokens_and_streams_its_events(simulator: TestServer) -> None:
    headers = {"x-api-key": "sk-ant", "anthropic-version": "2023-06-01"}
    body: dict[str, Any] = {"model": "claude-x", "messages": [{"role": "user", "content": "hi"}]}
    status, raw = await post(simulator, "/anthropic/v1/messages", body, headers)
    assert status == 400
    assert json.loads(raw) == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"},
    }
    body.update(max_tokens=4, stream=True)
    status, raw = await post(simulator, "/anthropic/v1/messages", body, headers)
    events = [
        line.removeprefix("event: ") for line in raw.decode().splitlines() if "event:" in line
    ]
    assert events[:3] == ["message_start", "content_block_start", "ping"]
    assert events[-4:] == [
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    *_, delta, _stop = (json.loads(data) for data in sse_data(raw))
    assert delta["delta"]["stop_reason"] == "max_tokens" and delta["usage"]["output_tokens"] == 4


async def test_gemini_streams_sse_with_usage_metadata(simulator: TestServer) -> None:
    path = "/gemini/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse"
    body = {
        "contents": [{"role": "user", "parts": [{"text": "hi"}]}],
        "generationConfig": {"maxOutputTokens": 6},
    }
    status, raw = await post(simulator, path, body, {"x-goog-api-key": "g"})
    chunks = [json.loads(data) for data in sse_data(raw)]
    assert status == 200 and len(chunks) > 1
    last = chunks[-1]
    assert last["candidates"][0]["finishReason"] == "MAX_TOKENS"
    assert last["usageMetadata"] == {
        "promptTokenCount": count_chat_prompt_tokens([{"role": "user", "content": "hi"}]),
        "candidatesTokenCount": 6,
        "totalTokenCount": last["usageMetadata"]["promptTokenCount"] + 6,
    }
    status, raw = await post(simulator, path.replace("v1beta", "v2"), body, {"x-goog-api-key": "g"})
    assert status == 404
