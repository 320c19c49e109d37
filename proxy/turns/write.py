"""A turn's write-back: the request's messages and the reply, stored in one statement.

The write runs as a task of its own, so that a cancelled request cannot cut it short, and is
retried once on a fresh connection when its connection died; both attempts carry the turn's own
id, so a retry after a statement whose outcome is unknown stores only if the turn is not there
yet. A session deleted or merged away while the turn ran takes nothing, and the write says so
(SessionGone). In the same transaction: the `Idempotency-Key`'s answer (proxy/turns/claim.py)
and a door's `extra_write`. Also what is stored of the upstream's reply, and its tokens.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec

from proxy import db, metrics, retention
from proxy.errors import DatabaseUnavailable, SessionGone
from proxy.runtime import Runtime
from proxy.schemas import MAX_TOKENS
from proxy.store import messages
from proxy.store.idempotency import Answer
from proxy.store.messages import NewMessage
from proxy.tokens import TOKENS_PER_MESSAGE
from proxy.turns.claim import Claim, release


@dataclass(frozen=True, slots=True)
class StoredTurn:
    """A turn as stored: its session (None: a turn only its door's `extra_write` stores), its
    messages (the request's, then the reply), the reply's status; and for a door that answers
    in its own words: the caller, the upstream's `usage` and `finish_reason` (None when it gave
    none), and the tokens of everything sent upstream, counted (`prompt_tokens`)."""

    session_id: str | None
    messages: list[NewMessage]
    status: str
    user_id: str = ""
    usage: Any = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    in_session: bool = True  # the engine stored the messages in the session (else: the door)


# A door's own write in the turn's transaction (e.g. the Responses API's `responses` row); run
# only when the turn was stored by this write.
ExtraWrite = Callable[[asyncpg.Connection, StoredTurn], Awaitable[None]]


class Turn(msgspec.Struct):
    """What the write-back needs once the upstream has answered.

    `headers` are the history's (X-Session-Id, X-History-*); `claim` the request's
    Idempotency-Key, when it sent one; `after_seq` the session's next seq as read, when the
    request resent its newest messages (`store_turn` checks that nothing came between).
    Without a session only `extra_write` stores anything.
    """

    session_id: str | None
    model: Any
    new: list[NewMessage]
    headers: dict[str, str]
    claim: Claim | None = None
    extra_write: ExtraWrite | None = None
    after_seq: int | None = None
    summary_due: int | None = None  # a summary job should cover up to this seq (§11)
    user_id: str = ""
    prompt_tokens: int = 0  # head + history + the request's messages + reply priming
    extra_stores: bool = False  # `extra_write` stores the messages in the session itself


async def persist(
    rt: Runtime,
    turn: Turn,
    reply: dict[str, Any],
    usage: Any,
    status: str,
    answer: Answer | None = None,
    *,
    finish_reason: str | None = None,
) -> None:
    """Store the turn: one statement, retried once on a fresh connection if the first one died.

    The reply's tokens come from the upstream's `usage` (`reply_tokens`), counted inside the
    write's own task when there is none, so that a cancelled request cannot cut the count short.

    Never stores a turn twice: both attempts carry the turn's own id, and a retry whose first
    attempt committed stores nothing (proxy/store/messages.py `store_turn`). Raises SessionGone
    when the session was deleted or merged away while the turn ran (nothing is stored: the
    client must be told). Runs as its own task so that a request cancelled mid-write cannot cut
    it short. With an Idempotency-Key, `answer` (the response as sent) is recorded in the same
    transaction; without an answer to replay (an incomplete turn) the key is released instead,
    and so it is whenever the write fails.
    """
    claim, extra = turn.claim, turn.extra_write
    if turn.session_id is None and claim is None and extra is None:
        return  # nothing to store
    if claim is not None:
        claim.take()
    turn_id = messages.new_turn_id()

    async def attempt(rows: list[NewMessage], stored: StoredTurn) -> None:
        """One try, on a connection of its own: one statement needs no transaction; the
        claim's answer, or a door's write beside the engine's, go in the turn's."""
        async with db.connection(rt.pool, rt.settings.db_acquire_timeout) as conn:
            together = claim is not None or (extra is not None and _stores(turn))
            async with conn.transaction() if together else nullcontext():
                if not await _store(conn, turn, rows, turn_id):
                    # Rolled back: the key is not settled. (A turn without a session never
                    # gets here: it has nothing of its own to store.)
                    raise SessionGone(turn.session_id or "")
                if claim is not None:
                    await claim.settle(conn, answer)
                if extra is not None:
                    await extra(conn, stored)

    async def write() -> None:
        try:
            tokens = await reply_tokens(rt, turn.model, reply, usage)
            rows = [*turn.new, NewMessage(reply, tokens, status)]
            stored = StoredTurn(turn.session_id, rows, status, turn.user_id, usage,
                                finish_reason, turn.prompt_tokens, _stores(turn))
            try:
                await attempt(rows, stored)
            except DatabaseUnavailable:
                # The connection died; the statement may have committed before it did.
                try:
                    await attempt(rows, stored)
                except messages.StoredEarlier:
                    pass  # it had: stored once, settled in the same transaction
        except BaseException:
            if claim is not None:
                # Still running unless a committed write settled it: then this changes nothing.
                await release(rt, claim)
            raise
        metrics.turn_stored(status)
        if turn.session_id is not None:
            await retention.prune_after_turn(rt.pool, rt.settings, turn.session_id)

    task = rt.track(asyncio.create_task(write()))
    await asyncio.shield(task)


def _stores(turn: Turn) -> bool:
    """Whether the engine stores the turn's messages in its session itself (else its door's
    `extra_write` does, and must be safe to run again when the write is retried in doubt). A
    turn that resent stored messages is always stored here (`store_turn` handles its race)."""
    return turn.session_id is not None and (not turn.extra_stores or turn.after_seq is not None)


async def _store(
    conn: asyncpg.Connection, turn: Turn, rows: list[NewMessage], turn_id: uuid.UUID
) -> int:
    """The turn's messages stored in its session (how many: 0 when the session went away),
    unless the door's write does it."""
    if turn.session_id is None or not _stores(turn):
        return len(rows)
    return await messages.store_turn(conn, turn.session_id, rows, turn_id=turn_id,
                                     after_seq=turn.after_seq)


async def reply_tokens(rt: Runtime, model: Any, reply: dict[str, Any], usage: Any) -> int:
    """The reply's tokens as history: the upstream's `usage.completion_tokens` when given.

    Reasoning tokens are part of `completion_tokens` but never go back upstream as history, so
    they are left out; without usage the reply is counted like any other message.
    """
    completion = usage.get("completion_tokens") if isinstance(usage, dict) else None
    if not isinstance(completion, int) or isinstance(completion, bool) or completion < 0:
        return (await rt.tokens.counts(model, [reply]))[0]  # off the loop when long
    details = usage.get("completion_tokens_details")
    reasoning = details.get("reasoning_tokens") if isinstance(details, dict) else None
    if isinstance(reasoning, int) and not isinstance(reasoning, bool) and 0 < reasoning:
        completion = max(0, completion - reasoning)
    # An upstream may say anything (2**40, say): a stored count is a 32-bit integer.
    return min(completion + TOKENS_PER_MESSAGE, MAX_TOKENS)


def reply_message(message: dict[str, Any]) -> dict[str, Any]:
    """The parts of `choices[0].message` that go back upstream as history, exactly as sent.

    Fields an upstream does not accept in a request message (`annotations`, `reasoning_content`,
    ...) are left out; an audio reply is referred to by its id, as the API expects.
    """
    reply: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
    for name in ("refusal", "tool_calls", "function_call"):
        if message.get(name):
            reply[name] = message[name]
    audio = message.get("audio")
    if isinstance(audio, dict) and isinstance(audio.get("id"), str):
        reply["audio"] = {"id": audio["id"]}
    return reply


def finish_reason(answer: Any) -> str | None:
    """A chat completion's `choices[0].finish_reason` (None when it has none)."""
    try:
        reason = answer["choices"][0]["finish_reason"]
    except (KeyError, IndexError, TypeError):
        return None
    return reason if isinstance(reason, str) else None


def first_message(answer: Any) -> dict[str, Any] | None:
    if not isinstance(answer, dict):
        return None
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    message = choices[0].get("message")
    return message if isinstance(message, dict) else None
