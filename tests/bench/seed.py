"""Seeding: sessions are created through the API, their messages with set-based SQL.

A seeded message is what the proxy itself would store for a short chat message: its JSON text
in `body` (compact, as `proxy.codec.dumps_text` writes it), its search words (`search`, so the
server's backfill finds nothing to do during a run), alternating user/assistant roles,
consecutive seqs from 1, and each session's counters (`next_seq`, `message_count`,
`total_tokens`) set to match.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import asyncpg
from procs import http_json, log

TOKENS_PER_SEEDED_MESSAGE = 24  # what the counter gives a ~20-token message in chat format

_INSERT = """
INSERT INTO chat_messages (session_id, seq, role, has_tool_calls, body, tokens, search)
SELECT s.id, g.n,
       CASE WHEN g.n % 2 = 1 THEN 'user' ELSE 'assistant' END,
       false,
       format('{"role":"%s","content":"message %s of a benchmark session: the quick brown fox '
              'jumps over the lazy dog."}',
              CASE WHEN g.n % 2 = 1 THEN 'user' ELSE 'assistant' END, g.n),
       $3,
       -- the words proxy.searchtext computes for that content, as the proxy would store them
       array_to_tsvector(string_to_array(format('message %s of a benchmark session the quick '
                                                'brown fox jumps over the lazy dog', g.n), ' '))
FROM unnest($1::text[]) AS s(id), generate_series(1, $2::int) AS g(n)
"""

_COUNTERS = """
UPDATE chat_sessions
SET next_seq = $2 + 1, message_count = $2, total_tokens = $2::bigint * $3,
    last_message_at = CASE WHEN $2 > 0 THEN now() END, updated_at = now()
WHERE id = ANY($1::text[])
"""


def create_sessions(proxy: str, key: str, count: int, name: str, max_history: int) -> list[str]:
    headers = {"Authorization": f"Bearer {key}"}
    ids = []
    for i in range(count):
        session = http_json(f"{proxy}/v1/chat/sessions",
                            {"session_name": f"{name}-{i}", "max_history_messages": max_history},
                            headers)
        ids.append(session["id"])
    return ids


async def seed(url: str, groups: Sequence[tuple[Sequence[str], int]]) -> None:
    """Give every session of each (sessions, size) group exactly `size` messages."""
    conn = await asyncpg.connect(url)
    try:
        for ids, size in groups:
            started = time.monotonic()
            async with conn.transaction():
                await conn.execute("DELETE FROM chat_messages WHERE session_id = ANY($1::text[])",
                                   list(ids))
                await conn.execute(_INSERT, list(ids), size, TOKENS_PER_SEEDED_MESSAGE)
                await conn.execute(_COUNTERS, list(ids), size, TOKENS_PER_SEEDED_MESSAGE)
            log(f"seeded {len(ids)} session(s) x {size} messages "
                f"in {time.monotonic() - started:.1f}s")
        await conn.execute("VACUUM ANALYZE chat_messages")
        await conn.execute("VACUUM ANALYZE chat_sessions")
    finally:
        await conn.close()


async def trim_back(url: str, groups: Sequence[tuple[Sequence[str], int]]) -> None:
    """Drop what turns added after seeding, so each session is back to its seeded size."""
    conn = await asyncpg.connect(url)
    try:
        for ids, size in groups:
            await conn.execute(
                "DELETE FROM chat_messages WHERE session_id = ANY($1::text[]) AND seq > $2",
                list(ids), size)
            await conn.execute(_COUNTERS, list(ids), size, TOKENS_PER_SEEDED_MESSAGE)
    finally:
        await conn.close()


async def backend_pids(url: str) -> list[int]:
    """The server processes of every other client connection to this database."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND backend_type = 'client backend' AND pid <> pg_backend_pid()")
    finally:
        await conn.close()
    return [r["pid"] for r in rows]
