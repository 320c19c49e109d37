"""Variant: the shipped server without the search index's work at write time.

A turn's one statement stores its messages as before sql/005_search.sql: no search words are
computed in Python (`message_words` answers "" at once) and no tsvector is built or indexed (the
statement is the one before that migration; it only names the words' parameter, and keeps the
overlap's `next_seq` check, so the shipped `store_turn` runs unchanged around it). The search
phase (`run.py --only search`) measures a turn on both side by side. Messages this variant
stores have no search words (the shipped server's backfill fills them in later); its own
backfill is off.
"""

from __future__ import annotations

from typing import Any

import _base

_STORE_TURN = """
    WITH s AS (
        UPDATE chat_sessions
        SET next_seq = next_seq + cardinality($2::text[]),
            message_count = message_count + cardinality($2::text[]),
            total_tokens = total_tokens + (SELECT COALESCE(sum(t), 0) FROM unnest($4::int[]) t),
            last_message_at = now(),
            updated_at = now()
        WHERE id = $1 AND is_active AND cardinality($7::text[]) >= 0
          AND ($8::bigint IS NULL OR next_seq = $8::bigint)
        RETURNING next_seq - cardinality($2::text[]) AS base
    ), turn AS (
        INSERT INTO chat_turns (turn_id) SELECT $9 FROM s
    ), ins AS (
        INSERT INTO chat_messages (session_id, seq, role, has_tool_calls, tokens, body, status)
        SELECT $1, s.base + m.ord - 1, m.role, m.tc, m.tokens, m.body, m.status
        FROM s, unnest($2::text[], $3::bool[], $4::int[], $5::text[], $6::text[])
                WITH ORDINALITY AS m(role, tc, tokens, body, status, ord)
        RETURNING 1
    )
    SELECT count(*) FROM ins
"""


def _no_words(message: Any) -> str:
    return ""


async def _no_backfill(*args: Any, **kwargs: Any) -> None:
    return None


if __name__ == "__main__":
    from proxy import searchindex, searchtext
    from proxy.store import messages

    messages._STORE_TURN = _STORE_TURN
    searchtext.message_words = _no_words
    searchindex.run_backfill = _no_backfill
    _base.serve()
