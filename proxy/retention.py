"""The retention job: expired sessions deleted with their messages, old messages pruned, stored
responses (the Responses API's) deleted once older than the same period.

A session expires when its last activity (`updated_at`, which every write to it sets) is older
than the cutoff, or when it was soft-deleted (`deleted_at`) before the cutoff. Each batch is one
statement, so one short transaction: it picks up to `batch` expired sessions with
`FOR UPDATE SKIP LOCKED` and deletes those that fit in `batch_messages` (always at least one);
their messages go by `ON DELETE CASCADE`, one set-based delete per session. A session whose
row a turn is writing (`store_turn`'s UPDATE holds its lock) is skipped, never waited for; and
the cutoff test is repeated under the lock (PostgreSQL re-evaluates it on the newest row
version), so a session that got a turn after the batch's snapshot was taken is kept too.

A session that is receiving a turn is never deleted, whatever the cutoff (`chatproxy cleanup
--older-than 1s` included): an active session is kept until it has been idle for LEAST_IDLE
(two hours) as well. A turn touches its session when it reads it only when the session has been
idle for an hour, since a touch is a logged update of the session row (a WAL flush) that every
turn would otherwise pay for; so a turn running now has a session active within the last
two hours, unless it has run for more than an hour. Such a turn, if its session is deleted
under it, is answered an error, never a success that stored nothing (proxy/turns/write.py).

Pruning (`max_stored_messages` > 0) keeps, per session, the newest whole units — a message that
is not a `tool` message plus the `tool` messages after it, as in `proxy.history` — that fit in
the limit: the cut is moved forward to the next non-tool message, so what is left never begins
with a tool message. Only when the newest unit alone is longer than the limit is it kept whole.

One process at a time runs the job (a session-level `pg_try_advisory_lock`, as its batches
commit one by one; the pooled connection it ran on is closed afterwards); the others skip
their run. `cleanup` is the job once, with the clock passed in; `run_hourly` is the loop the
server's lifespan starts; `chatproxy cleanup` calls `cleanup`.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from proxy import db, metrics
from proxy.config import Settings
from proxy.errors import DatabaseUnavailable
from proxy.store import database, idempotency, responses, sessions
from proxy.store import retention as statements
from proxy.timefmt import iso

log = logging.getLogger("chatproxy.retention")

RETENTION_LOCK = 0x72_65_74_6E  # "retn": the advisory lock key every job runner tries
BATCH = 100  # sessions per delete statement
BATCH_MESSAGES = 20_000  # messages per delete statement, unless one session alone has more
INTERVAL = 3600.0  # seconds between runs inside `serve`
FIRST_DELAY = 60.0  # seconds after startup before the first run
MAX_DURATION = timedelta(days=36500)
# A turn's read touches a session idle for TURN_TOUCH (proxy/store/messages.py); an active
# session idle for less than LEAST_IDLE is kept whatever the cutoff, so that no turn up to
# LONGEST_TURN long loses its session.
TURN_TOUCH = timedelta(hours=1)
LONGEST_TURN = timedelta(hours=1)
LEAST_IDLE = TURN_TOUCH + LONGEST_TURN


@dataclass(frozen=True)
class Report:
    """What one run removed; `ran` is False when another process held the job's lock."""

    ran: bool
    cutoff: datetime | None
    keep: int = 0
    inactive_sessions: int = 0
    deleted_sessions: int = 0
    messages: int = 0
    pruned_sessions: int = 0
    pruned_messages: int = 0
    idempotency_keys: int = 0
    responses: int = 0
    now: datetime | None = field(default=None, compare=False)  # the run's clock

    @property
    def removed_anything(self) -> bool:
        return bool(
            self.inactive_sessions or self.deleted_sessions or self.pruned_messages
            or self.idempotency_keys or self.responses
        )

    def _least_idle(self) -> str:
        if self.now is None or self.cutoff is None or self.cutoff <= self.now - LEAST_IDLE:
            return ""
        hours = LEAST_IDLE // timedelta(hours=1)
        return f" (active sessions: idle for {hours} hours at least, as one may be in a turn)"

    def lines(self) -> list[str]:
        if not self.ran:
            return ["another process is running the retention job; nothing removed"]
        if self.cutoff is None:
            lines = ["retention: off (sessions are kept however old)"]
        else:
            lines = [
                f"retention: sessions inactive or deleted before {iso(self.cutoff)}"
                + self._least_idle(),
                f"deleted {self.inactive_sessions} inactive and {self.deleted_sessions} "
                f"soft-deleted sessions, with {self.messages} messages",
                f"deleted {self.responses} stored responses created before then",
            ]
        if self.keep > 0:
            lines.append(
                f"pruned {self.pruned_messages} messages from {self.pruned_sessions} sessions "
                f"(keeping the newest {self.keep} per session)"
            )
        else:
            lines.append("pruning: off")
        lines.append(f"deleted {self.idempotency_keys} expired idempotency keys")
        return lines


_DURATION = re.compile(r"(\d{1,9})([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(text: str) -> timedelta:
    """`30s`, `15m`, `12h`, `7d`, `2w` as a timedelta; ValueError otherwise."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"expected a duration like 30s, 12h or 7d, got {text!r}")
    value = timedelta(**{_UNITS[match[2]]: int(match[1])})
    if not timedelta(0) < value <= MAX_DURATION:
        raise ValueError(f"expected a duration above zero and at most 36500d, got {text!r}")
    return value


def retention_of(settings: Settings, older_than: timedelta | None = None) -> timedelta | None:
    """The retention period for a run: `older_than` if given, else the setting (0 = off)."""
    if older_than is not None:
        return older_than
    return timedelta(days=settings.retention_days) if settings.retention_days > 0 else None


# --- retention --------------------------------------------------------------------------------

async def purge_expired(
    conn: asyncpg.Connection, cutoff: datetime, batch: int = BATCH,
    batch_messages: int = BATCH_MESSAGES, *, user_id: str | None = None,
) -> tuple[int, int, int]:
    """Delete expired sessions (only `user_id`'s, when given), at most `batch` sessions and
    (unless one session alone has more) `batch_messages` messages per statement: (inactive,
    soft-deleted, messages). `conn` must not be in a transaction: each batch commits alone."""
    inactive = deleted = removed = 0
    while True:
        rows = await statements.purge_batch(
            conn, cutoff, LEAST_IDLE, batch, batch_messages, user_id)
        if not rows:
            return inactive, deleted, removed
        for active, message_count in rows:
            if active:
                inactive += 1
            else:
                deleted += 1
            removed += message_count


# --- pruning ----------------------------------------------------------------------------------

async def prune_session(conn: asyncpg.Connection, session_id: str, keep: int) -> int:
    """Prune one session down to its newest whole units within `keep`; messages removed.

    One statement. A session whose row is locked (a turn being stored) is skipped: that turn
    prunes after itself, or the next run does.
    """
    if keep <= 0:
        return 0
    return await statements.prune(conn, session_id, keep)


async def prune_all(conn: asyncpg.Connection, keep: int, batch: int = BATCH) -> tuple[int, int]:
    """Prune every session holding more than `keep` messages: (sessions, messages)."""
    sessions = removed = 0
    after = ""
    while True:
        ids = await statements.sessions_over(conn, keep, after, batch)
        if not ids:
            return sessions, removed
        for session_id in ids:
            pruned = await prune_session(conn, session_id, keep)
            if pruned:
                sessions += 1
                removed += pruned
        after = ids[-1]


async def prune_after_turn(pool: db.Pool, settings: Settings, session_id: str) -> None:
    """Prune the session a turn was just stored in; a failure is left to the hourly job."""
    if settings.max_stored_messages <= 0:
        return
    try:
        async with db.connection(
            pool, settings.db_acquire_timeout, statement_timeout=settings.db_bulk_timeout
        ) as conn:
            pruned = await prune_session(conn, session_id, settings.max_stored_messages)
        metrics.retention_deleted(0, pruned)
    except (DatabaseUnavailable, asyncpg.PostgresError) as exc:
        log.warning("pruning after a turn failed (%s); the hourly job will retry",
                    type(exc).__name__)


async def pruned(
    pool: db.Pool, settings: Settings, user_id: str, session: dict[str, Any]
) -> dict[str, Any]:
    """`session` (just imported, forked or merged into) after pruning it to
    `max_stored_messages`, as it is then."""
    keep = settings.max_stored_messages
    if keep <= 0 or session["message_count"] <= keep:
        return session
    async with db.connection(
        pool, settings.db_acquire_timeout, statement_timeout=settings.db_bulk_timeout
    ) as conn:
        await prune_session(conn, session["id"], keep)
        fresh = await sessions.get_session(conn, user_id, session["id"])
    return fresh or session


# --- the job ----------------------------------------------------------------------------------


async def cleanup(
    conn: asyncpg.Connection,
    *,
    now: datetime,
    retention: timedelta | None,
    keep: int,
    batch: int = BATCH,
    batch_messages: int = BATCH_MESSAGES,
) -> Report:
    """One run of the job, if no other process is running it. `conn` must not be in a
    transaction: every batch commits on its own."""
    cutoff = now - retention if retention is not None else None
    if not await database.try_lock(conn, RETENTION_LOCK):
        return Report(ran=False, cutoff=cutoff, keep=keep)
    try:
        inactive = deleted = messages = stored = 0
        if cutoff is not None:
            inactive, deleted, messages = await purge_expired(
                conn, cutoff, batch, batch_messages
            )
            while removed := await responses.purge_batch(conn, cutoff, batch):
                stored += removed
        pruned_sessions, pruned = await prune_all(conn, keep, batch) if keep > 0 else (0, 0)
        keys = await idempotency.purge_expired(conn)
        await statements.purge_turn_ids(conn)
    finally:
        try:
            await database.unlock(conn, RETENTION_LOCK)
        except db.UNAVAILABLE:
            pass  # a closed connection has released its locks
    return Report(True, cutoff, keep, inactive, deleted, messages, pruned_sessions, pruned, keys,
                  stored, now)


async def run_once(pool: db.Pool, settings: Settings) -> Report:
    async with db.connection(
        pool, settings.db_acquire_timeout, statement_timeout=settings.db_bulk_timeout
    ) as conn:
        # `cleanup` takes a session-level lock: should its unlock ever be skipped, the lock must
        # not go on to the next borrower, so this connection is closed, never lent again.
        pool.discard_on_release(conn)
        report = await cleanup(
            conn,
            now=datetime.now(UTC),
            retention=retention_of(settings),
            keep=settings.max_stored_messages,
        )
    if report.ran:
        metrics.retention_deleted(
            report.inactive_sessions + report.deleted_sessions,
            report.messages + report.pruned_messages,
        )
    if report.removed_anything:
        log.info("retention job: %s", "; ".join(report.lines()))
    return report


async def run_hourly(
    pool: db.Pool,
    settings: Settings,
    *,
    interval: float = INTERVAL,
    first_delay: float = FIRST_DELAY,
) -> None:
    """The in-process job: a first run soon after startup, then one every `interval` seconds.

    Runs until cancelled (the lifespan cancels it at shutdown); a failed run is logged and
    the next one tries again.
    """
    await asyncio.sleep(first_delay)
    while True:
        try:
            await run_once(pool, settings)
        except DatabaseUnavailable:
            log.warning("retention job skipped: the database is unavailable")
        except Exception:
            log.exception("retention job failed")
        await asyncio.sleep(interval)
