"""Stored messages: the turn's one read and one write, and the paginated messages list.

A message is stored whole as JSON text (`body`), the exact object that goes upstream as history,
next to the few columns the trimming rules need (`role`, `has_tool_calls`, `tokens`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

from proxy import codec
from proxy.store import iso

OPTIONAL_FIELDS = ("name", "refusal", "tool_calls", "tool_call_id")


@dataclass(frozen=True, slots=True)
class Stored:
    """One stored message as the history rules see it; `body` is its JSON text."""

    seq: int
    role: str
    has_tool_calls: bool
    tokens: int
    body: str


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message about to be stored as part of a turn."""

    message: dict[str, Any]
    tokens: int
    status: str = "complete"

    @property
    def role(self) -> str:
        return str(self.message.get("role"))

    @property
    def has_tool_calls(self) -> bool:
        return self.role == "assistant" and bool(self.message.get("tool_calls"))


@dataclass(frozen=True, slots=True)
class TurnContext:
    """What one read returns for a turn: the caller, and their session with its newest messages."""

    user_id: str
    session_found: bool
    system_prompt: str | None
    max_history_messages: int
    max_history_tokens: int | None
    history: list[Stored]


async def read_turn(
    conn: asyncpg.Connection, key_hash: bytes, session_id: str, limit: int | None
) -> TurnContext | None:
    """Key, session and its newest `limit` messages in one round trip; None for a bad key."""
    rows = await conn.fetch(
        """
        SELECT k.user_id, s.id AS sid, s.system_prompt, s.max_history_messages,
               s.max_history_tokens, m.seq, m.role, m.has_tool_calls, m.tokens, m.body
        FROM api_keys k
        LEFT JOIN chat_sessions s ON s.id = $2 AND s.user_id = k.user_id AND s.is_active
        LEFT JOIN LATERAL (
            SELECT seq, role, has_tool_calls, tokens, body FROM chat_messages
            WHERE session_id = s.id
            ORDER BY seq DESC
            LIMIT COALESCE($3::int, s.max_history_messages)
        ) m ON true
        WHERE k.key_hash = $1 AND k.revoked_at IS NULL
        """,
        key_hash,
        session_id,
        limit,
    )
    if not rows:
        return None
    first = rows[0]
    history = [
        Stored(r["seq"], r["role"], r["has_tool_calls"], r["tokens"], r["body"])
        for r in reversed(rows)
        if r["seq"] is not None
    ]
    return TurnContext(
        user_id=first["user_id"],
        session_found=first["sid"] is not None,
        system_prompt=codec.unpack_text(first["system_prompt"]),
        max_history_messages=first["max_history_messages"] or 0,
        max_history_tokens=first["max_history_tokens"],
        history=history,
    )


async def store_turn(
    conn: asyncpg.Connection, session_id: str, messages: list[NewMessage]
) -> int:
    """Append `messages` with consecutive seqs in one statement; returns how many were stored.

    The UPDATE takes the session row's lock, so concurrent turns on one session (from any
    process) queue there and each gets its own adjacent run of seqs.
    """
    if not messages:
        return 0
    stored: int = await conn.fetchval(
        """
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
        """,
        session_id,
        [m.role for m in messages],
        [m.has_tool_calls for m in messages],
        [m.tokens for m in messages],
        [codec.dumps_text(m.message) for m in messages],
        [m.status for m in messages],
    )
    return stored


def message_object(session_id: str, row: asyncpg.Record) -> dict[str, Any]:
    body = codec.loads(row["body"])
    result: dict[str, Any] = {
        "id": f"msg_{row['id']}",
        "object": "chat.message",
        "session_id": session_id,
        "seq": row["seq"],
        "role": row["role"],
        "content": body.get("content"),
    }
    for name in OPTIONAL_FIELDS:
        if body.get(name) is not None:
            result[name] = body[name]
    result["tokens"] = row["tokens"]
    result["status"] = row["status"]
    result["created_at"] = iso(row["created_at"])
    return result


async def list_messages(
    conn: asyncpg.Connection, session_id: str, limit: int, offset: int, descending: bool
) -> list[dict[str, Any]]:
    order = "DESC" if descending else "ASC"
    rows = await conn.fetch(
        f"""
        SELECT id, seq, role, tokens, body, status, created_at FROM chat_messages
        WHERE session_id = $1 ORDER BY seq {order} LIMIT $2 OFFSET $3
        """,
        session_id,
        limit,
        offset,
    )
    return [message_object(session_id, r) for r in rows]
