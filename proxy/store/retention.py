"""The retention job's statements: expired sessions deleted in batches, old messages pruned.

The rules they apply, and why each is one statement, are proxy/retention.py's docstring.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import asyncpg

# An active session also needs `updated_at` older than `now() - $4` (the job's least idle
# time): proxy/retention.py's docstring says why.
_PURGE = """
    WITH candidates AS (
        SELECT id, message_count FROM chat_sessions
        WHERE (updated_at < $1 OR deleted_at < $1)
          AND (NOT is_active OR updated_at < now() - $4::interval){owner}
        LIMIT $2
        FOR UPDATE SKIP LOCKED
    ), doomed AS (
        -- the first candidate, and as many more as keep the batch within $3 messages
        SELECT id FROM (
            SELECT id, row_number() OVER w AS n, sum(message_count) OVER w AS upto
            FROM candidates WINDOW w AS (ORDER BY id)
        ) c
        WHERE n = 1 OR upto <= $3
    )
    DELETE FROM chat_sessions s USING doomed
    WHERE s.id = doomed.id AND (s.updated_at < $1 OR s.deleted_at < $1)
      AND (NOT s.is_active OR s.updated_at < now() - $4::interval)
    RETURNING s.is_active, s.message_count
"""
# Everyone's (the retention job), or one user's (MCP's `cleanup_sessions`): two statements, so
# each keeps a plan of its own.
_PURGE_ALL = _PURGE.format(owner="")
_PURGE_OWN = _PURGE.format(owner=" AND user_id = $5")


async def purge_batch(
    conn: asyncpg.Connection, cutoff: datetime, least_idle: timedelta, batch: int,
    batch_messages: int, user_id: str | None = None,
) -> list[tuple[bool, int]]:
    """One batch of expired sessions deleted (only `user_id`'s, when given): (was it active,
    its message count) for each. An active session idle for less than `least_idle` is kept,
    whatever `cutoff` says."""
    args = (cutoff, batch, batch_messages, least_idle)
    if user_id is None:
        rows = await conn.fetch(_PURGE_ALL, *args)
    else:
        rows = await conn.fetch(_PURGE_OWN, *args, user_id)
    return [(row["is_active"], row["message_count"]) for row in rows]


_PRUNE = """
    WITH s AS (
        SELECT id FROM chat_sessions WHERE id = $1 AND message_count > $2
        FOR UPDATE SKIP LOCKED
    ), edge AS (
        -- the oldest of the newest $2 messages
        SELECT seq FROM chat_messages
        WHERE session_id = $1 AND EXISTS (SELECT 1 FROM s)
        ORDER BY seq DESC OFFSET $2::int - 1 LIMIT 1
    ), cut AS (
        SELECT COALESCE(
            (SELECT min(m.seq) FROM chat_messages m, edge
             WHERE m.session_id = $1 AND m.seq >= edge.seq AND m.role <> 'tool'),
            (SELECT max(m.seq) FROM chat_messages m, edge
             WHERE m.session_id = $1 AND m.seq < edge.seq AND m.role <> 'tool')
        ) AS seq
    ), gone AS (
        DELETE FROM chat_messages m USING cut
        WHERE m.session_id = $1 AND m.seq < cut.seq
        RETURNING m.tokens
    )
    UPDATE chat_sessions
    SET message_count = message_count - (SELECT count(*) FROM gone),
        total_tokens = total_tokens - (SELECT COALESCE(sum(tokens), 0) FROM gone)
    WHERE id = $1 AND EXISTS (SELECT 1 FROM gone)
    RETURNING (SELECT count(*) FROM gone)
"""


async def prune(conn: asyncpg.Connection, session_id: str, keep: int) -> int:
    """One session pruned to its newest whole units within `keep` (> 0); messages removed."""
    pruned: int | None = await conn.fetchval(_PRUNE, session_id, keep)
    return pruned or 0


async def sessions_over(
    conn: asyncpg.Connection, keep: int, after: str, batch: int
) -> list[str]:
    """Up to `batch` ids of sessions holding more than `keep` messages, by id, after `after`."""
    rows = await conn.fetch(
        "SELECT id FROM chat_sessions WHERE message_count > $1 AND id > $2 ORDER BY id LIMIT $3",
        keep,
        after,
        batch,
    )
    return [row["id"] for row in rows]


async def purge_turn_ids(conn: asyncpg.Connection) -> None:
    """Forget the ids of turns stored over an hour ago: a write's retry, the only reader of
    `chat_turns` (sql/006_turn_ids.sql), comes seconds after its first attempt."""
    await conn.execute("DELETE FROM chat_turns WHERE stored_at < now() - interval '1 hour'")
