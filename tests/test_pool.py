"""proxy/pool.py and db.connection on a real PostgreSQL: lending, waiting, dropping, closing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from proxy import db as proxy_db
from proxy.errors import DatabaseUnavailable
from proxy.pool import Pool


async def backend_alive(watcher: asyncpg.Connection, pid: int) -> bool:
    return bool(await watcher.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid))


@pytest.fixture
async def make_pool(database_url: str) -> AsyncIterator[object]:
    pools: list[Pool] = []
    opened: list[int] = []

    def make(size: int, idle_lifetime: float = 300.0) -> Pool:
        async def connect() -> asyncpg.Connection:
            opened.append(1)
            return await asyncpg.connect(database_url)

        pool = Pool(connect, size, idle_lifetime)
        pools.append(pool)
        return pool

    make.opened = opened  # type: ignore[attr-defined]
    yield make
    for pool in pools:
        await pool.close(wait=0)


async def test_lends_the_last_released_connection_first(make_pool) -> None:
    pool = make_pool(3)
    a, b = await pool.acquire(), await pool.acquire()
    assert a is not b
    assert (pool.get_size(), pool.get_idle_size(), pool.get_max_size()) == (2, 0, 3)
    pool.release(a)
    pool.release(b)
    assert (pool.get_size(), pool.get_idle_size()) == (2, 2)
    assert await pool.acquire() is b
    assert await pool.acquire() is a
    assert len(make_pool.opened) == 2  # nothing opened again


async def test_a_full_pool_waits_within_the_timeout_then_hands_over(make_pool) -> None:
    pool = make_pool(1)
    held = await pool.acquire()
    with pytest.raises(TimeoutError):
        await pool.acquire(0.05)
    waiting = asyncio.ensure_future(pool.acquire(5))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    pool.release(held)
    assert await waiting is held
    assert (pool.get_size(), pool.get_idle_size()) == (1, 0)
    pool.release(held)
    pool.release(held)  # a second release is ignored
    assert (pool.get_size(), pool.get_idle_size()) == (1, 1)


async def test_a_connection_handed_to_a_waiter_that_gave_up_is_not_lost(make_pool) -> None:
    pool = make_pool(1)
    held = await pool.acquire()
    waiting = asyncio.ensure_future(pool.acquire(5))
    await asyncio.sleep(0.01)
    pool.release(held)  # handed to the waiter ...
    waiting.cancel()  # ... which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert (pool.get_size(), pool.get_idle_size()) == (1, 1)
    assert await pool.acquire(0.5) is held


async def test_dead_and_discarded_connections_are_replaced(make_pool, db) -> None:
    pool = make_pool(1)
    conn = await pool.acquire()
    pid = conn.get_server_pid()
    pool.release(conn)
    await db.execute("SELECT pg_terminate_backend($1)", pid)
    for _ in range(100):  # until the client side has seen the socket close
        if conn.is_closed():
            break
        await asyncio.sleep(0.01)
    fresh = await pool.acquire(2)
    assert fresh is not conn
    assert await fresh.fetchval("SELECT 1") == 1
    waiting = asyncio.ensure_future(pool.acquire(5))
    await asyncio.sleep(0.01)
    pool.release(fresh, discard=True)  # its place goes to the waiter, which opens a new one
    third = await waiting
    assert third is not fresh and fresh.is_closed()
    assert pool.get_size() == 1
    pool.release(third)


async def test_a_connection_back_inside_a_transaction_is_dropped(make_pool) -> None:
    pool = make_pool(2)
    conn = await pool.acquire()
    await conn.execute("BEGIN")
    pool.release(conn)
    assert conn.is_closed()
    assert (pool.get_size(), pool.get_idle_size()) == (0, 0)


async def test_expire_replaces_idle_now_and_lent_on_return(make_pool) -> None:
    pool = make_pool(3)
    idle, lent = await pool.acquire(), await pool.acquire()
    pool.release(idle)
    pool.expire_connections()
    assert idle.is_closed() and not lent.is_closed()
    assert (pool.get_size(), pool.get_idle_size()) == (1, 0)
    pool.release(lent)
    assert lent.is_closed()
    assert pool.get_size() == 0
    fresh = await pool.acquire()
    assert fresh not in (idle, lent) and await fresh.fetchval("SELECT 1") == 1
    pool.release(fresh)


async def test_idle_connections_past_their_lifetime_are_closed(make_pool) -> None:
    pool = make_pool(3, idle_lifetime=0.0)
    a, b = await pool.acquire(), await pool.acquire()
    pool.release(a)
    await asyncio.sleep(0.01)
    pool.release(b)  # a has been idle longer than the lifetime: closed gracefully
    assert (pool.get_size(), pool.get_idle_size()) == (1, 1)
    for _ in range(100):
        if a.is_closed():
            break
        await asyncio.sleep(0.01)
    assert a.is_closed() and not b.is_closed()
    c = await pool.acquire()
    pool.release(c)  # the last one is kept, however old
    assert (pool.get_size(), pool.get_idle_size()) == (1, 1)


async def test_close_waits_for_lent_connections_and_refuses_new_ones(make_pool) -> None:
    pool = make_pool(2)
    idle, lent = await pool.acquire(), await pool.acquire()
    pool.release(idle)
    closing = asyncio.ensure_future(pool.close(wait=5))
    await asyncio.sleep(0.05)
    assert not closing.done()  # `lent` is still out
    with pytest.raises(asyncpg.InterfaceError):
        await pool.acquire()
    assert await lent.fetchval("SELECT 1") == 1  # still usable until it comes back
    pool.release(lent)
    await asyncio.wait_for(closing, 5)
    assert idle.is_closed() and lent.is_closed()
    assert pool.get_size() == 0


async def test_connection_gives_a_cancelled_query_s_connection_up(make_pool) -> None:
    pool = make_pool(1)

    async def slow() -> None:
        async with db_connection(pool) as conn:
            await conn.execute("SELECT pg_sleep(30)")

    task = asyncio.ensure_future(slow())
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pool.get_size() == 0  # not lent again while the server may still run its query
    async with db_connection(pool) as conn:
        assert await conn.fetchval("SELECT 1") == 1
    assert (pool.get_size(), pool.get_idle_size()) == (1, 1)


async def test_connection_keeps_its_connection_after_a_server_error(make_pool) -> None:
    pool = make_pool(1)
    with pytest.raises(asyncpg.UndefinedTableError):
        async with db_connection(pool) as conn:
            first = conn
            await conn.execute("SELECT * FROM no_such_table")
    async with db_connection(pool) as conn:
        assert conn is first
    assert len(make_pool.opened) == 1


async def test_connection_answers_503_when_the_database_is_unreachable() -> None:
    async def refuse() -> asyncpg.Connection:
        raise ConnectionRefusedError("no database here")

    pool = Pool(refuse, 2, 300.0)
    with pytest.raises(DatabaseUnavailable):
        async with db_connection(pool):
            pass
    assert pool.get_size() == 0  # the failed attempt took no place


def db_connection(pool: Pool):  # type: ignore[no-untyped-def]
    return proxy_db.connection(pool, 2.0)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_many_tasks_with_timeouts_and_cancels_leave_the_pool_whole(make_pool, seed) -> None:
    """Invariants under churn: never more than `max_size` open, nothing lent or waiting at the
    end, every idle connection usable."""
    import random

    pool = make_pool(3)
    rng = random.Random(seed)
    peak = 0

    async def user() -> None:
        nonlocal peak
        for _ in range(15):
            try:
                async with asyncio.timeout(rng.choice((0.001, 0.01, 0.05, 1.0))):
                    async with db_connection(pool) as conn:
                        peak = max(peak, pool.get_size())
                        await conn.fetchval("SELECT pg_sleep($1)", rng.choice((0, 0.002)))
            except (TimeoutError, DatabaseUnavailable):
                pass

    await asyncio.gather(*(user() for _ in range(30)))
    assert peak <= 3
    assert not [w for w in pool._waiters if not w.done()]
    assert pool.get_size() == pool.get_idle_size() <= 3
    conns = [await pool.acquire(1) for _ in range(pool.get_size())]
    assert [await c.fetchval("SELECT 1") for c in conns] == [1] * len(conns)
    for conn in conns:
        pool.release(conn)
