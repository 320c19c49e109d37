"""Variant: the shipped server without the search index's work at write time.

A turn's one statement stores its messages as before sql/005_search.sql: no `search` words are
computed in Python and no tsvector is built or indexed (`store_turn` below is the shipped one
with those two things taken out). The search phase (`run.py --only search`) measures a turn on
both side by side. Messages this variant stores have no search words (the shipped server's
backfill would fill them in later); search itself is not measured on it. Its own backfill is
off, so the variant does nothing the shipped server does not.
"""

from __future__ import annotations

from typing import Any

import _base


async def store_turn(conn: Any, session_id: str, messages: list[Any], *,
                     unless_stored: bool = False) -> int:
    from proxy import codec
    from proxy.messages import _TURN_STORED

    if not messages:
        return 0
    args = (
        session_id,
        [m.role for m in messages],
        [m.has_tool_calls for m in messages],
        [m.tokens for m in messages],
        [codec.dumps_text(m.message) for m in messages],
        [m.status for m in messages],
    )
    if not unless_stored:
        count: int = await conn.fetchval(_STORE_TURN, *args)
        return count
    async with conn.transaction():
        await conn.execute("SELECT 1 FROM chat_sessions WHERE id = $1 FOR UPDATE", session_id)
        if await conn.fetchval(_TURN_STORED, session_id, args[4]):
            return 0
        count = await conn.fetchval(_STORE_TURN, *args)
        return count


_STORE_TURN = """
    WITH s AS (
        UPDATE chat_sessions
        SET next_seq = next_seq + cardinality($2::text[]),
            message_count = message_count + cardinality($2::text[]),
            total_tokens = total_tokens + (SELECT COALESCE(sum(t), 0) FROM unnest($4::int[]) t),
            last_message_at = now(),
            updated_at = now()
        WHERE id = $1
        RETURNING next_seq - cardinality($2::text[]) AS base
    ), ins AS (
        INSERT INTO chat_messages (session_id, seq, role, has_tool_calls, tokens, body, status)
        SELECT $1, s.base + m.ord - 1, m.role, m.tc, m.tokens, m.body, m.status
        FROM s, unnest($2::text[], $3::bool[], $4::int[], $5::text[], $6::text[])
                WITH ORDINALITY AS m(role, tc, tokens, body, status, ord)
        RETURNING 1
    )
    SELECT count(*) FROM ins
"""


async def _no_backfill(*args: Any, **kwargs: Any) -> None:
    return None


if __name__ == "__main__":
    from proxy import messages, searchstore

    messages.store_turn = store_turn
    searchstore.run_backfill = _no_backfill
    _base.serve()
