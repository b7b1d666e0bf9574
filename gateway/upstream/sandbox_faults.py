"""The sandbox's X-Sandbox-* request headers (syntax in `gateway.upstream.sandbox`) and the
faults they inject: provider errors, hangs and dropped connections."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from aiohttp import web

from gateway.upstream.sandbox_formats import SimulatedError

FAULT_HEADER = "X-Sandbox-Fault"
USAGE_HEADER = "X-Sandbox-Usage"
DELAY_HEADER = "X-Sandbox-Delay-Ms"
TIMEOUT_FAULT_S = 3600.0  # far beyond any upstream timeout: the caller's timeout must fire
HANG_POLL_S = 0.05  # how often a hanging request checks that its client is still there
DISCONNECT_AFTER_SHARE = 2  # disconnect_mid_stream sends the first 1/N of the events, then drops
RETRY_AFTER_S = 1  # what error_429 tells the caller to wait


class Fault(StrEnum):
    ERROR_500 = "error_500"
    ERROR_429 = "error_429"
    TIMEOUT = "timeout"
    DISCONNECT_MID_STREAM = "disconnect_mid_stream"


@dataclass(frozen=True)
class Directives:
    """What the X-Sandbox-* headers ask for."""

    faults: tuple[tuple[Fault, str | None], ...] = ()
    delay_ms: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    def fault_for(self, model: str) -> Fault | None:
        for fault, only_model in self.faults:
            if only_model is None or only_model == model:
                return fault
        return None


def _parse_faults(header: str) -> tuple[tuple[Fault, str | None], ...]:
    faults = []
    for entry in filter(None, (e.strip() for e in header.split(","))):
        name, _, model = entry.partition("@")
        try:
            faults.append((Fault(name.strip()), model.strip() or None))
        except ValueError:
            raise SimulatedError(400, f"unknown {FAULT_HEADER} entry {entry!r}") from None
    return tuple(faults)


def _parse_usage(header: str) -> dict[str, int]:
    counts = {}
    for entry in filter(None, (e.strip() for e in header.split(","))):
        key, _, value = entry.partition("=")
        if key.strip() not in ("prompt", "completion") or not value.strip().isdigit():
            raise SimulatedError(400, f"{USAGE_HEADER} wants prompt=N,completion=M, not {entry!r}")
        counts[key.strip()] = int(value)
    return counts


def parse_directives(headers: Mapping[str, str]) -> Directives:
    delay = headers.get(DELAY_HEADER, "0").strip()
    if not delay.isdigit():
        raise SimulatedError(400, f"{DELAY_HEADER} must be a whole number of milliseconds")
    usage = _parse_usage(headers.get(USAGE_HEADER, ""))
    return Directives(
        faults=_parse_faults(headers.get(FAULT_HEADER, "")),
        delay_ms=int(delay),
        prompt_tokens=usage.get("prompt"),
        completion_tokens=usage.get("completion"),
    )


async def hang(request: web.Request, seconds: float) -> None:
    """Sleep, cancellably, until `seconds` pass or the client goes away."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        if request.transport is None or request.transport.is_closing():
            raise ConnectionResetError("the client left during a timeout fault")
        await asyncio.sleep(HANG_POLL_S)


def drop_connection(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.close()


async def inject_fault(request: web.Request, fault: Fault | None) -> None:
    """Fail as `fault` asks (disconnect_mid_stream is left to the writer of the answer)."""
    if fault is Fault.ERROR_500:
        raise SimulatedError(
            500, "The server had an error processing your request (sandbox fault)."
        )
    if fault is Fault.ERROR_429:
        headers = {"Retry-After": str(RETRY_AFTER_S)}
        raise SimulatedError(429, "Rate limit reached (sandbox fault).", headers)
    if fault is Fault.TIMEOUT:
        await hang(request, TIMEOUT_FAULT_S)


def cut_short(frames: tuple[bytes, ...]) -> tuple[bytes, ...]:
    """The events disconnect_mid_stream sends before it drops the connection."""
    return frames[: max(1, len(frames) // DISCONNECT_AFTER_SHARE)]
