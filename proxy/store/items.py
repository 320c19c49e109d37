"""A conversation's items (contract §10) over `chat_messages`: pages, one message, appends, edits.

A conversation is a session, and its items are views of its stored messages (the mapping is
proxy/responses/items.py's); these statements read and change the messages behind them. Each
takes the caller's connection; `append` and `rewrite` expect the caller's transaction, with the
session row locked (`lock`), so that a concurrent turn's seqs and counts stay whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

from proxy import codec, searchtext
from proxy.store.messages import NewMessage, store_turn


@dataclass(frozen=True, slots=True)
class Row:
    """A stored message, as an item sees it: its row id (the item ids' stem), seq, body."""

    id: int
    seq: int
    role: str
    tokens: int
    message: dict[str, Any]
    status: str


_COLUMNS = "id, seq, role, tokens, body, status"


def _row(record: asyncpg.Record) -> Row:
    return Row(record["id"], record["seq"], record["role"], record["tokens"],
               codec.loads(record["body"]), record["status"])


async def lock(conn: asyncpg.Connection, user_id: str, session_id: str) -> int | None:
    """Lock the caller's active session for the transaction; its next seq, or None."""
    seq: int | None = await conn.fetchval(
        "SELECT next_seq FROM chat_sessions WHERE id = $1 AND user_id = $2 AND is_active "
        "FOR UPDATE",
        session_id,
        user_id,
    )
    return seq


async def page(
    conn: asyncpg.Connection, session_id: str, limit: int, descending: bool,
    after: int | None = None,
) -> list[Row] | None:
    """Up to `limit` messages in seq order, from the message with row id `after` on (itself
    included); None when `after` is not one of the session's."""
    order, op = ("DESC", "<=") if descending else ("ASC", ">=")
    if after is None:
        rows = await conn.fetch(
            f"SELECT {_COLUMNS} FROM chat_messages WHERE session_id = $1 "
            f"ORDER BY seq {order} LIMIT $2",
            session_id, limit,
        )
        return [_row(r) for r in rows]
    rows = await conn.fetch(
        f"""
        WITH edge AS (SELECT seq FROM chat_messages WHERE session_id = $1 AND id = $3)
        SELECT (SELECT seq FROM edge) AS edge, m.* FROM (SELECT 1) one
        LEFT JOIN LATERAL (
            SELECT {_COLUMNS} FROM chat_messages
            WHERE session_id = $1 AND seq {op} (SELECT seq FROM edge)
            ORDER BY seq {order} LIMIT $2
        ) m ON true
        """,
        session_id, limit, after,
    )
    if rows[0]["edge"] is None:
        return None
    return [_row(r) for r in rows if r["id"] is not None]


async def one(conn: asyncpg.Connection, session_id: str, row_id: int) -> Row | None:
    found = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM chat_messages WHERE session_id = $1 AND id = $2",
        session_id, row_id,
    )
    return _row(found) if found is not None else None


async def near(
    conn: asyncpg.Connection, session_id: str, seq: int, *, before: bool, count: int
) -> list[Row]:
    """The `count` messages just before (newest first) or just after `seq`."""
    op, order = ("<", "DESC") if before else (">", "ASC")
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM chat_messages WHERE session_id = $1 AND seq {op} $2 "
        f"ORDER BY seq {order} LIMIT $3",
        session_id, seq, count,
    )
    return [_row(r) for r in rows]


async def append(
    conn: asyncpg.Connection, session_id: str, base: int, messages: list[NewMessage]
) -> list[Row]:
    """Store `messages` as one turn of the locked session whose next seq is `base`; the rows."""
    await store_turn(conn, session_id, messages)
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM chat_messages WHERE session_id = $1 AND seq >= $2 "
        "ORDER BY seq",
        session_id, base,
    )
    return [_row(r) for r in rows]


async def rewrite(
    conn: asyncpg.Connection, session_id: str, deleted: list[int],
    changed: list[tuple[int, dict[str, Any], int]], token_change: int,
) -> None:
    """Delete the rows `deleted` and give the rows `changed` (row id, message, tokens) a new
    body, keeping the session's counts (`token_change`: what the changed bodies' tokens add),
    in one statement (the session row locked)."""
    await conn.execute(
        """
        WITH gone AS (
            DELETE FROM chat_messages WHERE session_id = $1 AND id = ANY($2::bigint[])
            RETURNING tokens
        ), edited AS (
            UPDATE chat_messages m
            SET body = c.body, tokens = c.tokens, has_tool_calls = c.tc,
                search = array_to_tsvector(string_to_array(c.words, ' '))
            FROM unnest($3::bigint[], $4::text[], $5::int[], $6::bool[], $7::text[])
                AS c(id, body, tokens, tc, words)
            WHERE m.session_id = $1 AND m.id = c.id
        )
        UPDATE chat_sessions
        SET message_count = message_count - (SELECT count(*) FROM gone),
            total_tokens = total_tokens - (SELECT COALESCE(sum(tokens), 0) FROM gone) + $8,
            updated_at = now()
        WHERE id = $1
        """,
        session_id,
        deleted,
        [row_id for row_id, _, _ in changed],
        [codec.dumps_text(message) for _, message, _ in changed],
        [tokens for _, _, tokens in changed],
        [bool(message.get("tool_calls")) for _, message, _ in changed],
        [searchtext.message_words(message) for _, message, _ in changed],
        token_change,
    )
