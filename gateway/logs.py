"""Logging: one structured line per request (JSON; human-readable on a terminal). Prompts,
answers and keys are never logged."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway import jsonio

access_log = logging.getLogger("gateway.access")
CALL_DETAILS = web.RequestKey("call_details", dict[str, Any])  # filled in by the pipeline

QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "at": self._at(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return jsonio.dumps_text(line, default=str)

    def _at(self, created: float) -> str:
        """ISO 8601 in UTC to the millisecond; the part up to the second made once a second."""
        second = int(created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((created - second) * 1000):03d}+00:00"


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", {})
        return text + ("  " + " ".join(f"{k}={v}" for k, v in fields.items()) if fields else "")


class CoalescingStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler whose lines, logged on an event loop, leave once per turn of the
    loop, together: one write instead of one per request. Warnings and worse, lines logged
    off the loop, and a backlog over MAX_PENDING_CHARS are written at once; `flush` (also
    run at exit by logging.shutdown) writes whatever waits."""

    MAX_PENDING_CHARS = 1 << 16

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._size = 0
        self._flush_on: asyncio.AbstractEventLoop | None = None  # the loop a flush waits on

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self._pending.append(line)
        self._size += len(line)
        if record.levelno >= logging.WARNING or self._size >= self.MAX_PENDING_CHARS:
            self.flush()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if self._flush_on is not loop:  # none waiting on this loop (or on one long gone)
            self._flush_on = loop
            loop.call_soon(self.flush)

    def flush(self) -> None:
        with self.lock or contextlib.nullcontext():
            self._flush_on = None
            if not self._pending:
                return
            text, self._pending, self._size = "".join(self._pending), [], 0
            try:
                self.stream.write(text)
                self.stream.flush()
            except Exception:
                self.handleError(logging.makeLogRecord({"msg": "log write failed"}))


def configure_logging(level: int = logging.INFO) -> None:
    """JSON lines, or readable text when stderr is a terminal."""
    handler = CoalescingStreamHandler(sys.stderr)
    if sys.stderr.isatty():
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # what no line shows, not gathered for every record (logging's documented optimisation;
    # the caller's file and line are a stack walk per record): a fifth of an access line's cost
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None


@web.middleware
async def access_log_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        fields: dict[str, Any] = {
            "method": request.method,
            "path": request.path,
            "status": status,
            "duration_ms": round((time.perf_counter() - started) * 1000, 3),
        }
        fields.update(request.get(CALL_DETAILS, {}))
        # probes and scrapes every few seconds would drown the calls that matter
        level = logging.DEBUG if request.path in QUIET_PATHS else logging.INFO
        access_log.log(
            level, "%s %s %s", request.method, request.path, status, extra={"fields": fields}
        )
