"""`chat_sessions`: a session's row as the sessions API answers with it, created, listed, changed.

Rows become the plain dicts the API answers with. Client text goes through
`pack_text`/`unpack_text` so that characters PostgreSQL cannot keep still come back exactly.
A session's messages are proxy/store/messages.py's; restore, clear, fork and merge are
proxy/store/lifecycle.py's.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from proxy.codec import pack_text, unpack_text
from proxy.ids import new_id
from proxy.timefmt import iso

SESSION_COLUMNS = (
    "id, session_name, model, system_prompt, max_history_messages, max_history_tokens, "
    "metadata, message_count, total_tokens, is_active, created_at, updated_at, last_message_at"
)


def pack_metadata(metadata: dict[str, str]) -> dict[str, str]:
    return {pack_text(k) or "": pack_text(v) or "" for k, v in metadata.items()}


def _session(row: asyncpg.Record) -> dict[str, Any]:
    metadata = row["metadata"]
    return {
        "id": row["id"],
        "object": "chat.session",
        "session_id": row["id"],
        "session_name": unpack_text(row["session_name"]),
        "model": unpack_text(row["model"]),
        "system_prompt": unpack_text(row["system_prompt"]),
        "max_history_messages": row["max_history_messages"],
        "max_history_tokens": row["max_history_tokens"],
        "metadata": {unpack_text(k): unpack_text(v) for k, v in metadata.items()},
        "message_count": row["message_count"],
        "total_tokens": row["total_tokens"],
        "is_active": row["is_active"],
        "created_at": iso(row["created_at"]),
        "updated_at": iso(row["updated_at"]),
        "last_message_at": iso(row["last_message_at"]),
    }


async def create_session(
    conn: asyncpg.Connection, user_id: str, fields: dict[str, Any]
) -> dict[str, Any]:
    row = await conn.fetchrow(
        f"""
        INSERT INTO chat_sessions (id, user_id, session_name, model, system_prompt,
                                   max_history_messages, max_history_tokens, metadata)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
        RETURNING {SESSION_COLUMNS}
        """,
        new_id("sess_"),
        user_id,
        pack_text(fields.get("session_name")),
        pack_text(fields.get("model")),
        pack_text(fields.get("system_prompt")),
        fields["max_history_messages"],
        fields.get("max_history_tokens"),
        pack_metadata(fields.get("metadata") or {}),
    )
    return _session(row)


async def get_session(
    conn: asyncpg.Connection, user_id: str, session_id: str, *, include_inactive: bool = False
) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        f"SELECT {SESSION_COLUMNS} FROM chat_sessions "
        "WHERE id = $1 AND user_id = $2 AND (is_active OR $3)",
        session_id,
        user_id,
        include_inactive,
    )
    return _session(row) if row else None


async def list_sessions(
    conn: asyncpg.Connection, user_id: str, limit: int, offset: int, include_inactive: bool
) -> tuple[list[dict[str, Any]], int]:
    total: int = await conn.fetchval(
        "SELECT count(*) FROM chat_sessions WHERE user_id = $1 AND (is_active OR $2)",
        user_id,
        include_inactive,
    )
    rows = await conn.fetch(
        f"""
        SELECT {SESSION_COLUMNS} FROM chat_sessions
        WHERE user_id = $1 AND (is_active OR $2)
        ORDER BY COALESCE(last_message_at, created_at) DESC, id DESC
        LIMIT $3 OFFSET $4
        """,
        user_id,
        include_inactive,
        limit,
        offset,
    )
    return [_session(r) for r in rows], total


_UPDATABLE = (
    "session_name",
    "model",
    "system_prompt",
    "max_history_messages",
    "max_history_tokens",
    "metadata",
)


async def update_session(
    conn: asyncpg.Connection, user_id: str, session_id: str, fields: dict[str, Any]
) -> dict[str, Any] | None:
    """Set the given fields (only names from `_UPDATABLE`); None when not the caller's."""
    values: list[Any] = [session_id, user_id]
    sets = ["updated_at = now()"]
    for name in _UPDATABLE:
        if name not in fields:
            continue
        value = fields[name]
        if name == "metadata":
            value = pack_metadata(value or {})
        elif name in ("session_name", "model", "system_prompt"):
            value = pack_text(value)
        values.append(value)
        sets.append(f"{name} = ${len(values)}")
    row = await conn.fetchrow(
        f"UPDATE chat_sessions SET {', '.join(sets)} "
        f"WHERE id = $1 AND user_id = $2 AND is_active RETURNING {SESSION_COLUMNS}",
        *values,
    )
    return _session(row) if row else None


async def soft_delete_session(conn: asyncpg.Connection, user_id: str, session_id: str) -> bool:
    row = await conn.fetchrow(
        "UPDATE chat_sessions SET is_active = false, deleted_at = now(), updated_at = now() "
        "WHERE id = $1 AND user_id = $2 AND is_active RETURNING id",
        session_id,
        user_id,
    )
    return row is not None
