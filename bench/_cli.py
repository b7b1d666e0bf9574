"""What the benches share on their way in and out: the command line, running the run, and
the percentile of their samples."""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any


def new_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """A parser for ``python -m <prog>``, described by the first line of its docstring."""
    return argparse.ArgumentParser(prog=f"python -m {prog}", description=(doc or "").split("\n")[0])


def positive_list(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers")
    return list(dict.fromkeys(values))


def event_loop() -> str:
    """uvloop where it is installed, as the gateway's workers run (gateway.server); its name."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return f"uvloop {importlib.metadata.version('uvloop')}"


def run_main(
    run: Callable[[argparse.Namespace], Coroutine[Any, Any, int]], args: argparse.Namespace
) -> int:
    """`run(args)` on a new event loop: its exit status, or 130 when interrupted."""
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
