"""The sandbox's answers, shared by every simulated provider (deterministic text with real token
counts), and OpenAI's wire shapes: chat and embeddings requests read, bodies and events built."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from policies.tokens import count_chat_prompt_tokens, count_text_tokens, decode_tokens, encode_text

SENTENCES = (
    "The sandbox answers every question with a sentence from a fixed pool.",
    "Credits are reserved before the call and settled from the reported usage.",
    "A deterministic reply makes billing tests reproducible.",
    "Streaming answers arrive in small pieces, just like the real provider sends them.",
    "Token counts come from a real tokenizer, so the charges are realistic.",
    "Every fallback model is tried in priority order until one answers.",
    "Rate limits are enforced per organization and capability.",
    "The ledger is append-only, and every balance equals the sum of its entries.",
    "Faults can be injected with a request header to rehearse failure paths.",
    "Nothing in sandbox mode reaches a real provider or costs real money.",
)
STREAM_PIECE_TOKENS = 4  # tokens per streamed delta: several chunks even for short answers
EMBEDDING_DIMENSIONS = 16  # small, so test payloads stay readable


class SimulatedError(Exception):
    """A refusal the simulator answers in the provider's error shape."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass(frozen=True)
class Answer:
    """One generated choice: text (streamed as `pieces`) or a call of the tool `tool_name`."""

    pieces: tuple[str, ...]
    tool_name: str | None
    completion_tokens: int
    truncated: bool  # stopped at the request's output limit

    @property
    def text(self) -> str:
        return "".join(self.pieces)


@dataclass(frozen=True)
class Call:
    """A provider-neutral reading of a generation request."""

    model: str
    prompt_tokens: int
    seed: str  # the text the answer is derived from
    max_tokens: int | None
    tool_name: str | None
    n: int = 1


@dataclass(frozen=True)
class Reply:
    """What to render: the answers and the usage to report (which a test may override)."""

    model: str
    answers: tuple[Answer, ...]
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def compose_answer(seed: str, max_tokens: int | None, tool_name: str | None) -> Answer:
    """The same seed, limit and tool always give the same answer."""
    if tool_name is not None:
        return Answer((), tool_name, count_text_tokens(tool_name + "{}"), truncated=False)
    digest = hashlib.sha256(seed.encode()).digest()
    count = 2 + digest[0] % 3
    text = " ".join(SENTENCES[digest[1 + i] % len(SENTENCES)] for i in range(count))
    tokens = encode_text(text)
    truncated = max_tokens is not None and len(tokens) > max_tokens
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    pieces = tuple(
        decode_tokens(tokens[i : i + STREAM_PIECE_TOKENS])
        for i in range(0, len(tokens), STREAM_PIECE_TOKENS)
    )
    return Answer(pieces, None, len(tokens), truncated)


def make_reply(call: Call, prompt_override: int | None, completion_override: int | None) -> Reply:
    seeds = [call.seed if i == 0 else f"{call.seed}#{i}" for i in range(call.n)]
    answers = tuple(compose_answer(seed, call.max_tokens, call.tool_name) for seed in seeds)
    produced = sum(answer.completion_tokens for answer in answers)
    return Reply(
        model=call.model,
        answers=answers,
        prompt_tokens=call.prompt_tokens if prompt_override is None else prompt_override,
        completion_tokens=produced if completion_override is None else completion_override,
    )


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def sse(data: object, event: str | None = None) -> bytes:
    """One server-sent event; `data` is JSON-encoded unless already a string."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


def text_of(content: Any) -> str:
    """The text of a message's content: a string, or the text of its text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else json.dumps(content)


def positive_int(body: dict[str, Any], *names: str) -> int | None:
    """The first of `names` present in `body`, checked to be a positive integer."""
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SimulatedError(400, f"{name} must be a positive integer")
        return value
    return None


def require_objects(body: dict[str, Any], name: str) -> list[dict[str, Any]]:
    value = body.get(name)
    if not isinstance(value, list) or not value or not all(isinstance(v, dict) for v in value):
        raise SimulatedError(400, f"{name} must be a non-empty array of objects")
    return value


def require_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise SimulatedError(400, "model is required")
    return model


_OPENAI_ERRORS = {  # status -> (type, code), as api.openai.com reports them
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
}


def openai_error(status: int, message: str) -> dict[str, Any]:
    error_type, code = _OPENAI_ERRORS.get(status, ("server_error", None))
    return {"error": {"message": message, "type": error_type, "param": None, "code": code}}


def embedding_inputs(raw: Any) -> list[str]:
    """Each input of an embeddings request as a seed string (token ids as their JSON)."""
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw and all(isinstance(i, int) for i in raw):
        return [json.dumps(raw)]
    if isinstance(raw, list) and raw and all(isinstance(i, str | list) for i in raw):
        return [i if isinstance(i, str) else json.dumps(i) for i in raw]
    raise SimulatedError(400, "input must be a string, an array of strings or of token arrays")


def embedding_vector(seed: str, dimensions: int) -> list[float]:
    """A deterministic unit vector for `seed`."""
    stream = hashlib.shake_256(seed.encode()).digest(2 * dimensions)
    raw = [
        int.from_bytes(stream[2 * i : 2 * i + 2], "big") / 32767.5 - 1 for i in range(dimensions)
    ]
    norm = sum(v * v for v in raw) ** 0.5 or 1.0
    return [v / norm for v in raw]


def openai_embeddings_body(
    model: str, inputs: list[str], dimensions: int, as_base64: bool, prompt_tokens: int
) -> dict[str, Any]:
    data = []
    for index, seed in enumerate(inputs):
        vector = embedding_vector(seed, dimensions)
        encoded: Any = vector
        if as_base64:
            encoded = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return {"object": "list", "data": data, "model": model, "usage": usage}


def _openai_tool_name(body: dict[str, Any]) -> str | None:
    tools, choice = body.get("tools"), body.get("tool_choice")
    if not tools:
        return None
    if isinstance(choice, dict):
        return str(choice.get("function", {}).get("name", ""))
    if choice == "required":
        return str(tools[0].get("function", {}).get("name", ""))
    return None


def read_openai_chat(body: dict[str, Any]) -> Call:
    messages = require_objects(body, "messages")
    users = [m for m in messages if m.get("role") == "user"]
    return Call(
        model=require_model(body),
        prompt_tokens=count_chat_prompt_tokens(messages, body.get("tools")),
        seed=text_of(users[-1].get("content")) if users else "",
        max_tokens=positive_int(body, "max_completion_tokens", "max_tokens"),
        tool_name=_openai_tool_name(body),
        n=positive_int(body, "n") or 1,
    )


def _openai_usage(reply: Reply) -> dict[str, Any]:
    return {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "total_tokens": reply.total_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    }


def _openai_finish(answer: Answer) -> str:
    return "tool_calls" if answer.tool_name else "length" if answer.truncated else "stop"


def _openai_tool_calls(answer: Answer, call_id: str) -> list[dict[str, Any]]:
    function = {"name": answer.tool_name, "arguments": "{}"}
    return [{"id": call_id, "type": "function", "function": function}]


def _openai_envelope(reply: Reply, object_name: str) -> dict[str, Any]:
    return {
        "id": new_id("chatcmpl-"),
        "object": object_name,
        "created": int(time.time()),
        "model": reply.model,
        "system_fingerprint": "fp_sandbox",
    }


def openai_chat_body(reply: Reply) -> dict[str, Any]:
    choices = []
    for index, answer in enumerate(reply.answers):
        message: dict[str, Any] = {"role": "assistant", "content": answer.text, "refusal": None}
        if answer.tool_name:
            message.update(content=None, tool_calls=_openai_tool_calls(answer, new_id("call_")))
        finish = _openai_finish(answer)
        choices.append(
            {"index": index, "message": message, "logprobs": None, "finish_reason": finish}
        )
    envelope = _openai_envelope(reply, "chat.completion")
    return {**envelope, "choices": choices, "usage": _openai_usage(reply)}


def _openai_deltas(answer: Answer) -> Iterator[tuple[dict[str, Any], str | None]]:
    if answer.tool_name:
        call = _openai_tool_calls(answer, new_id("call_"))[0]
        start = {**call, "index": 0, "function": {"name": answer.tool_name, "arguments": ""}}
        yield {"role": "assistant", "content": None, "tool_calls": [start]}, None
        yield {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}, None
    else:
        yield {"role": "assistant", "content": "", "refusal": None}, None
        for piece in answer.pieces:
            yield {"content": piece}, None
    yield {}, _openai_finish(answer)


def openai_chat_events(reply: Reply, include_usage: bool) -> Iterator[bytes]:
    """`chat.completion.chunk` events; with `include_usage`, every chunk has `usage: null` and
    a last chunk with no choices carries the usage."""
    head = _openai_envelope(reply, "chat.completion.chunk")
    tail: dict[str, Any] = {"usage": None} if include_usage else {}
    for index, answer in enumerate(reply.answers):
        for delta, finish in _openai_deltas(answer):
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            yield sse({**head, "choices": [choice], **tail})
    if include_usage:
        yield sse({**head, "choices": [], "usage": _openai_usage(reply)})
    yield sse("[DONE]")
