"""A pooled connection on which a session-level advisory lock was taken is never lent again
(issue 15): the retention job's, whether it ran to its end or failed midway, and the one the
server's startup migrated on. The locks themselves are gone from every pooled connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from proxy import app as app_module
from proxy import db as proxy_db
from proxy import retention
from proxy.config import Settings
from proxy.migrate import MIGRATION_LOCK
from proxy.pool import Pool
from tests.fault_helpers import app_client


@pytest.fixture
async def pool(database_url: str, settings: Settings) -> AsyncIterator[Pool]:
    made = await proxy_db.create_pool(database_url, settings)
    yield made
    await made.close(wait=0)


async def pooled_pids(pool: Pool) -> set[int]:
    """The server pids of the connections the pool would lend now (borrowed and given back)."""
    conns = [await pool.acquire(1) for _ in range(pool.get_idle_size())]
    for conn in conns:
        pool.release(conn)
    return {conn.get_server_pid() for conn in conns}


async def advisory_locks(db: asyncpg.Connection, pids: set[int]) -> list[tuple[int, int]]:
    rows = await db.fetch(
        "SELECT pid, objid::int8 FROM pg_locks WHERE locktype = 'advisory' AND pid = ANY($1)",
        list(pids))
    return [(r["pid"], r["objid"]) for r in rows]


async def gone(db: asyncpg.Connection, pid: int) -> None:
    """Wait until the backend `pid` has exited (a terminated connection's goes shortly after)."""
    for _ in range(500):
        if not await db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"backend {pid} is still there")


async def lock_is_free(db: asyncpg.Connection, key: int) -> bool:
    taken = bool(await db.fetchval("SELECT pg_try_advisory_lock($1)", key))
    if taken:
        await db.execute("SELECT pg_advisory_unlock($1)", key)
    return taken


async def test_the_retention_jobs_connection_is_closed_not_lent_again(
    pool: Pool, settings: Settings, db: asyncpg.Connection
) -> None:
    (warm,) = await pooled_pids(pool)  # the job gets this one: the pool lends the last released
    report = await retention.run_once(pool, settings)
    assert report.ran
    await gone(db, warm)
    assert warm not in await pooled_pids(pool)
    assert await lock_is_free(db, retention.RETENTION_LOCK)
    assert (await retention.run_once(pool, settings)).ran  # on a fresh connection
    assert await advisory_locks(db, await pooled_pids(pool)) == []


async def test_a_retention_job_that_fails_midway_leaves_no_lock_in_the_pool(
    pool: Pool, settings: Settings, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = asyncio.Event()

    async def stuck(conn: asyncpg.Connection, *args: Any) -> tuple[int, int, int]:
        started.set()
        await conn.execute("SELECT pg_sleep(30)")  # cancelled by the server, below
        return 0, 0, 0

    monkeypatch.setattr(retention, "purge_expired", stuck)
    (warm,) = await pooled_pids(pool)
    job = asyncio.ensure_future(retention.run_once(pool, settings))
    await asyncio.wait_for(started.wait(), 10)
    assert await advisory_locks(db, {warm}) == [(warm, retention.RETENTION_LOCK)]
    assert await db.fetchval("SELECT pg_cancel_backend($1)", warm)
    with pytest.raises(asyncpg.QueryCanceledError):
        await job
    await gone(db, warm)
    assert warm not in await pooled_pids(pool)
    assert await lock_is_free(db, retention.RETENTION_LOCK)


async def test_discard_on_release_closes_the_connection_and_frees_its_place(
    pool: Pool, db: asyncpg.Connection
) -> None:
    assert pool.get_max_size() == 5
    conns = [await pool.acquire(1) for _ in range(5)]
    marked = conns[0]
    pool.discard_on_release(marked)
    waiting = asyncio.ensure_future(pool.acquire(5))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    pool.release(marked)
    fresh = await waiting  # the marked one's place, on a new connection
    assert marked.is_closed()
    assert fresh is not marked
    assert pool.get_size() == 5
    for conn in (*conns[1:], fresh):
        pool.release(conn)
    pool.discard_on_release(fresh)  # not lent out now: nothing to mark
    assert await pool.acquire(1) is fresh


async def test_the_connection_the_server_migrated_on_is_not_lent_again(
    settings: Settings, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    migrated_on: list[int] = []
    real = app_module.migrate

    async def spy(conn: asyncpg.Connection, directory: Path | None = None) -> list[str]:
        migrated_on.append(conn.get_server_pid())
        return await real(conn, directory)

    monkeypatch.setattr(app_module, "migrate", spy)
    async with app_client(settings) as client:
        pool: Pool = client.app.state.rt.pool
        (pid,) = migrated_on
        await gone(db, pid)
        assert pid not in await pooled_pids(pool)
        assert (await client.get("/ready")).status_code == 200
        assert await advisory_locks(db, await pooled_pids(pool)) == []
        assert await lock_is_free(db, MIGRATION_LOCK)
