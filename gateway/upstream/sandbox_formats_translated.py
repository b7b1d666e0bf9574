"""The sandbox's Anthropic Messages and Gemini generateContent shapes: requests read into a
provider-neutral `Call`, replies rendered as bodies and as server-sent events."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from gateway.upstream.sandbox_formats import (
    Answer,
    Call,
    Reply,
    SimulatedError,
    new_id,
    positive_int,
    require_model,
    require_objects,
    sse,
    text_of,
)
from policies.tokens import count_chat_prompt_tokens

_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    529: "overloaded_error",
}
_GEMINI_STATUSES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    503: "UNAVAILABLE",
}


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    users = [m for m in messages if m.get("role") == "user"]
    return text_of(users[-1].get("content")) if users else ""


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    error_type = _ANTHROPIC_ERROR_TYPES.get(status, "api_error")
    return {"type": "error", "error": {"type": error_type, "message": message}}


def _anthropic_tool_name(body: dict[str, Any]) -> str | None:
    tools, choice = body.get("tools"), body.get("tool_choice")
    if not tools or not isinstance(choice, dict):
        return None
    if choice.get("type") == "tool":
        return str(choice.get("name", ""))
    if choice.get("type") == "any":
        return str(tools[0].get("name", ""))
    return None


def read_anthropic(body: dict[str, Any]) -> Call:
    model = require_model(body)
    if body.get("max_tokens") is None:
        raise SimulatedError(400, "max_tokens: Field required")
    raw = require_objects(body, "messages")
    messages = [{"role": m.get("role"), "content": m.get("content")} for m in raw]
    if body.get("system"):
        messages.insert(0, {"role": "system", "content": body["system"]})
    return Call(
        model=model,
        prompt_tokens=count_chat_prompt_tokens(messages, body.get("tools")),
        seed=_last_user_text(messages),
        max_tokens=positive_int(body, "max_tokens"),
        tool_name=_anthropic_tool_name(body),
    )


def _anthropic_stop(answer: Answer) -> str:
    return "tool_use" if answer.tool_name else "max_tokens" if answer.truncated else "end_turn"


def _anthropic_usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def _anthropic_message(reply: Reply, content: list[Any], stop: str | None) -> dict[str, Any]:
    return {
        "id": new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": reply.model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
    }


def anthropic_body(reply: Reply) -> dict[str, Any]:
    answer = reply.answers[0]
    block: dict[str, Any] = {"type": "text", "text": answer.text}
    if answer.tool_name:
        block = {"type": "tool_use", "id": new_id("toolu_"), "name": answer.tool_name, "input": {}}
    message = _anthropic_message(reply, [block], _anthropic_stop(answer))
    message["usage"] = _anthropic_usage(reply.prompt_tokens, reply.completion_tokens)
    return message


def _anthropic_block_events(answer: Answer) -> Iterator[bytes]:
    block: dict[str, Any] = {"type": "text", "text": ""}
    deltas = [{"type": "text_delta", "text": piece} for piece in answer.pieces]
    if answer.tool_name:
        block = {"type": "tool_use", "id": new_id("toolu_"), "name": answer.tool_name, "input": {}}
        deltas = [{"type": "input_json_delta", "partial_json": "{}"}]
    yield sse(
        {"type": "content_block_start", "index": 0, "content_block": block}, "content_block_start"
    )
    yield sse({"type": "ping"}, "ping")
    for delta in deltas:
        yield sse(
            {"type": "content_block_delta", "index": 0, "delta": delta}, "content_block_delta"
        )
    yield sse({"type": "content_block_stop", "index": 0}, "content_block_stop")


def anthropic_events(reply: Reply) -> Iterator[bytes]:
    """The Messages API's event sequence; like the real API, message_start reports the input
    tokens and message_delta the output tokens."""
    answer = reply.answers[0]
    message = _anthropic_message(reply, [], None)
    message["usage"] = _anthropic_usage(reply.prompt_tokens, min(1, reply.completion_tokens))
    yield sse({"type": "message_start", "message": message}, "message_start")
    yield from _anthropic_block_events(answer)
    delta = {"stop_reason": _anthropic_stop(answer), "stop_sequence": None}
    usage = {"output_tokens": reply.completion_tokens}
    yield sse({"type": "message_delta", "delta": delta, "usage": usage}, "message_delta")
    yield sse({"type": "message_stop"}, "message_stop")


def gemini_error(status: int, message: str) -> dict[str, Any]:
    return {
        "error": {
            "code": status,
            "message": message,
            "status": _GEMINI_STATUSES.get(status, "INTERNAL"),
        }
    }


def _either(mapping: Any, camel: str, snake: str) -> Any:
    """Google's JSON accepts both spellings of a field name."""
    if not isinstance(mapping, dict):
        return None
    return mapping.get(camel) if mapping.get(camel) is not None else mapping.get(snake)


def _gemini_content(parts: Any) -> list[Any]:
    if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
        raise SimulatedError(400, "parts must be an array of objects")
    return [{"type": "text", "text": p["text"]} if "text" in p else p for p in parts]


def _gemini_tool_name(body: dict[str, Any]) -> str | None:
    calling = _either(
        _either(body, "toolConfig", "tool_config"),
        "functionCallingConfig",
        "function_calling_config",
    )
    if _either(calling, "mode", "mode") != "ANY":
        return None
    allowed = _either(calling, "allowedFunctionNames", "allowed_function_names")
    if allowed:
        return str(allowed[0])
    for tool in body.get("tools") or []:
        declarations = _either(tool, "functionDeclarations", "function_declarations")
        if declarations:
            return str(declarations[0].get("name", ""))
    return None


def read_gemini(model: str, body: dict[str, Any]) -> Call:
    contents = require_objects(body, "contents")
    messages = [
        {
            "role": "assistant" if c.get("role") == "model" else c.get("role", "user"),
            "content": _gemini_content(c.get("parts")),
        }
        for c in contents
    ]
    system = _either(body, "systemInstruction", "system_instruction")
    if system:
        messages.insert(0, {"role": "system", "content": _gemini_content(system.get("parts"))})
    config = _either(body, "generationConfig", "generation_config") or {}
    return Call(
        model=model,
        prompt_tokens=count_chat_prompt_tokens(messages, body.get("tools")),
        seed=_last_user_text(messages),
        max_tokens=positive_int(config, "maxOutputTokens", "max_output_tokens"),
        tool_name=_gemini_tool_name(body),
        n=positive_int(config, "candidateCount", "candidate_count") or 1,
    )


def _gemini_parts(answer: Answer, text: str) -> list[dict[str, Any]]:
    if answer.tool_name:
        return [{"functionCall": {"name": answer.tool_name, "args": {}}}]
    return [{"text": text}]


def _gemini_candidate(index: int, parts: list[Any], finish: str | None) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": index}
    if finish:
        candidate["finishReason"] = finish
    return candidate


def _gemini_usage(reply: Reply, final: bool) -> dict[str, Any]:
    if not final:  # intermediate chunks count the prompt; the last one carries the totals
        return {"promptTokenCount": reply.prompt_tokens, "totalTokenCount": reply.prompt_tokens}
    return {
        "promptTokenCount": reply.prompt_tokens,
        "candidatesTokenCount": reply.completion_tokens,
        "totalTokenCount": reply.total_tokens,
    }


def _gemini_response(
    reply: Reply, candidates: list[Any], final: bool, response_id: str
) -> dict[str, Any]:
    return {
        "candidates": candidates,
        "usageMetadata": _gemini_usage(reply, final),
        "modelVersion": reply.model,
        "responseId": response_id,
    }


def _gemini_finish(answer: Answer) -> str:
    return "MAX_TOKENS" if answer.truncated else "STOP"


def gemini_body(reply: Reply) -> dict[str, Any]:
    candidates = [
        _gemini_candidate(i, _gemini_parts(a, a.text), _gemini_finish(a))
        for i, a in enumerate(reply.answers)
    ]
    return _gemini_response(reply, candidates, True, new_id(""))


def gemini_chunks(reply: Reply) -> list[dict[str, Any]]:
    """streamGenerateContent's responses: one per text piece, the last of each candidate with its
    finishReason, and the full usage on the very last."""
    response_id = new_id("")
    steps = [
        (i, answer, piece, n == len(answer.pieces or ("",)) - 1)
        for i, answer in enumerate(reply.answers)
        for n, piece in enumerate(answer.pieces or ("",))
    ]
    chunks = []
    for position, (index, answer, piece, last) in enumerate(steps):
        candidate = _gemini_candidate(
            index, _gemini_parts(answer, piece), _gemini_finish(answer) if last else None
        )
        chunks.append(_gemini_response(reply, [candidate], position == len(steps) - 1, response_id))
    return chunks
