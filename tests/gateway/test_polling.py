"""Waits on short round trips polled instead of slept (gateway/polling.py), seen from the event
loop's selector: while a polled wait is in flight the loop never blocks in it."""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable, Coroutine
from typing import Any

from gateway.polling import MAX_POLLED_WAITS, Poller


class CountingLoop(asyncio.SelectorEventLoop):
    """Notes the timeout of each select: 0 is a poll, anything else (None: forever) a sleep."""

    def __init__(self) -> None:
        super().__init__(selectors.DefaultSelector())
        self.timeouts: list[float | None] = []
        select = self._selector.select  # type: ignore[attr-defined]

        def counting(timeout: float | None = None) -> Any:
            self.timeouts.append(timeout)
            return select(timeout)

        self._selector.select = counting  # type: ignore[attr-defined]

    def sleeps(self) -> int:
        return sum(1 for t in self.timeouts if t is None or t > 0)


def run(scenario: Callable[[CountingLoop], Coroutine[Any, Any, None]]) -> None:
    loop = CountingLoop()
    try:
        loop.run_until_complete(scenario(loop))
    finally:
        loop.close()


def test_the_loop_polls_while_a_wait_is_in_flight() -> None:
    async def scenario(loop: CountingLoop) -> None:
        poller = Poller(budget_s=10.0)
        with poller.waiting():
            loop.timeouts.clear()
            await asyncio.sleep(0.02)  # the round trip
            assert poller.polling
        assert len(loop.timeouts) > 3 and loop.sleeps() == 0
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert not poller.polling  # nothing in flight: it stopped

    run(scenario)


def test_without_a_budget_the_loop_sleeps() -> None:
    async def scenario(loop: CountingLoop) -> None:
        poller = Poller(budget_s=0)
        with poller.waiting():
            loop.timeouts.clear()
            await asyncio.sleep(0.02)
            assert not poller.polling
        assert loop.sleeps() >= 1

    run(scenario)


def test_polling_gives_up_once_the_budget_has_passed() -> None:
    async def scenario(loop: CountingLoop) -> None:
        poller = Poller(budget_s=0.005)
        with poller.waiting():
            loop.timeouts.clear()
            await asyncio.sleep(0.05)
        polled = [t for t in loop.timeouts if t == 0]
        assert polled and loop.sleeps() >= 1  # polled first, then slept until the reply
        assert not poller.polling

    run(scenario)


def test_a_busy_loop_is_not_polled() -> None:
    async def scenario(loop: CountingLoop) -> None:
        poller = Poller(budget_s=10.0)

        async def one_wait() -> None:
            with poller.waiting():
                await asyncio.sleep(0.02)

        loop.timeouts.clear()
        await asyncio.gather(*(one_wait() for _ in range(MAX_POLLED_WAITS + 1)))
        assert loop.sleeps() >= 1

    run(scenario)


def test_long_waits_turn_polling_off_until_they_are_short_again() -> None:
    async def scenario(loop: CountingLoop) -> None:
        poller = Poller(budget_s=0.001)
        for _ in range(40):  # a slow database: each wait outlasts the budget
            with poller.waiting():
                await asyncio.sleep(0.003)
        assert poller.typical_s > poller.budget_s
        with poller.waiting():
            assert not poller.polling  # it would give up before the reply anyway
            await asyncio.sleep(0)
        for _ in range(100):  # quick again
            with poller.waiting():
                await asyncio.sleep(0)
        assert poller.typical_s < poller.budget_s
        with poller.waiting():
            assert poller.polling
            await asyncio.sleep(0)

    run(scenario)
