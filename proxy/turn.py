"""One turn: the upstream body built from head + history + rest, and its write-back.

`prepare` applies contract §7 with counts taken once (the request's messages now, stored ones
never again) and splices stored history into the upstream body as its stored JSON text.
`persist` stores the request's messages and the reply in one statement, as a task of its own so
that a cancelled request cannot cut the write short.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgspec

from proxy import db, history, idempotency, messages, metrics, retention
from proxy.app import Runtime
from proxy.errors import DatabaseUnavailable
from proxy.idempotency import Answer
from proxy.messages import NewMessage
from proxy.tokens import REPLY_PRIMING, TOKENS_PER_MESSAGE

HEAD_ROLES = frozenset({"system", "developer"})
log = logging.getLogger("chatproxy.turn")


class Turn(msgspec.Struct):
    """What the write-back needs once the upstream has answered.

    `claim` is the request's Idempotency-Key, when it sent one: the stored response is recorded
    in the turn's own transaction (or the key released when there is nothing to replay).
    """

    session_id: str
    model: Any
    new: list[NewMessage]
    headers: dict[str, str]
    claim: idempotency.Claim | None = None
    settled: bool = False  # the claim is in the hands of the write-back (or the stream relay)


def _reserved_output(body: dict[str, Any], default: int) -> int:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return default


async def prepare(
    rt: Runtime, body: dict[str, Any], items: list[dict[str, Any]],
    ctx: messages.TurnContext, session_id: str,
) -> tuple[Turn, dict[str, Any]]:
    """The upstream body (head + history + rest) and the turn to store once answered."""
    split = 0
    while split < len(items) and items[split].get("role") in HEAD_ROLES:
        split += 1
    head, rest = items[:split], items[split:]
    if not head and ctx.system_prompt is not None:
        head = [{"role": "system", "content": ctx.system_prompt}]
    model = body.get("model")
    info = rt.tokens.table.lookup(model)
    counts = await rt.tokens.counts(model, [*head, *rest])  # off the loop when long
    head_tokens, rest_counts = sum(counts[: len(head)]), counts[len(head) :]
    new = [NewMessage(m, n) for m, n in zip(rest, rest_counts, strict=True)
           if m["role"] not in HEAD_ROLES]
    rest_tokens = sum(rest_counts)
    budget = history.budget(
        info.context_window,
        _reserved_output(body, info.reserve_output_tokens),
        head_tokens + rest_tokens + REPLY_PRIMING,
    )
    # A request that opens with tool results answers the newest stored tool exchange.
    continued = bool(rest) and rest[0].get("role") == "tool"
    trimmed = history.trim(ctx.history, budget, ctx.max_history_tokens, continued=continued)
    metrics.history(len(trimmed.messages), trimmed.tokens, trimmed.dropped)  # = X-History-*
    body["messages"] = [*head, *(msgspec.Raw(m.body) for m in trimmed.messages), *rest]
    headers = {
        "x-session-id": session_id,
        "x-history-messages": str(len(trimmed.messages)),
        "x-history-tokens": str(trimmed.tokens),
        "x-history-dropped": str(trimmed.dropped),
    }
    return Turn(session_id, model, new, headers), body


async def persist(
    rt: Runtime,
    turn: Turn,
    reply: dict[str, Any],
    usage: Any,
    status: str,
    answer: Answer | None = None,
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
    turn.settled = True

    async def write() -> None:
        tokens = await reply_tokens(rt, turn.model, reply, usage)
        rows = [*turn.new, NewMessage(reply, tokens, status)]
        in_doubt = False
        for attempt in (1, 2):
            sent = False
            try:
                async with db.connection(rt.pool, rt.settings.db_acquire_timeout) as conn:
                    sent = True
                    if turn.claim is None:
                        count = await messages.store_turn(
                            conn, turn.session_id, rows, unless_stored=in_doubt
                        )
                    else:
                        async with conn.transaction():
                            count = await messages.store_turn(
                                conn, turn.session_id, rows, unless_stored=in_doubt
                            )
                            await idempotency.settle(conn, turn.claim, answer)
                # 0 rows: the session went away meanwhile, or (in doubt) the first try stored it.
                if count or in_doubt:
                    metrics.turn_stored(status)
                break
            except DatabaseUnavailable:
                if attempt == 2:
                    raise
                in_doubt = sent
        await retention.prune_after_turn(rt.pool, rt.settings, turn.session_id)

    task = rt.track(asyncio.create_task(write()))
    await asyncio.shield(task)


async def release_claim(rt: Runtime, claim: idempotency.Claim) -> None:
    """Give an Idempotency-Key back when no turn was stored; survives a cancelled request."""

    async def release() -> None:
        try:
            async with db.connection(rt.pool, rt.settings.db_acquire_timeout) as conn:
                await idempotency.release(conn, claim)
        except DatabaseUnavailable:
            log.warning("an idempotency key could not be released: database unavailable")

    await asyncio.shield(rt.track(asyncio.create_task(release())))


async def reply_tokens(rt: Runtime, model: Any, reply: dict[str, Any], usage: Any) -> int:
    """The reply's tokens as history: the upstream's `usage.completion_tokens` when given.

    Reasoning tokens are part of `completion_tokens` but never go back upstream as history, so
    they are left out; without usage the reply is counted like any other message.
    """
    completion = usage.get("completion_tokens") if isinstance(usage, dict) else None
    if not isinstance(completion, int) or isinstance(completion, bool) or completion < 0:
        return (await rt.tokens.counts(model, [reply]))[0]
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


def first_message(answer: Any) -> dict[str, Any] | None:
    if not isinstance(answer, dict):
        return None
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    message = choices[0].get("message")
    return message if isinstance(message, dict) else None
