"""`Idempotency-Key` on a turn (contract §6): the key checked, claimed, replayed, settled, released.

The key is scoped to the caller and lives 24 hours. `claim` either wins the key (the turn runs),
or reports what the earlier request left: still running (409), a different body (422), or a
finished response to replay byte for byte without calling the upstream.

`claimed` is the whole life of a claim, as one async context manager:

    claimed(...) ──> Answer            replay it; nothing runs, nothing to give back
         ├─────────> Claim (held) ──> taken by the write-back: settled in the turn's own
         │                 │          transaction, or released when the write fails (a
         │                 │          committed write settled it, so that changes nothing)
         │                 └───────> the block ends any other way (an upstream error, a 200
         │                           that is not a completion, an exception, a cancellation):
         │                           released, in a task of its own, so a retry runs again
         └─────────> the database went away while claiming: released all the same (the claim
                     may have gone in), then 503

A claim is settled or released only by its own token, so giving one back is always safe.

A streamed turn hands the open context on to its relay (`AsyncExitStack.pop_all`), which ends
it once the stream is stored or abandoned.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg

from proxy import db
from proxy.errors import BadRequest, Conflict, DatabaseUnavailable, Unprocessable
from proxy.runtime import Runtime
from proxy.store import idempotency
from proxy.store.idempotency import Answer

MAX_KEY_LENGTH = 255
log = logging.getLogger("chatproxy.turn")


@dataclass(frozen=True, slots=True)
class Idempotency:
    """A request's `Idempotency-Key` and the hash of what it asks (`request_hash`)."""

    key: str
    fingerprint: bytes


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


class Claim:
    """A key this turn holds (under a `token` of its own), until the write-back `take`s it (and
    `settle`s it) or it is released when `claimed` ends."""

    __slots__ = ("_taken", "key", "token", "user_id")

    def __init__(self, user_id: str, key: str, token: uuid.UUID | None = None) -> None:
        self.user_id = user_id
        self.key = key
        self.token = token or uuid.uuid4()
        self._taken = False

    def take(self) -> None:
        """The write-back begins: from here on it owns the key, whatever happens to it."""
        self._taken = True

    @property
    def taken(self) -> bool:
        return self._taken

    async def settle(self, conn: asyncpg.Connection, answer: Answer | None) -> None:
        """In the turn's transaction: record `answer`, or give the key back without one (an
        incomplete turn has nothing to replay)."""
        if answer is None:
            await idempotency.release(conn, self.user_id, self.key, self.token)
        else:
            await idempotency.settle(conn, self.user_id, self.key, answer, token=self.token)


async def claim(conn: asyncpg.Connection, held: Claim, fingerprint: bytes) -> Claim | Answer:
    """Win the key for `held`, or raise 409/422, or return the stored response to replay."""
    user_id, key = held.user_id, held.key
    if await idempotency.try_claim(conn, user_id, key, fingerprint, held.token):
        return held
    earlier = await idempotency.recorded(conn, user_id, key)
    if earlier is None:  # expired and purged between the two statements: try once more
        return await claim(conn, held, fingerprint)
    if earlier.request_hash != fingerprint:
        raise Unprocessable(
            "This Idempotency-Key was used with a different request", param="Idempotency-Key"
        )
    if earlier.answer is None:
        raise Conflict(
            "A request with this Idempotency-Key is still in progress",
            param="Idempotency-Key",
            code="idempotency_key_in_use",
        )
    return earlier.answer


@asynccontextmanager
async def claimed(rt: Runtime, user_id: str, request: Idempotency) -> AsyncIterator[Claim | Answer]:
    """The key claimed for the block (or the answer to replay); released unless taken."""
    held = Claim(user_id, request.key)
    sent = False
    try:
        async with db.connection(rt.pool, rt.settings.db_acquire_timeout) as conn:
            sent = True
            outcome = await claim(conn, held, request.fingerprint)
    except DatabaseUnavailable:
        if sent:  # the claim may have gone in before the connection died: give it back, or
            await release(rt, held)  # a retry would find the key in use until it went stale
        raise
    if isinstance(outcome, Answer):
        yield outcome
        return
    try:
        yield outcome
    finally:
        if not outcome.taken:
            await release(rt, outcome)


async def release(rt: Runtime, held: Claim) -> None:
    """Give the key back when no turn was stored; survives a cancelled request."""

    async def give_back() -> None:
        try:
            async with db.connection(rt.pool, rt.settings.db_acquire_timeout) as conn:
                await idempotency.release(conn, held.user_id, held.key, held.token)
        except DatabaseUnavailable:
            log.warning("an idempotency key could not be released: database unavailable")

    await asyncio.shield(rt.track(asyncio.create_task(give_back())))
