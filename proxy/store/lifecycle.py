"""Session lifecycle SQL (contract §5): restore, clear, export, import, fork and merge.

Functions take a connection; each opens the transaction it needs, so callers pass a plain
pooled connection. Whatever the size of a session, a copy or a move of its messages is one
set-based statement (`INSERT … SELECT`, seq renumbered in SQL), never a loop over rows; export
reads through a server-side cursor inside one REPEATABLE READ transaction, so the document is
consistent and only one batch of rows is in memory at a time.

Ownership: every function scoped to a user treats another user's session like a missing one.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import asyncpg

from proxy import codec, document, ids, searchtext
from proxy.errors import BadRequest, SessionNotFound
from proxy.store import messages, sessions, summaries

EXPORT_BATCH = 1000  # rows fetched per cursor round trip
EXPORT_CHUNK = 1 << 16  # bytes gathered before a chunk is handed on
IMPORT_BATCH = 5000  # messages per INSERT while importing


async def restore_session(
    conn: asyncpg.Connection, user_id: str, session_id: str
) -> dict[str, Any] | None:
    """Make a soft-deleted session active again (an active one is left as it is)."""
    row = await conn.fetchrow(
        """
        UPDATE chat_sessions
        SET is_active = true, deleted_at = NULL,
            updated_at = CASE WHEN is_active THEN updated_at ELSE now() END
        WHERE id = $1 AND user_id = $2
        RETURNING id
        """,
        session_id,
        user_id,
    )
    if row is None:
        return None
    return await sessions.get_session(conn, user_id, session_id)


async def clear_messages(conn: asyncpg.Connection, user_id: str, session_id: str) -> bool:
    """Delete every message of an active session and zero its counters; False when not found.

    The session's row is locked first, so a turn being stored waits, and the DELETE (a new
    statement, a new snapshot) sees everything written before the lock was taken. `next_seq`
    keeps counting, so a seq never names two different messages.
    """
    async with conn.transaction():
        row = await conn.fetchrow(
            """
            UPDATE chat_sessions
            SET message_count = 0, total_tokens = 0, last_message_at = NULL, updated_at = now()
            WHERE id = $1 AND user_id = $2 AND is_active
            RETURNING id
            """,
            session_id,
            user_id,
        )
        if row is None:
            return False
        await conn.execute("DELETE FROM chat_messages WHERE session_id = $1", session_id)
        await summaries.drop(conn, session_id)
    return True


# --- export -----------------------------------------------------------------------------------


async def _owner(conn: asyncpg.Connection, session_id: str) -> str | None:
    owner: str | None = await conn.fetchval(
        "SELECT user_id FROM chat_sessions WHERE id = $1", session_id
    )
    return owner


async def export_document(
    conn: asyncpg.Connection, session_id: str, *, user_id: str | None
) -> AsyncGenerator[bytes, None]:
    """The export document in chunks of about EXPORT_CHUNK bytes.

    With `user_id`, only that user's active session; without (the operator's CLI), any
    session, soft-deleted ones included. SessionNotFound is raised before the first chunk.
    """
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        if user_id is None:
            owner = await _owner(conn, session_id)
            session = (
                await sessions.get_session(conn, owner, session_id, include_inactive=True)
                if owner is not None
                else None
            )
        else:
            session = await sessions.get_session(conn, user_id, session_id)
        if session is None:
            raise SessionNotFound(session_id)
        buffer = bytearray(document.head(session, await summaries.exported(conn, session_id)))
        first = True
        cursor = conn.cursor(
            "SELECT id, seq, role, body, tokens, status, created_at FROM chat_messages "
            "WHERE session_id = $1 ORDER BY seq",
            session_id,
            prefetch=EXPORT_BATCH,
        )
        async for row in cursor:
            if not first:
                buffer += b","
            first = False
            buffer += codec.dumps(messages.message_object(session_id, row, whole=True))
            if len(buffer) >= EXPORT_CHUNK:
                yield bytes(buffer)
                buffer.clear()
        buffer += document.TAIL
        yield bytes(buffer)


# --- import -----------------------------------------------------------------------------------


async def import_session(
    conn: asyncpg.Connection, user_id: str, doc: document.Document
) -> dict[str, Any]:
    """A new session of `user_id` holding the document's messages, seq 1..n, in one transaction."""
    async with conn.transaction():
        created = await sessions.create_session(conn, user_id, doc.fields)
        session_id = created["id"]
        for start in range(0, len(doc.messages), IMPORT_BATCH):
            chunk = doc.messages[start : start + IMPORT_BATCH]
            await conn.execute(
                """
                INSERT INTO chat_messages
                    (session_id, seq, role, has_tool_calls, tokens, body, status, created_at,
                     search)
                SELECT $1, $2 + m.ord, m.role, m.tc, m.tokens, m.body, m.status,
                       COALESCE(m.at, now()), array_to_tsvector(string_to_array(m.words, ' '))
                FROM unnest($3::text[], $4::bool[], $5::int[], $6::text[], $7::text[],
                            $8::timestamptz[], $9::text[])
                     WITH ORDINALITY AS m(role, tc, tokens, body, status, at, words, ord)
                """,
                session_id,
                start,
                [m.role for m in chunk],
                [m.has_tool_calls for m in chunk],
                [m.tokens for m in chunk],
                [codec.dumps_text(m.body) for m in chunk],
                [m.status for m in chunk],
                [m.created_at for m in chunk],
                [searchtext.message_words(m.body) for m in chunk],
            )
        await conn.execute(
            """
            UPDATE chat_sessions s
            SET message_count = a.n, total_tokens = a.t, next_seq = a.last + 1,
                last_message_at = a.at
            FROM (SELECT count(*) AS n, COALESCE(sum(tokens), 0) AS t,
                         COALESCE(max(seq), 0) AS last, max(created_at) AS at
                  FROM chat_messages WHERE session_id = $1) a
            WHERE s.id = $1
            """,
            session_id,
        )
        if doc.summary is not None:
            await summaries.put(conn, session_id, doc.summary)
        session = await sessions.get_session(conn, user_id, session_id)
    assert session is not None
    return session


# --- fork -------------------------------------------------------------------------------------


def _check_fork_point(up_to_seq: int, last: int | None, found: bool, next_role: str | None) -> None:
    if last is None:
        raise BadRequest("The session has no messages to fork at", param="up_to_seq")
    if not 1 <= up_to_seq <= last:
        raise BadRequest(f"up_to_seq must be between 1 and {last}", param="up_to_seq")
    if not found:
        raise BadRequest(
            f"up_to_seq {up_to_seq} is not the seq of a stored message", param="up_to_seq"
        )
    if next_role == "tool":
        raise BadRequest(
            f"up_to_seq {up_to_seq} is inside a tool exchange; fork before its assistant "
            "message or after its last tool message",
            param="up_to_seq",
        )


async def fork_session(
    conn: asyncpg.Connection,
    user_id: str,
    session_id: str,
    up_to_seq: int | None,
    session_name: tuple[bool, str | None] = (False, None),
) -> dict[str, Any]:
    """A new session with the same settings and a copy of the messages up to `up_to_seq`.

    `session_name` is (given, value): the copy keeps the source's name unless one is given.
    The messages keep their seqs, roles, bodies, tokens, statuses and times; the summary is
    kept when it covers only copied messages.
    """
    async with conn.transaction(isolation="repeatable_read"):
        row = await conn.fetchrow(
            """
            SELECT (SELECT max(seq) FROM chat_messages WHERE session_id = s.id) AS last,
                   EXISTS (SELECT 1 FROM chat_messages
                           WHERE session_id = s.id AND seq = $3::bigint) AS found,
                   (SELECT role FROM chat_messages WHERE session_id = s.id AND seq > $3::bigint
                    ORDER BY seq LIMIT 1) AS next_role
            FROM chat_sessions s
            WHERE s.id = $1 AND s.user_id = $2 AND s.is_active
            """,
            session_id,
            user_id,
            up_to_seq,
        )
        if row is None:
            raise SessionNotFound(session_id)
        if up_to_seq is not None:
            _check_fork_point(up_to_seq, row["last"], row["found"], row["next_role"])
        cut = up_to_seq if up_to_seq is not None else (row["last"] or 0)
        fork_id = ids.new_id("sess_")
        given, name = session_name
        await conn.execute(
            """
            INSERT INTO chat_sessions (id, user_id, session_name, model, system_prompt,
                                       max_history_messages, max_history_tokens, metadata,
                                       search)
            SELECT $1, user_id, CASE WHEN $3 THEN $4 ELSE session_name END, model,
                   system_prompt, max_history_messages, max_history_tokens, metadata,
                   CASE WHEN $3 THEN array_to_tsvector(string_to_array($5, ' '))
                        ELSE search END
            FROM chat_sessions WHERE id = $2
            """,
            fork_id,
            session_id,
            given,
            codec.pack_text(name),
            searchtext.words(name),
        )
        await conn.execute(
            """
            WITH copied AS (
                INSERT INTO chat_messages
                    (session_id, seq, role, has_tool_calls, tokens, body, status, created_at,
                     search)
                SELECT $1, seq, role, has_tool_calls, tokens, body, status, created_at, search
                FROM chat_messages WHERE session_id = $2 AND seq <= $3
                RETURNING seq, tokens, created_at
            )
            UPDATE chat_sessions
            SET message_count = (SELECT count(*) FROM copied),
                total_tokens = (SELECT COALESCE(sum(tokens), 0) FROM copied),
                next_seq = (SELECT COALESCE(max(seq), 0) + 1 FROM copied),
                last_message_at = (SELECT max(created_at) FROM copied)
            WHERE id = $1
            """,
            fork_id,
            session_id,
            cut,
        )
        await summaries.copy_for_fork(conn, session_id, fork_id, cut)
        session = await sessions.get_session(conn, user_id, fork_id)
    assert session is not None
    return session


# --- merge ------------------------------------------------------------------------------------


async def merge_sessions(
    conn: asyncpg.Connection, user_id: str, target_id: str, source_id: str
) -> dict[str, Any]:
    """Append a copy of the source's messages to the target, then soft-delete the source.

    One transaction. Both rows are locked in id order (so two opposite merges cannot
    deadlock) before the target's `next_seq` is read; the copy gets seqs that continue the
    target's, in the source's order. The source keeps its own messages (and summary), so
    restoring it brings it back whole. The target's summary still covers the same messages
    (their seqs do not move); the appended ones are summarised when they leave the window.
    """
    if target_id == source_id:
        raise BadRequest("A session cannot be merged into itself", param="source_session_id")
    async with conn.transaction():
        rows = await conn.fetch(
            """
            SELECT id, next_seq FROM chat_sessions
            WHERE id = ANY($1::text[]) AND user_id = $2 AND is_active
            ORDER BY id FOR UPDATE
            """,
            [target_id, source_id],
            user_id,
        )
        next_seq = {r["id"]: r["next_seq"] for r in rows}
        if target_id not in next_seq:
            raise SessionNotFound(target_id)
        if source_id not in next_seq:
            raise SessionNotFound(source_id, param="source_session_id")
        await conn.execute(
            """
            WITH copied AS (
                INSERT INTO chat_messages
                    (session_id, seq, role, has_tool_calls, tokens, body, status, created_at,
                     search)
                SELECT $1, $3 + row_number() OVER (ORDER BY seq) - 1, role, has_tool_calls,
                       tokens, body, status, created_at, search
                FROM chat_messages WHERE session_id = $2
                RETURNING tokens, created_at
            ), added AS (
                SELECT count(*) AS n, COALESCE(sum(tokens), 0) AS t, max(created_at) AS at
                FROM copied
            ), source AS (
                UPDATE chat_sessions
                SET is_active = false, deleted_at = now(), updated_at = now()
                WHERE id = $2
            )
            UPDATE chat_sessions s
            SET next_seq = s.next_seq + added.n, message_count = s.message_count + added.n,
                total_tokens = s.total_tokens + added.t,
                last_message_at = GREATEST(s.last_message_at, added.at), updated_at = now()
            FROM added
            WHERE s.id = $1
            """,
            target_id,
            source_id,
            next_seq[target_id],
        )
        session = await sessions.get_session(conn, user_id, target_id)
    assert session is not None
    return session
