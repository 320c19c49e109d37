"""Exports that no client can use to hold the database: each is read whole, then sent.

An export document (`GET .../export`, MCP's `export_session`) is read from one consistent
snapshot (proxy/store/lifecycle.py) into a spool, in memory up to `SPOOL_MEMORY` bytes and in a
temporary file beyond, and its connection goes back to the pool before the first byte is sent.
A client that reads slowly, or never, holds its spool and its place in the budget below; never a
pool connection.

The budget, per process (`ExportBudget`, on the Runtime):

- `export_connections`: at most this many exports read the database at once; the others wait
  their turn, holding nothing. Turns and every other request keep the rest of the pool.
- `exports_per_user`: at most this many exports of one user are read or sent at once; one more
  is 429 `rate_limit_exceeded` at once. The spool is gone when its response ends, so this bounds
  what one user's exports hold in memory and on disk.

A client that stops reading for `send_timeout` seconds is disconnected by the server itself
(proxy/server.py), which ends its export and frees its spool and its place.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from typing import IO

import asyncpg

from proxy.errors import TooManyRequests
from proxy.store import lifecycle

SPOOL_MEMORY = 1 << 20  # bytes of a document kept in memory; the rest goes to a temporary file
CHUNK = 1 << 16  # bytes sent at a time


class ExportBudget:
    """How many exports read the database at once, and how many each user has under way."""

    def __init__(self, connections: int, per_user: int) -> None:
        self._reading = asyncio.Semaphore(connections)
        self._per_user = per_user
        self._under_way: dict[str, int] = {}

    def admit(self, user_id: str) -> Admission:
        """A place for one more of `user_id`'s exports, or TooManyRequests."""
        if self._under_way.get(user_id, 0) >= self._per_user:
            raise TooManyRequests(
                f"Too many exports under way for this user (at most {self._per_user}); "
                "try again when one has finished")
        self._under_way[user_id] = self._under_way.get(user_id, 0) + 1
        return Admission(self, user_id)

    def _leave(self, user_id: str) -> None:
        left = self._under_way[user_id] - 1
        if left:
            self._under_way[user_id] = left
        else:
            del self._under_way[user_id]

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[None]:
        """One of the `export_connections` places for reading the database."""
        async with self._reading:
            yield


class Admission:
    """One export's place in its user's budget, given back once (`leave`)."""

    __slots__ = ("_budget", "_user_id")

    def __init__(self, budget: ExportBudget, user_id: str) -> None:
        self._budget: ExportBudget | None = budget
        self._user_id = user_id

    def leave(self) -> None:
        if self._budget is not None:
            budget, self._budget = self._budget, None
            budget._leave(self._user_id)

    def __del__(self) -> None:  # an admission dropped without `leave` must not leak its place
        self.leave()


Connect = Callable[[], AbstractAsyncContextManager[asyncpg.Connection]]


async def spool(budget: ExportBudget, connection: Connect, session_id: str, user_id: str
                ) -> IO[bytes]:
    """The export document of `user_id`'s session, read whole into a spool (rewound).

    `connection()` gives a pooled connection (the Runtime's, for bulk work); it is held only
    while reading, within one of the budget's reading places. SessionNotFound (and
    DatabaseUnavailable) come from here, before anything is sent.
    """
    body = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)
    try:
        async with budget.reading(), connection() as conn, aclosing(
            lifecycle.export_document(conn, session_id, user_id=user_id)
        ) as chunks:
            async for chunk in chunks:
                body.write(chunk)
        body.seek(0)
    except BaseException:
        body.close()
        raise
    return body


class Sending:
    """A spooled document's bytes, as a response body. However the response ends (closed
    before its first chunk included), the spool is closed and the admission given back."""

    def __init__(self, body: IO[bytes], admission: Admission) -> None:
        self._body = body
        self._admission = admission

    def __aiter__(self) -> Sending:
        return self

    async def __anext__(self) -> bytes:
        chunk = self._body.read(CHUNK)
        if not chunk:
            await self.aclose()
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        self._body.close()
        self._admission.leave()
