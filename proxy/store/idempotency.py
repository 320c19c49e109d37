"""`idempotency_keys`: a key claimed by a request, the answer it recorded, released, expired.

What the statements mean for a turn (who may claim a key, replay, 409, 422) is
proxy/turns/claim.py's. A key lives `TTL_HOURS`; a claim still running after `STALE_MINUTES`
lost its request (a crash, a database outage during the write) and may be claimed again.
Each claim carries a token of its own (sql/006_turn_ids.sql), and only its holder's token
settles or releases it: a claim taken over after going stale is never settled or released by
the request that lost it, and a request that cannot tell whether its claim went in may give it
back without touching anyone else's.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import asyncpg

TTL_HOURS = 24
STALE_MINUTES = 15


@dataclass(frozen=True)
class Answer:
    """A response as it was sent: what a retry with the same key gets back."""

    status_code: int
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class Recorded:
    """What the request that holds a key left: its body's hash, and its answer once done."""

    request_hash: bytes
    answer: Answer | None  # None: still running


async def try_claim(
    conn: asyncpg.Connection, user_id: str, key: str, fingerprint: bytes, token: uuid.UUID
) -> bool:
    """Claim the key for a request with this body hash, under `token`: True when it was free (or
    expired, or its claim went stale)."""
    won: bool | None = await conn.fetchval(
        f"""
        INSERT INTO idempotency_keys (user_id, key, request_hash, claim) VALUES ($1, $2, $3, $4)
        ON CONFLICT (user_id, key) DO UPDATE
            SET request_hash = EXCLUDED.request_hash, state = 'running', status_code = NULL,
                headers = NULL, body = NULL, created_at = now(), claim = EXCLUDED.claim
            WHERE idempotency_keys.created_at < now() - interval '{TTL_HOURS} hours'
               OR (idempotency_keys.state = 'running'
                   AND idempotency_keys.created_at < now() - interval '{STALE_MINUTES} minutes')
        RETURNING true
        """,
        user_id,
        key,
        fingerprint,
        token,
    )
    return bool(won)


async def recorded(conn: asyncpg.Connection, user_id: str, key: str) -> Recorded | None:
    """What the key's holder left; None when the key is gone (expired and purged)."""
    row = await conn.fetchrow(
        "SELECT request_hash, state, status_code, headers, body FROM idempotency_keys "
        "WHERE user_id = $1 AND key = $2",
        user_id,
        key,
    )
    if row is None:
        return None
    answer = None
    if row["state"] == "done":
        answer = Answer(row["status_code"], dict(row["headers"] or {}), bytes(row["body"]))
    return Recorded(bytes(row["request_hash"]), answer)


async def settle(
    conn: asyncpg.Connection, user_id: str, key: str, answer: Answer,
    *, token: uuid.UUID | None = None,
) -> None:
    """Record the answer the claim's request sent (call in the turn's own transaction): the
    claim with `token`, or (None) the one the turn's transaction has settled already, whose
    answer a door replaces with its own."""
    await conn.execute(
        "UPDATE idempotency_keys SET state = 'done', status_code = $4, headers = $5, body = $6 "
        "WHERE user_id = $1 AND key = $2 AND ($3::uuid IS NULL OR claim = $3)",
        user_id,
        key,
        token,
        answer.status_code,
        answer.headers,
        answer.body,
    )


async def release(conn: asyncpg.Connection, user_id: str, key: str, token: uuid.UUID) -> None:
    """Give a running claim back (no turn was stored), so that a retry runs again."""
    await conn.execute(
        "DELETE FROM idempotency_keys "
        "WHERE user_id = $1 AND key = $2 AND claim = $3 AND state = 'running'",
        user_id,
        key,
        token,
    )


async def purge_expired(conn: asyncpg.Connection) -> int:
    deleted: str = await conn.execute(
        f"DELETE FROM idempotency_keys WHERE created_at < now() - interval '{TTL_HOURS} hours'"
    )
    return int(deleted.split()[-1])
