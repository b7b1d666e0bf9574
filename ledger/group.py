"""Group commit: the holds and settlements a process asks for at about the same time go to
PostgreSQL together, one statement and one commit per batch (reserve_batch, settle_batch,
and apply_batch for both kinds at once: ledger/batches.py).

Every call of an organization takes its balance row lock, and keeps it until its commit is
on disk; alone, a busy organization gets one call per commit. Here a call's operation joins
a queue; a batch leaves as soon as one of `max_inflight` slots is free, with everything
queued by then (up to `max_batch`). An idle process sends each operation alone at once, so
nothing waits for a timer; a busy one sends fewer, fuller batches.

Each operation's outcome is its own: an item the ledger refuses (unknown organization,
conflicting key, too few credits) fails alone. A batch that fails as a whole for anything but
an unreachable database is retried item by item, so that one bad item cannot fail the rest.

A caller cancelled while its hold is being taken does not leave the hold behind: once the
batch has committed, a granted hold nobody waits for any more is released. Releases (after
a failed call) are not batched, but tracked like the rest: `drain`, at shutdown before the
pool closes, waits for every one of them.

Batches on a pool keep their connection between batches (at most one per batch in flight,
and never more than half the pool): checking a connection out of asyncpg's pool and back
costs about what a small batch does. A connection whose batch failed or was interrupted
goes back to the pool, which replaces it if it broke.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

import asyncpg

from ledger import batches, reservations
from ledger.batches import Operation, Outcome
from ledger.db import Conn, translated
from ledger.errors import LedgerError, LedgerUnavailable
from ledger.reservations import HoldRequest, Reservation, Settlement, SettleRequest

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Res = TypeVar("Res")

ABANDONED_RELEASE_REASON = "caller cancelled while the hold was taken"


class _Connections:
    """Where batches get their connection. From a pool: kept between batches, up to `keep`
    idle; any other Conn (one connection, in tests and tools) is used as it is."""

    def __init__(self, conn: Conn, keep: int) -> None:
        self._conn = conn
        self._pool = conn if isinstance(conn, asyncpg.Pool) else None
        self._keep = 0 if self._pool is None else min(keep, self._pool.get_max_size() // 2)
        self._idle: list[Any] = []

    async def take(self) -> Conn:
        if self._pool is None:
            return self._conn
        while self._idle:
            conn = self._idle.pop()
            if _alive(conn):
                return conn  # type: ignore[no-any-return]
            await self.give_back(conn, reusable=False)  # its server went: the pool replaces it
        with translated():
            return await self._pool.acquire()

    async def give_back(self, conn: Conn, reusable: bool) -> None:
        if self._pool is None:
            return
        held: Any = conn  # a pool's connection, given by take()
        if reusable and len(self._idle) < self._keep and _alive(held):
            self._idle.append(held)
            return
        with translated():
            await self._pool.release(held)

    async def close(self) -> None:
        """Every kept connection back to the pool (before it closes)."""
        while self._idle and self._pool is not None:
            with translated():
                await self._pool.release(self._idle.pop())


def _alive(conn: Any) -> bool:
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:  # closed by its server: asyncpg gave it back to the pool
        return False


@dataclass
class _Lane(Generic[Req, Res]):
    """A queue of operations and the batches of them in flight."""

    name: str
    run_batch: Callable[[Conn, Sequence[Req]], Awaitable[list[Res | LedgerError]]]
    run_one: Callable[[Conn, Req], Awaitable[Res]]
    connections: _Connections
    max_batch: int
    max_inflight: int
    on_batch: Callable[[Sequence[Req]], None]
    queue: list[tuple[Req, asyncio.Future[Res]]] = field(default_factory=list)
    inflight: set[asyncio.Task[None]] = field(default_factory=set)
    scheduled: bool = False

    def submit(self, request: Req) -> asyncio.Future[Res]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Res] = loop.create_future()
        self.queue.append((request, future))
        if not self.inflight:  # idle: no reason to wait
            self._launch()
        elif len(self.inflight) < self.max_inflight and not self.scheduled:
            # busy: leave after this loop iteration, with whatever else it queues
            self.scheduled = True
            loop.call_soon(self._launch)
        return future

    def _launch(self) -> None:
        self.scheduled = False
        while self.queue and len(self.inflight) < self.max_inflight:
            batch, self.queue = self.queue[: self.max_batch], self.queue[self.max_batch :]
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self.inflight.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.inflight.discard(task)
        self._launch()

    async def _run(self, batch: list[tuple[Req, asyncio.Future[Res]]]) -> None:
        self.on_batch([request for request, _ in batch])
        try:
            conn = await self.connections.take()
        except Exception as exc:  # no connection: every item fails with the reason
            for _, future in batch:
                _fail(future, exc)
            return
        reusable = False
        try:
            reusable = await self._run_on(conn, batch)
        finally:
            await self.connections.give_back(conn, reusable)

    async def _run_on(self, conn: Conn, batch: list[tuple[Req, asyncio.Future[Res]]]) -> bool:
        """Whether the connection is fit for the next batch."""
        if len(batch) == 1:  # alone (or batching off): the single operation costs less
            return await self._run_singly(conn, batch)
        try:
            outcomes = await self.run_batch(conn, [request for request, _ in batch])
        except LedgerUnavailable as exc:
            for _, future in batch:
                _fail(future, exc)
            return False
        except asyncio.CancelledError:  # at shutdown: nobody is left waiting
            for _, future in batch:
                _fail(future, LedgerUnavailable(f"{self.name} batch interrupted"))
            raise
        except Exception as exc:  # each item's own outcome is found below
            # not the database's absence: one item may be at fault, so run them one by one
            log.warning(
                "a %s batch of %d failed (%s); applying it item by item",
                self.name,
                len(batch),
                type(exc).__name__,
            )
            return await self._run_singly(conn, batch)
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            _settle_future(future, outcome)
        return True

    async def _run_singly(self, conn: Conn, batch: list[tuple[Req, asyncio.Future[Res]]]) -> bool:
        reusable = True
        for request, future in batch:
            try:
                result = await self.run_one(conn, request)
            except Exception as exc:  # handed to the item's caller, not dropped
                # a refusal leaves the connection as it was; anything else may not have
                reusable = reusable and isinstance(exc, LedgerError)
                reusable = reusable and not isinstance(exc, LedgerUnavailable)
                _fail(future, exc)
            else:
                _settle_future(future, result)
        return reusable


def _settle_future(future: asyncio.Future[Res], outcome: Res | LedgerError) -> None:
    if future.done():
        return
    if isinstance(outcome, LedgerError):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class GroupCommit:
    """Reserve and settle through batches (see the module's docstring)."""

    def __init__(
        self,
        conn: Conn,
        *,
        max_batch: int = 32,
        max_inflight: int = 2,
        on_batch: Callable[[str, int], None] | None = None,
    ) -> None:
        """`on_batch(kind, size)` is told of the holds ("reserve") and the settlements
        ("settle") of every batch sent."""
        if max_batch < 1 or max_inflight < 1:
            raise ValueError("max_batch and max_inflight must be at least 1")
        self._conn = conn
        self._connections = _Connections(conn, keep=2 * max_inflight)
        self._on_batch = on_batch
        self._sent = {"reserve": [0, 0], "settle": [0, 0]}  # kind: [batches, operations]
        self._ops: _Lane[Operation, Outcome] = _Lane(
            "ledger",
            batches.apply_batch,
            batches.apply_one,
            self._connections,
            max_batch,
            max_inflight,
            self._count,
        )
        self._releases: set[asyncio.Task[Any]] = set()  # releases in flight, for drain

    async def reserve(self, request: HoldRequest) -> Reservation:
        """As `reservations.reserve`."""
        future = self._ops.submit(request)
        try:
            return cast(Reservation, await asyncio.shield(future))
        except asyncio.CancelledError:
            future.add_done_callback(self._release_abandoned)
            raise

    async def settle(self, request: SettleRequest) -> Settlement:
        """As `reservations.settle`; the settlement goes ahead if the caller is cancelled."""
        return cast(Settlement, await asyncio.shield(self._ops.submit(request)))

    async def release(
        self, organization_id: uuid.UUID, reservation_id: uuid.UUID, reason: str | None = None
    ) -> reservations.Release:
        """As `reservations.release` (not batched: it follows a failure); the release goes
        ahead if the caller is cancelled, and `drain` waits for it."""
        task = asyncio.get_running_loop().create_task(
            reservations.release(self._conn, organization_id, reservation_id, reason)
        )
        self._track(task)
        return await asyncio.shield(task)

    async def drain(self) -> None:
        """Wait for every queued and in-flight operation (at shutdown, before the pool goes)."""
        while True:
            pending = [*self._ops.inflight, *self._releases]
            queued = self._ops.queue
            if not pending and not queued:
                await self._connections.close()
                return
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            else:
                await asyncio.sleep(0)

    def stats(self) -> dict[str, tuple[int, int]]:
        """(batches, operations) sent so far, by kind ("reserve", "settle"); a batch of both
        counts once for each."""
        return {kind: (sent[0], sent[1]) for kind, sent in self._sent.items()}

    def _count(self, requests: Sequence[Operation]) -> None:
        holds = sum(isinstance(r, HoldRequest) for r in requests)
        for kind, size in (("reserve", holds), ("settle", len(requests) - holds)):
            if size:
                self._sent[kind][0] += 1
                self._sent[kind][1] += size
                if self._on_batch is not None:
                    self._on_batch(kind, size)

    def _release_abandoned(self, future: asyncio.Future[Outcome]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        hold = future.result()
        if not isinstance(hold, Reservation):
            return
        if hold.replayed or hold.status is not reservations.ReservationStatus.PENDING:
            return  # not this caller's to give back
        self._track(asyncio.get_running_loop().create_task(self._release(hold)))

    def _track(self, task: asyncio.Task[Any]) -> None:
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release(self, hold: Reservation) -> None:
        try:
            await reservations.release(
                self._conn, hold.organization_id, hold.id, ABANDONED_RELEASE_REASON
            )
        except LedgerError as exc:  # the hold expires at its ttl instead
            log.warning("could not release abandoned hold %s: %s", hold.id, exc)
