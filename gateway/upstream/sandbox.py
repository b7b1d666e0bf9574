"""The sandbox: a provider simulator speaking OpenAI's, Anthropic's and Gemini's real wire
formats, with deterministic answers, real token counts and faults on request.

Base URLs: OpenAI `{server}/openai/v1`; Anthropic `{server}/anthropic` (`/v1/messages`);
Gemini `{server}/gemini` (`/v1beta/models/{model}:generateContent`, `:streamGenerateContent`,
key in `x-goog-api-key` or `?key=`). Each wants its provider's credential, of any value.
`running_simulator()` serves it on a free local port and yields those base URLs.

Request headers that steer it:

    X-Sandbox-Fault: FAULT[@MODEL][, FAULT[@MODEL]]...
        FAULT is error_500 | error_429 | timeout | disconnect_mid_stream. `@MODEL` limits an
        entry to requests for that upstream model; the first entry that applies wins. So
        `error_500@gpt-4o-mini` fails gpt-4o-mini and lets a fallback model answer.
    X-Sandbox-Usage: prompt=N,completion=M    report these counts (either may be left out)
                                              instead of the tokens really produced
    X-Sandbox-Delay-Ms: N                     wait N ms before answering
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.upstream import sandbox_faults as faults
from gateway.upstream import sandbox_formats as fmt
from gateway.upstream import sandbox_formats_translated as native
from gateway.upstream.sandbox_faults import Directives, Fault
from gateway.upstream.sandbox_formats import SimulatedError
from policies.catalog import ProviderKind
from policies.tokens import count_embedding_input_tokens

API_BASE_PATHS = {  # where each provider's api_base points, below the simulator's address
    ProviderKind.OPENAI: "/openai/v1",
    ProviderKind.ANTHROPIC: "/anthropic",
    ProviderKind.GEMINI: "/gemini",
}
SHUTDOWN_TIMEOUT_S = 1.0  # requests still hanging on a timeout fault are not worth waiting for


@dataclass(frozen=True)
class RecordedRequest:
    """A request the simulator received, for tests to inspect."""

    kind: ProviderKind
    path: str
    headers: dict[str, str]  # names lower-cased
    body: Any  # the parsed JSON body; None when it was not JSON
    query: dict[str, str]


@dataclass(frozen=True)
class _Events:
    """A streamed answer: server-sent events, already encoded."""

    frames: tuple[bytes, ...]


_Rendered = dict[str, Any] | list[Any] | _Events
_Answerer = Callable[[web.Request, dict[str, Any], Directives], _Rendered]


@dataclass(frozen=True)
class _Endpoint:
    kind: ProviderKind
    error_body: Callable[[int, str], dict[str, Any]]
    model_of: Callable[[web.Request, dict[str, Any]], str]
    answer: _Answerer


RECORDER_KEY = web.AppKey("sandbox_recorder", list[RecordedRequest])


def _credential(request: web.Request, kind: ProviderKind) -> str | None:
    if kind is ProviderKind.GEMINI:
        return request.headers.get("x-goog-api-key") or request.query.get("key")
    if kind is ProviderKind.ANTHROPIC and request.headers.get("x-api-key"):
        return request.headers["x-api-key"]
    bearer = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    return bearer or None


async def _read_json(request: web.Request) -> Any:
    try:
        return json.loads(await request.read())
    except ValueError:
        return None


def _record(request: web.Request, kind: ProviderKind, body: Any) -> None:
    recorder = request.app.get(RECORDER_KEY)
    if recorder is not None:
        headers = {name.lower(): value for name, value in request.headers.items()}
        recorder.append(RecordedRequest(kind, request.path, headers, body, dict(request.query)))


async def _write_events(
    request: web.Request, events: _Events, disconnect: bool
) -> web.StreamResponse:
    headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    frames = events.frames
    if disconnect:
        frames = faults.cut_short(frames)
    for frame in frames:
        await response.write(frame)
    if disconnect:
        faults.drop_connection(request)
        return response
    await response.write_eof()
    return response


async def _serve(request: web.Request, endpoint: _Endpoint) -> web.StreamResponse:
    body = await _read_json(request)
    _record(request, endpoint.kind, body)
    if not isinstance(body, dict):
        raise SimulatedError(400, "the request body must be a JSON object")
    if _credential(request, endpoint.kind) is None:
        raise SimulatedError(401, "no API key was provided")
    directives = faults.parse_directives(request.headers)
    if directives.delay_ms:
        await asyncio.sleep(directives.delay_ms / 1000)
    fault = directives.fault_for(endpoint.model_of(request, body))
    await faults.inject_fault(request, fault)
    rendered = endpoint.answer(request, body, directives)
    if isinstance(rendered, _Events):
        return await _write_events(request, rendered, fault is Fault.DISCONNECT_MID_STREAM)
    if fault is Fault.DISCONNECT_MID_STREAM:
        faults.drop_connection(request)
    return web.json_response(rendered)


def _handler(endpoint: _Endpoint) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            return await _serve(request, endpoint)
        except SimulatedError as error:
            body = endpoint.error_body(error.status, error.message)
            return web.json_response(body, status=error.status, headers=error.headers)

    return handle


def _body_model(_request: web.Request, body: dict[str, Any]) -> str:
    return str(body.get("model", ""))


def _gemini_model(request: web.Request, _body: dict[str, Any]) -> str:
    return request.match_info["target"].partition(":")[0]


def _openai_chat(request: web.Request, body: dict[str, Any], d: Directives) -> _Rendered:
    reply = fmt.make_reply(fmt.read_openai_chat(body), d.prompt_tokens, d.completion_tokens)
    if not body.get("stream"):
        return fmt.openai_chat_body(reply)
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    return _Events(tuple(fmt.openai_chat_events(reply, include_usage)))


def _openai_embeddings(request: web.Request, body: dict[str, Any], d: Directives) -> _Rendered:
    model = fmt.require_model(body)
    inputs = fmt.embedding_inputs(body.get("input"))
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise SimulatedError(400, "encoding_format must be 'float' or 'base64'")
    dimensions = fmt.positive_int(body, "dimensions") or fmt.EMBEDDING_DIMENSIONS
    tokens = d.prompt_tokens
    if tokens is None:
        tokens = count_embedding_input_tokens(body["input"])
    return fmt.openai_embeddings_body(model, inputs, dimensions, encoding == "base64", tokens)


def _anthropic(request: web.Request, body: dict[str, Any], d: Directives) -> _Rendered:
    reply = fmt.make_reply(native.read_anthropic(body), d.prompt_tokens, d.completion_tokens)
    if body.get("stream"):
        return _Events(tuple(native.anthropic_events(reply)))
    return native.anthropic_body(reply)


def _gemini(request: web.Request, body: dict[str, Any], d: Directives) -> _Rendered:
    model, _, action = request.match_info["target"].partition(":")
    if action not in ("generateContent", "streamGenerateContent"):
        raise SimulatedError(404, f"models/{model}:{action} is not found")
    reply = fmt.make_reply(native.read_gemini(model, body), d.prompt_tokens, d.completion_tokens)
    if action == "generateContent":
        return native.gemini_body(reply)
    chunks = native.gemini_chunks(reply)
    if request.query.get("alt") == "sse":
        return _Events(tuple(fmt.sse(chunk) for chunk in chunks))
    return chunks  # without alt=sse the API streams one JSON array


def create_simulator_app(recorder: list[RecordedRequest] | None = None) -> web.Application:
    """The simulator as an aiohttp app; every request is appended to `recorder` if given."""
    app = web.Application()
    if recorder is not None:
        app[RECORDER_KEY] = recorder
    openai, anthropic, gemini = ProviderKind.OPENAI, ProviderKind.ANTHROPIC, ProviderKind.GEMINI
    chat = _Endpoint(openai, fmt.openai_error, _body_model, _openai_chat)
    embeddings = _Endpoint(openai, fmt.openai_error, _body_model, _openai_embeddings)
    messages = _Endpoint(anthropic, native.anthropic_error, _body_model, _anthropic)
    generate = _Endpoint(gemini, native.gemini_error, _gemini_model, _gemini)
    app.router.add_post("/openai/v1/chat/completions", _handler(chat))
    app.router.add_post("/openai/v1/embeddings", _handler(embeddings))
    app.router.add_post("/anthropic/v1/messages", _handler(messages))
    app.router.add_post("/gemini/{version:v1beta|v1}/models/{target}", _handler(generate))
    return app


@asynccontextmanager
async def running_simulator(host: str = "127.0.0.1") -> AsyncIterator[dict[ProviderKind, str]]:
    """Serve the simulator on a free port; yields each provider kind's api_base."""
    app = create_simulator_app()
    runner = web.AppRunner(
        app, handler_cancellation=True, shutdown_timeout=SHUTDOWN_TIMEOUT_S, access_log=None
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, 0)
        await site.start()
        port = runner.addresses[0][1]
        yield {kind: f"http://{host}:{port}{path}" for kind, path in API_BASE_PATHS.items()}
    finally:
        await runner.cleanup()
