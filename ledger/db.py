"""Calling PostgreSQL: the connection type the store modules take, and error translation."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

import asyncpg

from ledger.errors import SQLSTATE_ERRORS, InvalidArgument, LedgerError, LedgerUnavailable


class Conn(Protocol):
    """What the store functions need: an asyncpg Connection, pool connection or Pool."""

    async def fetch(self, query: str, *args: Any, timeout: float | None = None) -> list[Any]: ...

    async def fetchrow(self, query: str, *args: Any, timeout: float | None = None) -> Any: ...

    async def fetchval(
        self, query: str, *args: Any, column: int = 0, timeout: float | None = None
    ) -> Any: ...

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str: ...


# What means "the database is not there": the network, the pool, a server shutting down.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.PostgresConnectionError,  # SQLSTATE class 08
    asyncpg.exceptions.InvalidCatalogNameError,  # the database is gone
)


@contextlib.contextmanager
def translated() -> Any:
    """Turn asyncpg's errors into the ledger's own."""
    try:
        yield
    except asyncpg.PostgresError as exc:
        kind = SQLSTATE_ERRORS.get(exc.sqlstate or "")
        if kind is not None:
            raise kind(exc.args[0] if exc.args else str(exc)) from None
        if isinstance(exc, asyncpg.exceptions.DataError):
            raise InvalidArgument(str(exc)) from None
        if isinstance(exc, _UNAVAILABLE):
            raise LedgerUnavailable(type(exc).__name__) from exc
        raise
    except _UNAVAILABLE as exc:
        raise LedgerUnavailable(type(exc).__name__) from exc


async def keep_session(conn: asyncpg.Connection) -> None:
    """A pool's `reset`: pool connections never change session state (every ledger step is
    one statement; advisory locks and SET live on dedicated connections), so asyncpg's
    default reset query, one more round trip per checkout, is skipped. An open transaction
    is still rolled back."""


async def fetchrow(conn: Conn, query: str, *args: Any) -> Any:
    with translated():
        return await conn.fetchrow(query, *args)


async def fetch(conn: Conn, query: str, *args: Any) -> Sequence[Any]:
    with translated():
        return await conn.fetch(query, *args)


@contextlib.asynccontextmanager
async def connect(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """One connection for a command-line verb."""
    with translated():
        conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


__all__ = ["Conn", "LedgerError", "connect", "fetch", "fetchrow", "keep_session", "translated"]
