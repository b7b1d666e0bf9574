"""A fast fake OpenAI upstream for ``bench.proxy``: fixed answers prepared once.

It runs in a process of its own: ``python -m bench._fake PORT``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from aiohttp import web

from bench._cli import event_loop

MODEL = "gpt-4o-mini"
USAGE = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}


def _envelope(kind: str) -> dict[str, Any]:
    return {"id": "chatcmpl-bench", "object": kind, "created": int(time.time()), "model": MODEL}


def _chat_body() -> bytes:
    message = {"role": "assistant", "content": "Hello there, bench!", "refusal": None}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
    return json.dumps(
        {**_envelope("chat.completion"), "choices": [choice], "usage": USAGE}
    ).encode()


def _stream_body(include_usage: bool) -> bytes:
    """A short SSE stream: role, two pieces, finish; then the usage chunk when asked."""
    head = _envelope("chat.completion.chunk")
    tail: dict[str, Any] = {"usage": None} if include_usage else {}
    deltas: list[tuple[dict[str, Any], str | None]] = [
        ({"role": "assistant", "content": ""}, None),
        ({"content": "Hello there,"}, None),
        ({"content": " bench!"}, None),
        ({}, "stop"),
    ]
    chunks = [
        {**head, "choices": [{"index": 0, "delta": d, "finish_reason": f}], **tail}
        for d, f in deltas
    ]
    if include_usage:
        chunks.append({**head, "choices": [], "usage": USAGE})
    frames = [f"data: {json.dumps(chunk)}\n\n" for chunk in chunks] + ["data: [DONE]\n\n"]
    return "".join(frames).encode()


def fake_upstream_app() -> web.Application:
    """POST /v1/chat/completions with fixed answers, prepared once: the cheapest upstream."""
    plain, stream, stream_usage = _chat_body(), _stream_body(False), _stream_body(True)

    async def chat(request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        if not body.get("stream"):
            return web.Response(body=plain, content_type="application/json")
        include = bool((body.get("stream_options") or {}).get("include_usage"))
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        await response.write(stream_usage if include else stream)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


def main() -> None:
    port = int(sys.argv[1])
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    event_loop()  # uvloop, as the load client: the less the fake takes, the more the servers get
    web.run_app(fake_upstream_app(), host="127.0.0.1", port=port, print=None, access_log=None)


if __name__ == "__main__":
    main()
