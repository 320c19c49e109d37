"""The search index's SQL: searching a user's messages, and filling `search` where it is NULL.

The in-process job that runs the fill is proxy/searchindex.py.

`chat_messages.search` / `chat_sessions.search` (sql/005_search.sql) hold the words
`proxy.searchtext` computes; turns, imports, forks, merges and session writes fill them as they
store. Rows stored before that migration (or by an older process during a rolling upgrade) are
NULL until `backfill` reaches them: batches of `BATCH` rows, each one short statement found
through a partial index, so the table is never locked for long and live writes go on. One
process at a time runs it (a session-level `pg_try_advisory_lock`); it is idempotent (it only
fills NULLs), so a run cut short is finished by the next one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg

from proxy import codec, searchtext
from proxy.codec import unpack_text
from proxy.timefmt import iso

BATCH = 1000  # rows per backfill statement

# Newest first is the order messages were stored in: by id (a fork's or an import's copies
# count as stored when copied), or by seq within one session. Both orders have an index
# (chat_messages_id_idx, the primary key), so for a common word the planner walks it newest
# first and stops at the page's end, and for a rare one it takes the GIN index's few matches
# and sorts them. Which is cheaper depends on the word, so each search is planned for its own
# words (`force_custom_plan`), never from a cached generic plan.
_SEARCH = """
    SELECT m.id, m.session_id, m.seq, m.role, m.body, m.created_at, s.session_name
    FROM chat_messages m JOIN chat_sessions s ON s.id = m.session_id
    WHERE m.search @@ $2::tsquery AND s.user_id = $1 AND s.is_active{keyset}
    ORDER BY m.id DESC
    LIMIT $3 OFFSET $4
"""
_SEARCH_SESSION = """
    SELECT m.id, m.session_id, m.seq, m.role, m.body, m.created_at, s.session_name
    FROM chat_messages m JOIN chat_sessions s ON s.id = m.session_id
    WHERE m.search @@ $2::tsquery AND s.user_id = $1 AND s.is_active
      AND m.session_id = $5{keyset}
    ORDER BY m.seq DESC
    LIMIT $3 OFFSET $4
"""


async def search_messages(
    conn: asyncpg.Connection,
    user_id: str,
    words: list[str],
    limit: int,
    offset: int,
    *,
    session_id: str | None = None,
    after: tuple[int, int] | None = None,
) -> tuple[list[dict[str, Any]], list[tuple[int, int]]]:
    """The caller's messages (in active sessions) holding every word as a prefix, newest first,
    each with a snippet; and each row's keyset position (id, seq). `after` is the position of
    the last row of the page before."""
    args: list[Any] = [user_id, searchtext.tsquery(words), limit, offset]
    if session_id is None:
        sql, column = _SEARCH, "m.id"
    else:
        sql, column = _SEARCH_SESSION, "m.seq"
        args.append(session_id)
    keyset = ""
    if after is not None:
        args.append(after[0] if session_id is None else after[1])
        keyset = f" AND {column} < ${len(args)}::bigint"
    async with conn.transaction(readonly=True):
        await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan")
        rows = await conn.fetch(sql.format(keyset=keyset), *args)
    found = [
        {
            "session_id": r["session_id"],
            "session_name": unpack_text(r["session_name"]),
            "message_id": f"msg_{r['id']}",
            "seq": r["seq"],
            "role": r["role"],
            "snippet": searchtext.snippet(_text(r["body"]), words),
            "created_at": iso(r["created_at"]),
        }
        for r in rows
    ]
    return found, [(r["id"], r["seq"]) for r in rows]


def _text(body: str) -> str:
    try:
        value = codec.loads(body)
    except codec.InvalidJSON:  # never written by chatproxy; nothing to index or show
        return ""
    return searchtext.message_text(value) if isinstance(value, dict) else ""


# --- the backfill -----------------------------------------------------------------------------


# What the backfill fills: table, its key's type, the column holding the text, and its words.
_FILLED: tuple[tuple[str, str, str, Callable[[Any], str]], ...] = (
    ("chat_messages", "bigint", "body", lambda body: searchtext.words(_text(body))),
    ("chat_sessions", "text", "session_name", lambda name: searchtext.words(unpack_text(name))),
)


async def backfill_batch(conn: asyncpg.Connection, batch: int = BATCH) -> int:
    """Fill `search` for up to `batch` messages and `batch` sessions that lack it; how many."""
    filled = 0
    for table, key, column, words in _FILLED:
        rows = await conn.fetch(
            f"SELECT id, {column} AS text FROM {table} WHERE search IS NULL ORDER BY id "
            "LIMIT $1",
            batch,
        )
        if rows:
            await conn.execute(
                f"""
                UPDATE {table} t SET search = array_to_tsvector(string_to_array(u.words, ' '))
                FROM unnest($1::{key}[], $2::text[]) AS u(id, words)
                WHERE t.id = u.id AND t.search IS NULL
                """,
                [r["id"] for r in rows],
                [words(r["text"]) for r in rows],
            )
        filled += len(rows)
    return filled
