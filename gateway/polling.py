"""Waiting for short round trips (a ledger batch in PostgreSQL, a rate-limit script in Redis,
an upstream that answers within the budget) by keeping the event loop turning instead of
letting it sleep.

A worker that sleeps in epoll_wait until a reply lands pays for the wake-up: on the virtual
machines this runs on, the idle CPU halts and waking it takes a good part of a millisecond.
Every call waits twice on the ledger (the hold before the upstream call, the settlement
after it), each wait about a millisecond, on the call's critical path. While such a wait is
in flight, a Poller keeps one task yielding to the loop, so the loop polls (epoll with a zero
timeout, other work running between its turns as usual) and reads the reply the moment it
arrives. Measured at concurrency 1 (bench.proxy's fake upstream, alternating rounds): -0.45 ms
p50 per streamed call, for about as much CPU as the waits last; at concurrency 64, where the
loop is rarely idle, no change in throughput. The wait for an upstream's first byte has a
Poller of its own: a language model takes far longer than the budget to answer, so those
waits are not polled (see below); a fast upstream (a local model, a cache, the bench's fake)
is, which took another 0.2 ms off the p50 at concurrency 1.

It costs CPU for the length of each wait and never longer than `budget_s` past the last one
that began; a worker with nothing in flight sleeps as before, and so does a busy one (more
than MAX_POLLED_WAITS at once): its loop has other work coming and seldom sleeps, and on a
machine short of cores polling would take CPU from the database. When the waits grow longer than
the budget (a distant or overloaded database), polling would give up before the reply and
only burn CPU, so it stops until the typical wait is short again. `server.poll_round_trips_us`
sets the budget; 0 turns polling off.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

TYPICAL_WEIGHT = 1 / 16  # of the newest wait in the running mean of waits
MAX_POLLED_WAITS = 4  # more waits at once: the loop has other work coming, and sleeps rarely


class Poller:
    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s
        self.typical_s = 0.0  # running mean of the waits
        self._in_flight = 0  # waits under way
        self._until = 0.0  # loop time
        self._task: asyncio.Task[None] | None = None

    def waiting(self) -> _Wait:
        """`with poller.waiting(): await round_trip()`."""
        return _Wait(self)

    @property
    def polling(self) -> bool:
        return self._task is not None

    def _begin(self, loop: asyncio.AbstractEventLoop) -> None:
        self._in_flight += 1
        if not self._worth_it() or self.typical_s > self.budget_s:
            return
        self._until = loop.time() + self.budget_s
        if self._task is None:
            self._task = loop.create_task(self._poll(loop))

    def _end(self, waited_s: float) -> None:
        self._in_flight -= 1
        self.typical_s += (waited_s - self.typical_s) * TYPICAL_WEIGHT

    def _worth_it(self) -> bool:
        return 0 < self._in_flight <= MAX_POLLED_WAITS and self.budget_s > 0

    async def _poll(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            while self._worth_it() and loop.time() < self._until:
                await asyncio.sleep(0)  # one turn of the loop, which polls instead of sleeping
        finally:
            self._task = None


class _Wait:
    __slots__ = ("_poller", "_loop", "_began")

    def __init__(self, poller: Poller) -> None:
        self._poller = poller

    def __enter__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._began = self._loop.time()
        self._poller._begin(self._loop)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._poller._end(self._loop.time() - self._began)
