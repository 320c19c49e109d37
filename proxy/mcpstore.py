"""SQL the MCP tools need beyond the sessions API's: one user's own cleanup.

`cleanup_sessions` (contract §9) is the retention job (`proxy.retention`) narrowed to the
caller: their sessions whose last activity, or whose soft deletion, is older than the cutoff
are deleted with their messages. The same rules keep it harmless to live requests: each batch
is one short statement that skips a session a turn is writing (`FOR UPDATE SKIP LOCKED`) and
repeats the cutoff test under the lock, so a session that just got a turn is kept.
"""

from __future__ import annotations

from datetime import datetime

import asyncpg

from proxy.retention import BATCH, BATCH_MESSAGES

_PURGE_OWN = """
    WITH candidates AS (
        SELECT id, message_count FROM chat_sessions
        WHERE user_id = $1 AND (updated_at < $2 OR deleted_at < $2)
        LIMIT $3
        FOR UPDATE SKIP LOCKED
    ), doomed AS (
        -- the first candidate, and as many more as keep the batch within $4 messages
        SELECT id FROM (
            SELECT id, row_number() OVER w AS n, sum(message_count) OVER w AS upto
            FROM candidates WINDOW w AS (ORDER BY id)
        ) c
        WHERE n = 1 OR upto <= $4
    )
    DELETE FROM chat_sessions s USING doomed
    WHERE s.id = doomed.id AND (s.updated_at < $2 OR s.deleted_at < $2)
    RETURNING s.message_count
"""


async def purge_own(
    conn: asyncpg.Connection, user_id: str, cutoff: datetime, batch: int = BATCH,
    batch_messages: int = BATCH_MESSAGES,
) -> tuple[int, int]:
    """Delete `user_id`'s sessions inactive, or soft-deleted, before `cutoff`:
    (sessions, messages). `conn` must not be in a transaction: each batch commits on its own."""
    sessions = removed = 0
    while True:
        rows = await conn.fetch(_PURGE_OWN, user_id, cutoff, batch, batch_messages)
        if not rows:
            return sessions, removed
        sessions += len(rows)
        removed += sum(row["message_count"] for row in rows)
