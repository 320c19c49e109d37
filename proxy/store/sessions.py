"""`chat_sessions`: a session's row as the sessions API answers with it, created, listed, changed.

Rows become the plain dicts the API answers with. Client text goes through
`pack_text`/`unpack_text` so that characters PostgreSQL cannot keep still come back exactly.
A session's messages are proxy/store/messages.py's; restore, clear, fork and merge are
proxy/store/lifecycle.py's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from proxy import searchtext
from proxy.codec import pack_text, unpack_text
from proxy.ids import new_id
from proxy.timefmt import iso

SESSION_COLUMNS = (
    "id, session_name, model, system_prompt, max_history_messages, max_history_tokens, "
    "metadata, message_count, total_tokens, is_active, created_at, updated_at, last_message_at, "
    # The summary's outline (contract §11), by its primary key; its text only on its own route.
    "(SELECT jsonb_build_object('up_to_seq', x.up_to_seq, 'tokens', x.tokens, 'updated_at', "
    """to_char(x.updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')) """
    "FROM chat_summaries x WHERE x.session_id = chat_sessions.id AND x.text IS NOT NULL) "
    "AS summary"
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
        "summary": row["summary"],
    }


async def create_session(
    conn: asyncpg.Connection, user_id: str, fields: dict[str, Any]
) -> dict[str, Any]:
    row = await conn.fetchrow(
        f"""
        INSERT INTO chat_sessions (id, user_id, session_name, model, system_prompt,
                                   max_history_messages, max_history_tokens, metadata, search)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, array_to_tsvector(string_to_array($9, ' ')))
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
        searchtext.words(fields.get("session_name")),
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
    conn: asyncpg.Connection, user_id: str, limit: int, offset: int, include_inactive: bool,
    *, where: SessionFilter | None = None,
) -> tuple[list[dict[str, Any]], int, list[tuple[datetime, str]]]:
    """A page of the caller's sessions, most recent activity first; how many match in all;
    and each row's keyset position (its activity and id), from which a cursor continues.

    `where` narrows the list (filters, a search) and starts it after a position. The unfiltered
    list and the `model=` one each walk an index in the list's order, so a keyset page costs
    the same however deep it is.
    """
    sql, args = (where or SessionFilter()).clauses(2)
    if where is not None and where.query is not None and conn.is_in_transaction():
        # planned for these words, never from a generic plan (see proxy/store/search.py)
        await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan")
    total: int = await conn.fetchval(
        f"SELECT count(*) FROM chat_sessions WHERE user_id = $1 AND (is_active OR $2){sql}",
        user_id,
        include_inactive,
        *args,
    )
    keyset, keyargs = (where or SessionFilter()).keyset(2 + len(args))
    used = 2 + len(args) + len(keyargs)
    rows = await conn.fetch(
        f"""
        SELECT {SESSION_COLUMNS}, COALESCE(last_message_at, created_at) AS activity
        FROM chat_sessions
        WHERE user_id = $1 AND (is_active OR $2){sql}{keyset}
        ORDER BY COALESCE(last_message_at, created_at) DESC, id DESC
        LIMIT ${used + 1} OFFSET ${used + 2}
        """,
        user_id,
        include_inactive,
        *args,
        *keyargs,
        limit,
        offset,
    )
    return [_session(r) for r in rows], total, [(r["activity"], r["id"]) for r in rows]


@dataclass
class SessionFilter:
    """What narrows the session list: `model=`, `metadata.KEY=VALUE` (all must match), `q`
    (a tsquery from proxy.searchtext: a matching name or message), a keyset position `after`
    (the activity and id of the last row of the page before). Values as clients sent them."""

    model: str | None = None
    metadata: list[tuple[str, str]] = field(default_factory=list)
    query: str | None = None
    after: tuple[datetime, str] | None = None

    def clauses(self, first: int) -> tuple[str, list[Any]]:
        """SQL conditions (` AND ...`) with placeholders after `$first`, and their values."""
        sql: list[str] = []
        args: list[Any] = []

        def arg(value: Any) -> str:
            args.append(value)
            return f"${first + len(args)}"

        if self.model is not None:
            sql.append(f" AND model = {arg(pack_text(self.model))}")
        for key, value in self.metadata:
            sql.append(f" AND metadata @> {arg(pack_metadata({key: value}))}::jsonb")
        if self.query is not None:
            # EXISTS lets the planner choose, for the words at hand, between probing each
            # session's messages in list order (a common word) and hashing the GIN index's
            # matches (a rare one).
            q = arg(self.query)
            sql.append(f" AND (search @@ {q}::tsquery OR EXISTS (SELECT 1 FROM chat_messages m"
                       f" WHERE m.session_id = chat_sessions.id AND m.search @@ {q}::tsquery))")
        return "".join(sql), args

    def keyset(self, first: int) -> tuple[str, list[Any]]:
        if self.after is None:
            return "", []
        return (f" AND (COALESCE(last_message_at, created_at), id) < "
                f"(${first + 1}::timestamptz, ${first + 2}::text)", list(self.after))


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
    if "session_name" in fields:  # the name's words, for search
        values.append(searchtext.words(fields["session_name"]))
        sets.append(f"search = array_to_tsvector(string_to_array(${len(values)}, ' '))")
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
