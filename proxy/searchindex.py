"""The search index's backfill job: fills `search` for rows stored before it existed.

Rows stored before sql/005_search.sql (or by an older process during a rolling upgrade) have no
`search` words until `backfill` reaches them, a short batch at a time (proxy/store/search.py),
so the tables are never locked for long and live writes go on. One process at a time runs it (a
session-level advisory lock, so its connection is never lent again); it only fills what is
missing, so a run cut short is finished by the next one.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from proxy import db
from proxy.errors import DatabaseUnavailable
from proxy.store import database
from proxy.store.search import BATCH, backfill_batch

log = logging.getLogger("chatproxy.search")

BACKFILL_LOCK = 0x73_72_63_68  # "srch": the advisory lock key every backfill runner tries
INTERVAL = 600.0  # seconds between backfill runs inside `serve`
FIRST_DELAY = 30.0  # seconds after startup before the first run (startup itself stays light)


async def backfill(conn: asyncpg.Connection, batch: int = BATCH) -> int | None:
    """Fill every NULL `search`, a batch per statement; the rows filled, or None when another
    process holds the backfill's lock (it is doing the work)."""
    if not await database.try_lock(conn, BACKFILL_LOCK):
        return None
    filled = 0
    try:
        while done := await backfill_batch(conn, batch):
            filled += done
            await asyncio.sleep(0)  # let requests on this process run between batches
    finally:
        await database.unlock(conn, BACKFILL_LOCK)
    return filled


async def run_backfill(
    pool: db.Pool, acquire_timeout: float, *, interval: float = INTERVAL,
    first_delay: float = FIRST_DELAY,
) -> None:
    """The in-process job: a run soon after startup, then one every `interval` seconds, until
    cancelled. Later runs catch rows written without `search` by an older process (a rolling
    upgrade). `chatproxy migrate` runs `backfill` to the end before it returns."""
    await asyncio.sleep(first_delay)
    while True:
        try:
            async with db.connection(pool, acquire_timeout) as conn:
                pool.discard_on_release(conn)  # it takes a session-level lock
                filled = await backfill(conn)
            if filled:
                log.info("search index: filled %d rows stored before it existed", filled)
        except DatabaseUnavailable:
            log.warning("search backfill skipped: the database is unavailable")
        except Exception:
            log.exception("search backfill failed")
        await asyncio.sleep(interval)
