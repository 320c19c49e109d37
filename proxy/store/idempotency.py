"""`Idempotency-Key` on /v1/chat/completions: claim, conflict, replay (contract §6).

The key is scoped to the caller and lives 24 hours. `claim` either wins the key (the request
runs), or reports what the earlier request left: still running (409), a different body (422),
or a finished response to replay byte for byte without calling the upstream.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import asyncpg

from proxy.errors import BadRequest, Conflict, Unprocessable

TTL_HOURS = 24
# A claim still 'running' after this long lost its request (a crash, a database outage during
# the write): the key may be claimed again.
STALE_MINUTES = 15
MAX_KEY_LENGTH = 255


@dataclass(frozen=True)
class Answer:
    """A response as it was sent: what a retry with the same key gets back."""

    status_code: int
    headers: dict[str, str]
    body: bytes



@dataclass(frozen=True)
class Claim:
    """A key this request owns; `finish` / `release` are bound to it."""

    user_id: str
    key: str


def check_key(value: str | None) -> str | None:
    if value is None:
        return None
    if not 0 < len(value) <= MAX_KEY_LENGTH or not all(0x21 <= ord(c) <= 0x7E for c in value):
        raise BadRequest(
            f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} visible ASCII characters",
            param="Idempotency-Key",
        )
    return value


def request_hash(session_id: str | None, raw_body: bytes) -> bytes:
    digest = hashlib.sha256((session_id or "").encode("utf-8", "surrogatepass") + b"\0")
    digest.update(raw_body)
    return digest.digest()


async def claim(
    conn: asyncpg.Connection, user_id: str, key: str, fingerprint: bytes
) -> Claim | Answer:
    """Win the key, or raise 409/422, or return the stored response to replay."""
    won = await conn.fetchval(
        f"""
        INSERT INTO idempotency_keys (user_id, key, request_hash) VALUES ($1, $2, $3)
        ON CONFLICT (user_id, key) DO UPDATE
            SET request_hash = EXCLUDED.request_hash, state = 'running', status_code = NULL,
                headers = NULL, body = NULL, created_at = now()
            WHERE idempotency_keys.created_at < now() - interval '{TTL_HOURS} hours'
               OR (idempotency_keys.state = 'running'
                   AND idempotency_keys.created_at < now() - interval '{STALE_MINUTES} minutes')
        RETURNING true
        """,
        user_id,
        key,
        fingerprint,
    )
    if won:
        return Claim(user_id, key)
    row = await conn.fetchrow(
        "SELECT request_hash, state, status_code, headers, body FROM idempotency_keys "
        "WHERE user_id = $1 AND key = $2",
        user_id,
        key,
    )
    if row is None:  # expired and purged between the two statements: try once more
        return await claim(conn, user_id, key, fingerprint)
    if bytes(row["request_hash"]) != fingerprint:
        raise Unprocessable(
            "This Idempotency-Key was used with a different request", param="Idempotency-Key"
        )
    if row["state"] != "done":
        raise Conflict(
            "A request with this Idempotency-Key is still in progress",
            param="Idempotency-Key",
            code="idempotency_key_in_use",
        )
    return Answer(row["status_code"], dict(row["headers"] or {}), bytes(row["body"]))


async def settle(conn: asyncpg.Connection, claimed: Claim, answer: Answer | None) -> None:
    """Record the answer (call in the turn's own transaction), or release the key without one."""
    if answer is None:
        await release(conn, claimed)
        return
    await conn.execute(
        "UPDATE idempotency_keys SET state = 'done', status_code = $3, headers = $4, body = $5 "
        "WHERE user_id = $1 AND key = $2",
        claimed.user_id,
        claimed.key,
        answer.status_code,
        answer.headers,
        answer.body,
    )


async def release(conn: asyncpg.Connection, claimed: Claim) -> None:
    """Give the key back (no turn was stored), so a retry runs again."""
    await conn.execute(
        "DELETE FROM idempotency_keys WHERE user_id = $1 AND key = $2 AND state = 'running'",
        claimed.user_id,
        claimed.key,
    )


async def purge_expired(conn: asyncpg.Connection) -> int:
    deleted: str = await conn.execute(
        f"DELETE FROM idempotency_keys WHERE created_at < now() - interval '{TTL_HOURS} hours'"
    )
    return int(deleted.split()[-1])
