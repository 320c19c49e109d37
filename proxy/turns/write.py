"""A turn's write-back: the request's messages and the reply, stored in one statement.

The write runs as a task of its own, so that a cancelled request cannot cut it short, and is
retried once on a fresh connection when its connection died; a retry after a statement whose
outcome is unknown stores only if the turn is not there yet. In the same transaction: the
`Idempotency-Key`'s answer (proxy/turns/claim.py) and a door's `extra_write`. Also what is stored
of the upstream's reply, and its tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec

from proxy import db, metrics, retention
from proxy.errors import DatabaseUnavailable
from proxy.runtime import Runtime
from proxy.store import messages
from proxy.store.idempotency import Answer
from proxy.store.messages import NewMessage
from proxy.tokens import TOKENS_PER_MESSAGE
from proxy.turns.claim import Claim


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

    Never stores a turn twice: when the first attempt failed after its statement was sent (it
    may have committed before the connection died), the retry stores only if the turn is not
    there yet. Runs as its own task so that a request cancelled mid-write cannot cut it short.
    With an Idempotency-Key, `answer` (the response as sent) is recorded in the same
    transaction; without an answer to replay (an incomplete turn) the key is released instead.
    """
    claim, extra = turn.claim, turn.extra_write
    if turn.session_id is None and claim is None and extra is None:
        return  # nothing to store
    if claim is not None:
        claim.take()

    async def write() -> None:
        tokens = await reply_tokens(rt, turn.model, reply, usage)
        rows = [*turn.new, NewMessage(reply, tokens, status)]
        stored = StoredTurn(turn.session_id, rows, status, turn.user_id, usage, finish_reason,
                            turn.prompt_tokens, _stores(turn))
        in_doubt = False
        for attempt in (1, 2):
            sent = False
            try:
                async with db.connection(rt.pool, rt.settings.db_acquire_timeout) as conn:
                    sent = True
                    if claim is None and (extra is None or not _stores(turn)):
                        # one statement: no transaction to open
                        count = await _store(conn, turn, rows, in_doubt)
                        if extra is not None and count:
                            await extra(conn, stored)
                    else:
                        async with conn.transaction():
                            count = await _store(conn, turn, rows, in_doubt)
                            if claim is not None:
                                await claim.settle(conn, answer)
                            if extra is not None and count:
                                await extra(conn, stored)
                # 0 rows: the session went away meanwhile, or (in doubt) the first try stored it.
                if count or in_doubt:
                    metrics.turn_stored(status)
                break
            except DatabaseUnavailable:
                if attempt == 2:
                    raise
                in_doubt = sent
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
    conn: asyncpg.Connection, turn: Turn, rows: list[NewMessage], in_doubt: bool
) -> int:
    """The turn's messages stored in its session (how many), unless the door's write does it."""
    if turn.session_id is None or not _stores(turn):
        return len(rows)
    return await messages.store_turn(conn, turn.session_id, rows, unless_stored=in_doubt,
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
    return completion + TOKENS_PER_MESSAGE


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
