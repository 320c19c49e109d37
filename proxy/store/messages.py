"""`chat_messages`: the turn's one read and one write, and the paginated messages list.

A message is stored whole as JSON text (`body`), the exact object that goes upstream as history,
next to the few columns the trimming rules need (`role`, `has_tool_calls`, `tokens`).
"""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import msgspec

from proxy import codec, overlap, searchtext
from proxy.schemas import MESSAGE_ENVELOPE, MESSAGE_FIELDS
from proxy.store.summaries import Held
from proxy.timefmt import iso


@dataclass(frozen=True, slots=True)
class Stored:
    """One stored message as the history rules see it; `body` is its JSON text.

    `calls` (an assistant message's tool call ids) and `answers` (a tool message's
    `tool_call_id`) let the rules keep tool exchanges whole; they are read from `body` only for
    the messages that have them.
    """

    seq: int
    role: str
    has_tool_calls: bool
    tokens: int
    body: str
    calls: tuple[str | None, ...] = ()
    answers: str | None = None


class _ToolFields(msgspec.Struct):
    tool_calls: Any = None
    tool_call_id: Any = None


_tool_fields = msgspec.json.Decoder(_ToolFields).decode


def stored(seq: int, role: str, has_tool_calls: bool, tokens: int, body: str) -> Stored:
    """A `Stored` with its tool-exchange ids read from `body` where there can be any."""
    if not has_tool_calls and role != "tool":
        return Stored(seq, role, has_tool_calls, tokens, body)
    try:
        fields = _tool_fields(body)
        tool_calls, tool_call_id = fields.tool_calls, fields.tool_call_id
    except msgspec.DecodeError:  # lone surrogates somewhere in the body: the slow, exact path
        value = codec.loads(body)
        tool_calls, tool_call_id = value.get("tool_calls"), value.get("tool_call_id")
    calls: tuple[str | None, ...] = ()
    if has_tool_calls and isinstance(tool_calls, list):
        calls = tuple(
            c["id"] if isinstance(c, dict) and isinstance(c.get("id"), str) else None
            for c in tool_calls
        )
    answers = tool_call_id if role == "tool" and isinstance(tool_call_id, str) else None
    return Stored(seq, role, has_tool_calls, tokens, body, calls, answers)


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
    """What one read returns for a turn: the caller, and their session with its newest messages.

    `history` is the window (the newest `max_history_messages`, or the request's override);
    `older` the stored messages just before it that the read also fetched, because the request
    brought more messages than the window holds and may be resending them (proxy/overlap.py).
    `message_count` is the session's message count and `next_seq` its next seq, both as read.
    """

    user_id: str
    session_found: bool
    system_prompt: str | None
    max_history_messages: int
    max_history_tokens: int | None
    history: list[Stored]
    older: list[Stored] = field(default_factory=list)
    message_count: int = 0  # stored messages in all (those before `history` included)
    next_seq: int | None = None
    summary: Held | None = None  # the session's summary of its earlier messages, if any


async def read_turn(
    conn: asyncpg.Connection, key_hash: bytes, session_id: str, limit: int | None,
    resent: int = 0,
) -> TurnContext | None:
    """Key, session and its newest `limit` messages in one round trip; None for a bad key.

    At least `resent` messages are fetched (the request's messages after its head, which may
    repeat stored ones), in the same statement. A session idle for over an hour is touched
    (`updated_at`) by the same statement, so the retention job, which re-checks the cutoff
    under the row lock, cannot delete it while the turn waits for the upstream.
    """
    rows = await conn.fetch(_READ_BY_KEY, key_hash, session_id, limit, resent)
    return _context(rows, limit)


async def read_turn_as(
    conn: asyncpg.Connection, user_id: str, session_id: str, limit: int | None,
    resent: int = 0,
) -> TurnContext | None:
    """`read_turn` for a caller known by user id (not by a key); None for an unknown user."""
    return _context(await conn.fetch(_READ_BY_USER, user_id, session_id, limit, resent), limit)


def _context(rows: list[asyncpg.Record], limit: int | None) -> TurnContext | None:
    if not rows:
        return None
    first = rows[0]
    window = limit if limit is not None else first["max_history_messages"] or 0
    fetched = [
        stored(r["seq"], r["role"], r["has_tool_calls"], r["tokens"], r["body"])
        for r in reversed(rows)
        if r["role"] is not None
    ]
    edge = max(0, len(fetched) - window)
    # The summary's row is the one without a role (see `_read_turn`).
    summary = next((Held(codec.unpack_text(r["body"]), r["seq"], r["tokens"],
                         bool(r["has_tool_calls"]))
                    for r in rows if r["role"] is None and r["seq"] is not None), None)
    return TurnContext(
        user_id=first["user_id"],
        session_found=first["sid"] is not None,
        system_prompt=codec.unpack_text(first["system_prompt"]),
        max_history_messages=first["max_history_messages"] or 0,
        max_history_tokens=first["max_history_tokens"],
        history=fetched[edge:] if edge else fetched,
        older=fetched[:edge],
        message_count=first["message_count"] or 0,
        next_seq=first["next_seq"],
        summary=summary,
    )


def _read_turn(caller: str, callers: str) -> str:
    """The turn's read for a caller found by `callers` (the FROM item, aliased `c`, with the
    user id as `c.user_id`; `$1` names the caller) and `caller` (that user id, as a subquery).
    The session's summary (proxy/store/summaries.py) comes in the same statement."""
    return f"""
        WITH touched AS (
            UPDATE chat_sessions SET updated_at = now()
            WHERE id = $2 AND is_active AND updated_at < now() - interval '1 hour'
              AND user_id = ({caller})
            RETURNING id
        )
        SELECT c.user_id, s.id AS sid, s.system_prompt, s.max_history_messages,
               s.max_history_tokens, s.message_count, s.next_seq,
               m.seq, m.role, m.has_tool_calls, m.tokens, m.body
        FROM {callers}
        LEFT JOIN chat_sessions s ON s.id = $2 AND s.user_id = c.user_id AND s.is_active
        LEFT JOIN LATERAL (
            (SELECT seq, role, has_tool_calls, tokens, body FROM chat_messages
             WHERE session_id = s.id
             ORDER BY seq DESC
             LIMIT GREATEST(COALESCE($3::int, s.max_history_messages), $4::int))
            UNION ALL
            -- The summary, once and not once per message: a row without a role, whose seq is
            -- the last one it covers and whose has_tool_calls says its job is backing off.
            SELECT up_to_seq, NULL, retry_after > now(), tokens, text FROM chat_summaries
            WHERE session_id = s.id
        ) m ON true
    """


_READ_BY_KEY = _read_turn(
    "SELECT user_id FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
    "api_keys c",
) + "WHERE c.key_hash = $1 AND c.revoked_at IS NULL"
_READ_BY_USER = _read_turn(
    "SELECT $1::text", "(SELECT id AS user_id FROM users WHERE id = $1) c"
)


class StoredEarlier(Exception):
    """The turn's id is already stored: an earlier attempt of this write committed."""


def new_turn_id() -> uuid.UUID:
    """A turn's id: a millisecond clock, then random bits (time-ordered, as `chat_turns`'s
    index likes them; the random part keeps two ids of one millisecond apart)."""
    return uuid.UUID(int=(time.time_ns() // 1_000_000) << 80 | secrets.randbits(80))


async def store_turn(
    conn: asyncpg.Connection,
    session_id: str,
    messages: list[NewMessage],
    *,
    turn_id: uuid.UUID | None = None,
    after_seq: int | None = None,
) -> int:
    """Append `messages` with consecutive seqs in one statement; returns how many were stored.

    The UPDATE takes the session row's lock, so concurrent turns on one session (from any
    process) queue there and each gets its own adjacent run of seqs. Only an active session
    takes a turn: 0 means it was deleted (or merged away) since the turn read it, and nothing
    was stored.

    `turn_id` (sql/006_turn_ids.sql) is stored with the turn; a write retried with the same id
    after its first attempt committed raises StoredEarlier and stores nothing again (a first
    attempt still running is waited for, on the id's index entry).

    `after_seq` is for a turn whose request resent the session's newest messages (an overlap,
    proxy/overlap.py): the session's `next_seq` when the turn read them. Stored right after
    them as long as nothing came between (the statement checks `next_seq`); otherwise, under
    the session's lock, the first messages (all but the last, the reply) that a concurrent turn
    with the same request has stored since are not stored again. Rare, so four round trips.
    """
    if not messages:
        return 0
    turn_id = turn_id or new_turn_id()
    try:
        count: int = await conn.fetchval(
            _STORE_TURN, *turn_args(session_id, messages), after_seq, turn_id)
        if count or after_seq is None:
            return count
        async with conn.transaction():
            row = await conn.fetchrow(
                "SELECT next_seq, is_active FROM chat_sessions WHERE id = $1 FOR UPDATE",
                session_id)
            if row is None or not row["is_active"]:
                return 0
            if row["next_seq"] != after_seq:
                rows = await conn.fetch(_SINCE, session_id, after_seq, len(messages) - 1)
                since = [Stored(r["seq"], r["role"], r["has_tool_calls"], 0, r["body"])
                         for r in rows]
                skip = overlap.stored_since([m.message for m in messages[:-1]], since)
                messages = messages[skip:]
            count = await conn.fetchval(
                _STORE_TURN, *turn_args(session_id, messages), None, turn_id)
            return count
    except asyncpg.UniqueViolationError as exc:
        if exc.table_name != "chat_turns":
            raise
        raise StoredEarlier() from None


def turn_args(
    session_id: str | None, messages: list[NewMessage], *, searched: bool = True
) -> tuple[Any, ...]:
    """`$1`-`$7` of `turn_ctes`: the session, and the messages' columns as arrays (their
    search words only when they go into `chat_messages`: `searched`)."""
    return (
        session_id,
        [m.role for m in messages],
        [m.has_tool_calls for m in messages],
        [m.tokens for m in messages],
        [codec.dumps_text(m.message) for m in messages],
        [m.status for m in messages],
        [searchtext.message_words(m.message) for m in messages] if searched else [],
    )


def turn_ctes(guard: str = "") -> str:
    """The CTEs `s` and `ins` that append a turn's messages (`$1`-`$7`, `turn_args`) to a
    session, for a statement that does more in the same round trip; `guard` (`AND ...`) is a
    condition the append also needs. Only an active session takes a turn."""
    return f"""
    s AS (
        UPDATE chat_sessions
        SET next_seq = next_seq + cardinality($2::text[]),
            message_count = message_count + cardinality($2::text[]),
            total_tokens = total_tokens + (SELECT COALESCE(sum(t), 0) FROM unnest($4::int[]) t),
            last_message_at = now(),
            updated_at = now()
        WHERE id = $1 AND is_active{guard}
        RETURNING next_seq - cardinality($2::text[]) AS base
    ), ins AS (
        INSERT INTO chat_messages
            (session_id, seq, role, has_tool_calls, tokens, body, status, search)
        SELECT $1, s.base + m.ord - 1, m.role, m.tc, m.tokens, m.body, m.status,
               array_to_tsvector(string_to_array(m.words, ' '))
        FROM s, unnest($2::text[], $3::bool[], $4::int[], $5::text[], $6::text[], $7::text[])
                WITH ORDINALITY AS m(role, tc, tokens, body, status, words, ord)
        RETURNING 1
    )"""


# $8: the session's next_seq the turn expects (after an overlap), or null for any; $9 the
# turn's id (sql/006_turn_ids.sql), stored when the turn is.
_STORE_TURN = ("WITH " + turn_ctes(" AND ($8::bigint IS NULL OR next_seq = $8::bigint)")
               + ", turn AS (INSERT INTO chat_turns (turn_id) SELECT $9 FROM s)"
               + "\n    SELECT count(*) FROM ins\n")

# What was stored from a seq on, oldest first.
_SINCE = """
    SELECT seq, role, has_tool_calls, body FROM chat_messages
    WHERE session_id = $1 AND seq >= $2 ORDER BY seq LIMIT $3
"""


def message_object(
    session_id: str, row: asyncpg.Record, *, whole: bool = False
) -> dict[str, Any]:
    """A stored message as the API shows it (contract §5): `role`, `content` and the message's
    own fields that are set. `whole` (the export document) shows every other field its body
    holds too (`function_call`, `audio`, a `name` that is null...), so that an import of it
    stores the same message."""
    body = codec.loads(row["body"])
    result: dict[str, Any] = {
        "id": f"msg_{row['id']}",
        "object": "chat.message",
        "session_id": session_id,
        "seq": row["seq"],
        "role": row["role"],
        "content": body.get("content"),
    }
    if whole:
        for key, value in body.items():
            if key not in result and key not in MESSAGE_ENVELOPE:
                result[key] = value
    else:
        for name in MESSAGE_FIELDS:
            if body.get(name) is not None:
                result[name] = body[name]
    result["tokens"] = row["tokens"]
    result["status"] = row["status"]
    result["created_at"] = iso(row["created_at"])
    return result


async def list_messages(
    conn: asyncpg.Connection, session_id: str, limit: int, offset: int, descending: bool,
    *, after_seq: int | None = None, before_seq: int | None = None,
) -> list[dict[str, Any]]:
    """A page in `seq` order; `after_seq` / `before_seq` (a keyset: the primary key is walked
    from there, so a page costs the same however deep it is) keep only seqs beyond them."""
    order = "DESC" if descending else "ASC"
    keyset = [(op, v) for op, v in ((">", after_seq), ("<", before_seq)) if v is not None]
    bounds = "".join(f" AND seq {op} ${4 + i}::bigint" for i, (op, _) in enumerate(keyset))
    rows = await conn.fetch(
        f"""
        SELECT id, seq, role, tokens, body, status, created_at FROM chat_messages
        WHERE session_id = $1{bounds} ORDER BY seq {order} LIMIT $2 OFFSET $3
        """,
        session_id,
        limit,
        offset,
        *(v for _, v in keyset),
    )
    return [message_object(session_id, r) for r in rows]
