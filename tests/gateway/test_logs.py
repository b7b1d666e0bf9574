"""The request log and the JSON the relay writes: one line per call, naming it and never its
key; lines of one turn of the event loop leave in one write; request fields the gateway
does not read reach the upstream exactly as the client sent them."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import aiohttp
import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import jsonio
from gateway.logs import CoalescingStreamHandler, JsonFormatter
from tests.gateway.conftest import Gateway, Upstream, new_org

MESSAGES = [{"role": "user", "content": "Write one question about rivers."}]


class Writes(io.StringIO):
    """A stream that remembers each write it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


@pytest.fixture
def access_log() -> Iterator[tuple[CoalescingStreamHandler, Writes]]:
    stream = Writes()
    handler = CoalescingStreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("gateway.access")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler, stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def test_each_call_logs_one_line_with_its_ids_and_no_key(
    gateway: Gateway, pool: asyncpg.Pool, access_log: tuple[CoalescingStreamHandler, Writes]
) -> None:
    handler, stream = access_log
    org = await new_org(pool)
    headers = {"Authorization": f"Bearer {org.key}"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{gateway.v1}/chat/completions", json={"messages": MESSAGES}, headers=headers
        ) as resp,
    ):
        assert resp.status == 200
        request_id = resp.headers["X-Request-Id"]
    await asyncio.sleep(0)  # the loop's turn ends: the line is written
    handler.flush()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    [line] = [line for line in lines if line.get("request_id") == request_id]
    assert line["path"] == "/v1/chat/completions" and line["status"] == 200
    assert line["organization_id"] == str(org.id)
    assert line["logger"] == "gateway.access" and line["level"] == "info"
    assert line["duration_ms"] > 0
    assert datetime.fromisoformat(line["at"]).utcoffset() is not None
    assert org.key not in stream.getvalue()


def test_timestamps_are_iso_8601_utc_to_the_millisecond() -> None:
    formatter = JsonFormatter()
    for created in (1_764_000_000.0, 1_764_000_000.999, 1_764_000_001.5):
        record = logging.makeLogRecord({"msg": "x", "created": created})
        at = json.loads(formatter.format(record))["at"]
        assert datetime.fromisoformat(at).timestamp() == pytest.approx(created, abs=0.001)
        assert at.endswith("+00:00") and len(at.split(".")[1]) == len("123+00:00")


async def test_lines_of_one_loop_turn_leave_in_one_write() -> None:
    stream = Writes()
    handler = CoalescingStreamHandler(stream)
    log = _logger(handler)
    for n in range(3):
        log.info("call %d", n)
    assert stream.writes == []  # waiting for the end of this turn of the loop
    await asyncio.sleep(0)
    assert stream.writes == ["call 0\ncall 1\ncall 2\n"]
    log.info("next")
    await asyncio.sleep(0)
    assert stream.writes[1:] == ["next\n"]


async def test_warnings_are_written_at_once_with_what_waited() -> None:
    stream = Writes()
    log = _logger(CoalescingStreamHandler(stream))
    log.info("before")
    log.warning("trouble")
    assert stream.writes == ["before\ntrouble\n"]


def test_lines_off_an_event_loop_are_written_at_once() -> None:
    stream = Writes()
    log = _logger(CoalescingStreamHandler(stream))
    log.info("one")
    assert stream.writes == ["one\n"]


def test_a_loop_gone_before_its_flush_does_not_hold_later_lines() -> None:
    stream = Writes()
    log = _logger(CoalescingStreamHandler(stream))

    async def log_and_leave() -> None:
        log.info("last words")  # the flush it schedules never runs: the loop closes

    loop = asyncio.new_event_loop()
    loop.run_until_complete(log_and_leave())
    loop.close()

    async def later() -> None:
        log.info("later")
        await asyncio.sleep(0)

    asyncio.run(later())
    assert stream.getvalue() == "last words\nlater\n"


def _logger(handler: logging.Handler) -> logging.Logger:
    log = logging.getLogger(f"tests.coalescing.{id(handler)}")
    log.propagate = False
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    return log


def test_dumps_keeps_what_orjson_cannot_hold() -> None:
    for value in ({"seed": 2**70}, {"a": "\ud800"}, {1: "non-string key"}, {"x": [1.5, "é"]}):
        assert json.loads(jsonio.dumps(value)) == json.loads(json.dumps(value))


def _verdict(parse: Any, data: bytes) -> tuple[str, str]:
    try:
        return "ok", repr(parse(data))
    except (ValueError, UnicodeDecodeError):
        return "error", ""


def _standard(data: bytes) -> Any:
    def refuse(constant: str) -> Any:
        raise ValueError(constant)

    return json.loads(data, parse_constant=refuse)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
BODY_EDGES = [
    b'{"seed": 123456789012345678901234567890}', b'{"a": -9223372036854775809}',
    b'{"a": 18446744073709551615}', b'{"x": NaN}', b'{"x": -Infinity}', b'{"s": "\\ud800"}',
    '{"a": "\u00e9"}'.encode("utf-16"), b'{"a": 1e400}', b'{"a": 1, "a": 2}', b"[1, 2",
    b"\xef\xbb\xbf{}", b'{"n": 0.1000000000000000055511151231257827}', b"\xff", b"",
]  # fmt: skip


@given(JSON_VALUES)
def test_request_bodies_parse_as_the_standard_library_parses_them(value: Any) -> None:
    for data in (json.dumps(value).encode(), json.dumps(value, ensure_ascii=False).encode()):
        assert _verdict(jsonio.loads_request, data) == _verdict(_standard, data)
    for data in BODY_EDGES:
        assert _verdict(jsonio.loads_request, data) == _verdict(_standard, data), data


async def test_fields_the_gateway_does_not_read_reach_the_upstream_exactly(
    gateway: Gateway, upstream: Upstream, pool: asyncpg.Pool
) -> None:
    org = await new_org(pool)
    extra = {
        "seed": 123456789012345678901234567890,  # beyond 64 bits: still exact
        "temperature": 0.1,
        "response_format": {"type": "json_object"},
        "metadata": {"note": "naïve ✓", "escaped": "\u2028"},
    }
    headers = {"Authorization": f"Bearer {org.key}", "Content-Type": "application/json"}
    body = json.dumps({"messages": MESSAGES, **extra})
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{gateway.v1}/chat/completions", data=body, headers=headers
        ) as resp:
            assert resp.status == 200
        sent = upstream.recorded[-1].body
        assert {name: sent[name] for name in extra} == extra
        not_json = body.replace("0.1", "NaN")
        async with session.post(
            f"{gateway.v1}/chat/completions", data=not_json, headers=headers
        ) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["code"] == "invalid_request"
