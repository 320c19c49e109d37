"""`responses` and `response_messages`: the Responses API's stored responses and their chains.

A response keeps the messages of its turn (the input it keeps as history, then its reply) as
chat messages are kept: JSON text, token count, status. `read_chain` is a chained turn's one
read: the caller's key, the response named by `previous_response_id`, and the newest messages of
its chain (that response, its previous one, and so on), in one round trip.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from proxy import codec
from proxy.errors import SessionGone
from proxy.store.messages import NewMessage, TurnContext, stored, turn_args, turn_ctes


@dataclass(frozen=True, slots=True)
class NewResponse:
    """A response about to be stored with its turn's messages."""

    id: str
    user_id: str
    previous_response_id: str | None
    session_id: str | None
    status: str
    finish_reason: str | None
    usage: Any
    prompt_tokens: int
    settings: dict[str, Any]
    created_at: int  # unix seconds, as the response said


@dataclass(frozen=True, slots=True)
class StoredMessage:
    role: str
    tokens: int
    message: dict[str, Any]
    status: str


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A stored response; `messages` are its input messages, then its reply (the last)."""

    id: str
    previous_response_id: str | None
    session_id: str | None
    status: str
    finish_reason: str | None
    usage: Any
    prompt_tokens: int
    settings: dict[str, Any]
    created_at: datetime
    messages: list[StoredMessage]


# The response row ($8-$16) and its copy of the turn's messages (the arrays of `turn_args`,
# $2-$6, its session $1), inserted unless a response with its id is there already (a write
# retried after its outcome was unknown): the CTEs `r` and `rm`. `source` is what the row is
# inserted from (one row: it is; none: it is not).
def _response_ctes(source: str) -> str:
    return f"""
    r AS (
        INSERT INTO responses (id, user_id, previous_response_id, session_id, status,
                               finish_reason, usage, prompt_tokens, settings, message_count,
                               created_at)
        SELECT $8, $9, $10, (SELECT id FROM chat_sessions WHERE id = $1), $11, $12, $13, $14,
               $15, cardinality($2::text[]), to_timestamp($16)
        FROM {source}
        ON CONFLICT (id) DO NOTHING
        RETURNING id
    ), rm AS (
        INSERT INTO response_messages (response_id, ord, role, has_tool_calls, tokens, body,
                                       status)
        SELECT r.id, m.ord - 1, m.role, m.tc, m.tokens, m.body, m.status
        FROM r, unnest($2::text[], $3::bool[], $4::int[], $5::text[], $6::text[])
                WITH ORDINALITY AS m(role, tc, tokens, body, status, ord)
    )"""


# The response alone ($7, the messages' search words, is left empty).
_INSERT = ("WITH " + _response_ctes("(VALUES (1)) AS one(x)")
           + ", words AS (SELECT $7::text[]) SELECT count(*) FROM r")
# The response and its conversation's turn, in one statement, or neither: the session's UPDATE
# (`s`, which takes only an active session, under its row lock) comes first, and only a response
# not stored yet appends the turn. `earlier` (read in the statement's snapshot) tells a retry
# whose first attempt committed from a conversation that went away.
_INSERT_WITH_TURN = (
    "WITH " + turn_ctes(" AND NOT EXISTS (SELECT 1 FROM responses WHERE id = $8)") + ","
    + _response_ctes("s")
    + " SELECT (SELECT count(*) FROM r) AS stored,"
    + " EXISTS (SELECT 1 FROM responses WHERE id = $8) AS earlier")


async def insert_response(
    conn: asyncpg.Connection, response: NewResponse, messages: list[NewMessage],
    *, with_turn: bool = False,
) -> bool:
    """Store `response` and its messages in one statement; `with_turn`, the turn in its
    conversation's session too. False when a response with its id is there already (a retried
    write that had stored it): nothing is stored again. SessionGone (with_turn) when the
    conversation was deleted or merged away since the turn read it: nothing is stored."""
    args = (
        *turn_args(response.session_id, messages, searched=with_turn),
        response.id,
        response.user_id,
        response.previous_response_id,
        response.status,
        response.finish_reason,
        None if response.usage is None else codec.dumps_text(response.usage),
        response.prompt_tokens,
        codec.dumps_text(response.settings),
        response.created_at,
    )
    if not with_turn:
        return bool(await conn.fetchval(_INSERT, *args))
    row = await conn.fetchrow(_INSERT_WITH_TURN, *args)
    if not row["stored"] and not row["earlier"]:
        raise SessionGone(response.session_id or "")
    return bool(row["stored"])


# The chain: the named response (the caller's), then each previous one, until the chain ends or
# it holds `limit` messages; then its newest `limit` messages, newest first.
_READ_CHAIN = """
    WITH RECURSIVE c AS (
        SELECT user_id FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL
    ), chain AS (
        SELECT r.id, r.previous_response_id, 1 AS depth, r.message_count AS held
        FROM responses r
        WHERE r.id = $2 AND r.user_id = (SELECT user_id FROM c)
        UNION ALL
        SELECT r.id, r.previous_response_id, chain.depth + 1, chain.held + r.message_count
        FROM chain JOIN responses r ON r.id = chain.previous_response_id
        WHERE chain.held < $3 AND r.user_id = (SELECT user_id FROM c)
    ), m AS (
        SELECT chain.depth, rm.ord, rm.role, rm.has_tool_calls, rm.tokens, rm.body
        FROM chain JOIN response_messages rm ON rm.response_id = chain.id
        ORDER BY chain.depth, rm.ord DESC
        LIMIT $3
    )
    SELECT c.user_id, EXISTS (SELECT 1 FROM chain) AS found,
           m.role, m.has_tool_calls, m.tokens, m.body
    FROM c LEFT JOIN m ON true
"""


async def read_chain(
    conn: asyncpg.Connection, key_hash: bytes, response_id: str, limit: int
) -> TurnContext | None:
    """The caller and the newest `limit` messages of `response_id`'s chain, oldest first;
    None for a bad key. `session_found` says whether the response is the caller's."""
    rows = await conn.fetch(_READ_CHAIN, key_hash, response_id, limit)
    if not rows:
        return None
    history = [r for r in rows if r["role"] is not None]
    count = len(history)
    return TurnContext(
        user_id=rows[0]["user_id"],
        session_found=rows[0]["found"],
        system_prompt=None,
        max_history_messages=limit,
        max_history_tokens=None,
        # seqs by position in the chain: a chain's messages have no seq of their own
        history=[
            stored(count - i, r["role"], r["has_tool_calls"], r["tokens"], r["body"])
            for i, r in enumerate(history)
        ][::-1],
    )


async def get_response(
    conn: asyncpg.Connection, user_id: str, response_id: str
) -> StoredResponse | None:
    """The caller's stored response with its messages, in one round trip."""
    rows = await conn.fetch(
        """
        SELECT r.previous_response_id, r.session_id, r.status, r.finish_reason, r.usage,
               r.prompt_tokens, r.settings, r.created_at,
               m.role, m.tokens, m.body, m.status AS message_status
        FROM responses r
        LEFT JOIN response_messages m ON m.response_id = r.id
        WHERE r.id = $1 AND r.user_id = $2
        ORDER BY m.ord
        """,
        response_id,
        user_id,
    )
    if not rows:
        return None
    first = rows[0]
    return StoredResponse(
        id=response_id,
        previous_response_id=first["previous_response_id"],
        session_id=first["session_id"],
        status=first["status"],
        finish_reason=first["finish_reason"],
        usage=None if first["usage"] is None else codec.loads(first["usage"]),
        prompt_tokens=first["prompt_tokens"],
        settings=codec.loads(first["settings"]),
        created_at=first["created_at"],
        messages=[
            StoredMessage(r["role"], r["tokens"], codec.loads(r["body"]), r["message_status"])
            for r in rows if r["role"] is not None
        ],
    )


async def delete_response(conn: asyncpg.Connection, user_id: str, response_id: str) -> bool:
    deleted: bool = await conn.fetchval(
        "WITH d AS (DELETE FROM responses WHERE id = $1 AND user_id = $2 RETURNING 1) "
        "SELECT EXISTS (SELECT 1 FROM d)",
        response_id,
        user_id,
    )
    return deleted


async def purge_batch(conn: asyncpg.Connection, cutoff: datetime, batch: int) -> int:
    """One batch of responses created before `cutoff` deleted (their messages with them)."""
    count: int = await conn.fetchval(
        """
        WITH doomed AS (
            SELECT id FROM responses WHERE created_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED
        ), d AS (
            DELETE FROM responses r USING doomed WHERE r.id = doomed.id RETURNING 1
        )
        SELECT count(*) FROM d
        """,
        cutoff,
        batch,
    )
    return count
