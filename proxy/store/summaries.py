"""`chat_summaries`: a session's summary of its earlier messages, and its job's state (§11).

The turn reads the summary with its history, in its one statement (proxy/store/messages.py,
as a `Held`); everything else about it is here: what the API shows (a `document.Summary`),
what the job reads and writes (proxy/summaries.py), and what clear, fork, import and export
do with it (proxy/store/lifecycle.py calls these inside its own transactions).

A summary's text is stored like any session text (`pack_text`), so it comes back exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

from proxy.codec import pack_text, unpack_text
from proxy.document import Summary


@dataclass(frozen=True, slots=True)
class Held:
    """The summary as a turn sees it: `text` None while its job has only failed so far;
    `backing_off` while the job waits after a failure (a turn does not schedule it then)."""

    text: str | None
    up_to_seq: int
    tokens: int
    backing_off: bool


def _summary(row: asyncpg.Record) -> Summary | None:
    text = unpack_text(row["text"])
    if text is None:
        return None
    return Summary(text, row["up_to_seq"], row["tokens"], unpack_text(row["model"]),
                   row["updated_at"])


async def get_summary(
    conn: asyncpg.Connection, user_id: str, session_id: str
) -> tuple[bool, Summary | None]:
    """(whether the caller's active session exists, its summary)."""
    row = await conn.fetchrow(
        """
        SELECT s.id, x.text, x.up_to_seq, x.tokens, x.model, x.updated_at
        FROM chat_sessions s LEFT JOIN chat_summaries x ON x.session_id = s.id
        WHERE s.id = $1 AND s.user_id = $2 AND s.is_active
        """,
        session_id,
        user_id,
    )
    if row is None:
        return False, None
    return True, _summary(row)


# --- the job ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JobState:
    """What a summary job starts from: the session's summary (`up_to_seq` 0 without one), its
    back-off, and the seq its current window starts at (None: no messages in the window)."""

    summary: Summary | None
    up_to_seq: int
    backing_off: bool
    window_start: int | None
    newest: int | None


async def job_state(conn: asyncpg.Connection, session_id: str) -> JobState | None:
    """The job's starting point for an active session; None when it is gone or deleted."""
    row = await conn.fetchrow(
        """
        SELECT x.text, COALESCE(x.up_to_seq, 0) AS up_to_seq, x.tokens, x.model, x.updated_at,
               COALESCE(x.retry_after > now(), false) AS backing_off,
               (SELECT min(w.seq) FROM (SELECT seq FROM chat_messages
                                        WHERE session_id = s.id ORDER BY seq DESC
                                        LIMIT s.max_history_messages) w) AS window_start,
               (SELECT max(seq) FROM chat_messages WHERE session_id = s.id) AS newest
        FROM chat_sessions s LEFT JOIN chat_summaries x ON x.session_id = s.id
        WHERE s.id = $1 AND s.is_active
        """,
        session_id,
    )
    if row is None:
        return None
    return JobState(_summary(row), row["up_to_seq"], row["backing_off"], row["window_start"],
                    row["newest"])


@dataclass(frozen=True, slots=True)
class Earlier:
    """A stored message the job folds into the summary; `body` is its JSON text."""

    seq: int
    role: str
    tokens: int
    body: str


async def messages_between(
    conn: asyncpg.Connection, session_id: str, after: int, up_to: int, limit: int
) -> list[Earlier]:
    """The oldest `limit` messages with `after < seq <= up_to`, in order."""
    rows = await conn.fetch(
        """
        SELECT seq, role, tokens, body FROM chat_messages
        WHERE session_id = $1 AND seq > $2 AND seq <= $3 ORDER BY seq LIMIT $4
        """,
        session_id,
        after,
        up_to,
        limit,
    )
    return [Earlier(r["seq"], r["role"], r["tokens"], r["body"]) for r in rows]


async def save(
    conn: asyncpg.Connection, session_id: str, expected: int, summary: Summary
) -> bool:
    """Store `summary` if the session's summary still covers `expected` (what the job started
    from) and the newest message it covers is still stored; False when either changed (a
    clear, another writer), and nothing is written.

    The session's row is locked first (FOR SHARE, which waits for a clear holding it): the
    check then runs on a snapshot taken after any clear that got there first, and a clear
    that comes later waits for this write and deletes it.
    """
    async with conn.transaction():
        if await conn.fetchval(
            "SELECT id FROM chat_sessions WHERE id = $1 FOR SHARE", session_id
        ) is None:
            return False
        row = await conn.fetchrow(
            """
            INSERT INTO chat_summaries AS x
                (session_id, text, up_to_seq, tokens, model, updated_at, failures, retry_after)
            SELECT $1, $2, $3, $4, $5, now(), 0, NULL
            WHERE EXISTS (SELECT 1 FROM chat_messages WHERE session_id = $1 AND seq = $3)
            ON CONFLICT (session_id) DO UPDATE
            SET text = EXCLUDED.text, up_to_seq = EXCLUDED.up_to_seq, tokens = EXCLUDED.tokens,
                model = EXCLUDED.model, updated_at = now(), failures = 0, retry_after = NULL
            WHERE x.up_to_seq = $6
            RETURNING 1
            """,
            session_id,
            pack_text(summary.text),
            summary.up_to_seq,
            summary.tokens,
            pack_text(summary.model),
            expected,
        )
    return row is not None


async def failed(
    conn: asyncpg.Connection, session_id: str, first_delay: float, max_delay: float
) -> float:
    """Record a failed job: the next one waits `first_delay` seconds, doubled for each failure
    in a row, at most `max_delay`. Returns the wait."""
    delay: float | None = await conn.fetchval(
        """
        INSERT INTO chat_summaries AS x (session_id, failures, retry_after)
        SELECT id, 1, now() + make_interval(secs => $2) FROM chat_sessions WHERE id = $1
        ON CONFLICT (session_id) DO UPDATE
        SET failures = x.failures + 1,
            retry_after = now() + make_interval(
                secs => least($3::float8, $2::float8 * 2 ^ least(x.failures, 30)))
        RETURNING extract(epoch FROM x.retry_after - now())::float8
        """,
        session_id,
        first_delay,
        max_delay,
    )
    return delay or 0.0


# --- what the lifecycle does with it --------------------------------------------------------------


async def drop(conn: asyncpg.Connection, session_id: str) -> None:
    """Clear: the summary goes with the messages it summarised."""
    await conn.execute("DELETE FROM chat_summaries WHERE session_id = $1", session_id)


async def copy_for_fork(
    conn: asyncpg.Connection, source_id: str, fork_id: str, up_to_seq: int
) -> None:
    """A fork keeps its source's summary when it covers only messages the fork copied (the
    fork keeps their seqs)."""
    await conn.execute(
        """
        INSERT INTO chat_summaries (session_id, text, up_to_seq, tokens, model, updated_at)
        SELECT $2, text, up_to_seq, tokens, model, updated_at FROM chat_summaries
        WHERE session_id = $1 AND text IS NOT NULL AND up_to_seq <= $3
        """,
        source_id,
        fork_id,
        up_to_seq,
    )


async def put(conn: asyncpg.Connection, session_id: str, summary: Summary) -> None:
    """An imported session's summary, as the document gave it."""
    await conn.execute(
        """
        INSERT INTO chat_summaries (session_id, text, up_to_seq, tokens, model, updated_at)
        VALUES ($1, $2, $3, $4, $5, COALESCE($6, now()))
        """,
        session_id,
        pack_text(summary.text),
        summary.up_to_seq,
        summary.tokens,
        pack_text(summary.model),
        summary.updated_at,
    )


async def exported(conn: asyncpg.Connection, session_id: str) -> dict[str, Any] | None:
    """The export document's `summary` (in the caller's transaction and snapshot)."""
    row = await conn.fetchrow(
        "SELECT text, up_to_seq, tokens, model, updated_at FROM chat_summaries "
        "WHERE session_id = $1",
        session_id,
    )
    summary = _summary(row) if row is not None else None
    return summary.as_object() if summary is not None else None
