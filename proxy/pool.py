"""The connection pool: idle connections on a stack, lent out without a task or a timer.

asyncpg's own pool runs every acquire under `wait_for` (a task, a timer) and every release in
a shielded task. Each of those is an event-loop cycle more, and on a lightly loaded machine a
cold cycle: side by side, its acquire and release cost about 0.2 ms more than taking a
connection off a list (tests/bench). This pool lends the most recently released connection,
the warmest on both ends of its socket, at once; it only opens a connection or waits for one,
within the acquire timeout, when none is idle.

A connection comes back with `release`. One that died, was expired, comes back inside a
transaction, or was marked with `discard_on_release` (it took a session-level advisory lock,
which would otherwise go on to whoever borrows it next) is dropped, and its place is free for
the next acquire; one idle longer than `idle_lifetime` is closed when another is released.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import suppress

import asyncpg

CLOSE_SECONDS = 2.0  # a graceful close that takes longer is cut off

Connect = Callable[[], Awaitable[asyncpg.Connection]]


class Pool:
    def __init__(self, connect: Connect, max_size: int, idle_lifetime: float) -> None:
        self._connect = connect
        self._max = max_size
        self._idle_lifetime = idle_lifetime
        self._idle: list[tuple[asyncpg.Connection, float]] = []  # last released on top
        self._lent: set[asyncpg.Connection] = set()
        # Closed instead of lent again: lent out when the pool was expired, or marked.
        self._stale: set[asyncpg.Connection] = set()
        self._size = 0  # connections open or opening, idle or lent out
        # A waiter gets a connection, or None: a place came free, open one.
        self._waiters: deque[asyncio.Future[asyncpg.Connection | None]] = deque()
        self._closing = False
        self._returned = asyncio.Event()  # set when a connection comes back while closing
        self._tasks: set[asyncio.Task[None]] = set()  # graceful closes under way

    def get_size(self) -> int:
        return self._size

    def get_idle_size(self) -> int:
        return len(self._idle)

    def get_max_size(self) -> int:
        return self._max

    async def acquire(self, timeout: float | None = None) -> asyncpg.Connection:  # noqa: ASYNC109
        """A connection, within `timeout` seconds (TimeoutError) if one has to be waited for."""
        if self._closing:
            raise asyncpg.InterfaceError("the pool is closing")
        while self._idle:
            conn, _ = self._idle.pop()
            if not conn.is_closed():
                self._lent.add(conn)
                return conn
            self._size -= 1
        async with asyncio.timeout(timeout):
            return await self._open_or_wait()

    async def _open_or_wait(self) -> asyncpg.Connection:
        while True:
            if self._size < self._max:
                self._size += 1
                try:
                    conn = await self._connect()
                except BaseException:
                    self._size -= 1
                    self._hand_on(None)
                    raise
                self._lent.add(conn)
                return conn
            waiter: asyncio.Future[asyncpg.Connection | None] = (
                asyncio.get_running_loop().create_future()
            )
            self._waiters.append(waiter)
            try:
                handed = await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    # Handed over just as we gave up (a timeout, a cancel): pass it on.
                    if (late := waiter.result()) is not None:
                        self.release(late)
                    else:
                        self._hand_on(None)
                else:
                    waiter.cancel()
                    with suppress(ValueError):
                        self._waiters.remove(waiter)
                raise
            if handed is not None:
                return handed  # already counted as lent by `release`

    def release(self, conn: asyncpg.Connection, *, discard: bool = False) -> None:
        """Take `conn` back; `discard` closes it (e.g. a query on it was cancelled)."""
        if conn not in self._lent:
            return  # released twice, or not ours
        self._lent.discard(conn)
        if self._closing:
            self._returned.set()  # `close` is waiting for the lent ones
        if discard or conn in self._stale or conn.is_closed() or conn.is_in_transaction():
            self._stale.discard(conn)
            conn.terminate()
            self._size -= 1
            self._hand_on(None)
            return
        if self._closing:
            self._size -= 1
            self._close_later(conn)
            return
        if self._hand_on(conn):
            self._lent.add(conn)
            return
        now = asyncio.get_running_loop().time()
        self._idle.append((conn, now))
        oldest, since = self._idle[0]
        if now - since > self._idle_lifetime and self._size > 1:
            del self._idle[0]
            self._size -= 1
            self._close_later(oldest)

    def discard_on_release(self, conn: asyncpg.Connection) -> None:
        """Close `conn` when it comes back, whatever state it is in: for work that leaves
        session state behind, such as a session-level advisory lock (retention)."""
        if conn in self._lent:
            self._stale.add(conn)

    def _hand_on(self, conn: asyncpg.Connection | None) -> bool:
        """Give `conn` (or a free place) to the first waiter still waiting, if any."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return True
        return False

    def expire_connections(self) -> None:
        """Replace every connection: the idle ones now, the lent ones as they come back."""
        while self._idle:
            conn, _ = self._idle.pop()
            conn.terminate()
            self._size -= 1
            self._hand_on(None)
        self._stale |= self._lent

    def _close_later(self, conn: asyncpg.Connection) -> None:
        task = asyncio.ensure_future(self._close(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _close(conn: asyncpg.Connection) -> None:
        try:
            await conn.close(timeout=CLOSE_SECONDS)
        except Exception:  # a broken connection is closed all the same
            conn.terminate()

    async def close(self, wait: float = 10.0) -> None:
        """Close every connection; lent ones once they come back, or after `wait` seconds."""
        self._closing = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(asyncpg.InterfaceError("the pool is closing"))
        self._waiters.clear()
        idle, self._idle = self._idle, []
        self._size -= len(idle)
        for conn, _ in idle:
            self._close_later(conn)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while self._lent and (left := deadline - loop.time()) > 0:
            self._returned.clear()
            try:
                async with asyncio.timeout(left):
                    await self._returned.wait()
            except TimeoutError:
                break
        for conn in list(self._lent):
            self.release(conn, discard=True)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
