"""Reading a provider's server-sent events (gateway/upstream/sse.py): events split across
the body's pieces however they fall, and the forms the format allows."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from gateway.upstream import sse
from gateway.upstream.base import UpstreamProtocolError


def read_all(pieces: Sequence[bytes], max_line: int = sse.MAX_LINE) -> list[bytes]:
    """Every event's data, the body arriving in `pieces`; and the body read to its end."""
    remaining = list(pieces)

    async def next_chunk() -> bytes | None:
        return remaining.pop(0) if remaining else None

    async def drain() -> list[bytes]:
        reader = sse.DataReader(next_chunk, max_line)
        events = []
        while (event := await reader.next()) is not None:
            events.append(event)
        assert await reader.next() is None  # and it stays ended
        return events

    events = asyncio.run(drain())
    assert not remaining
    return events


STREAM = b'data: {"a":1}\n\ndata: {"b":2}\n\ndata: [DONE]\n\n'


@pytest.mark.parametrize("size", [1, 2, 3, 7, 16, len(STREAM)])
def test_events_are_the_same_however_the_body_is_split(size: int) -> None:
    pieces = [STREAM[i : i + size] for i in range(0, len(STREAM), size)]
    assert read_all(pieces) == [b'{"a":1}', b'{"b":2}', b"[DONE]"]


def test_crlf_line_ends_multi_line_data_and_other_fields() -> None:
    body = (
        b": a comment\r\n"
        b"event: message\r\nid: 7\r\ndata:first\r\ndata: second\r\nretry: 10\r\n\r\n"
        b"data: third\n\n"
    )
    assert read_all([body]) == [b"first\nsecond", b"third"]


def test_events_without_data_are_skipped() -> None:
    assert read_all([b"event: ping\n\n\n\ndata: x\n\n"]) == [b"x"]


def test_the_last_event_counts_without_its_blank_line_or_newline() -> None:
    assert read_all([b"data: one\n\ndata: two"]) == [b"one", b"two"]
    assert read_all([b"data: one\n\ndata: two\n"]) == [b"one", b"two"]


def test_an_empty_body_has_no_events() -> None:
    assert read_all([]) == []
    assert read_all([b"", b""]) == []


def test_a_line_longer_than_the_limit_is_refused() -> None:
    with pytest.raises(UpstreamProtocolError, match="longer than 16 bytes"):
        read_all([b"data: " + b"x" * 20], max_line=16)
    assert read_all([b"data: " + b"x" * 10 + b"\n\n"], max_line=16) == [b"x" * 10]
