"""One turn: the upstream body built from head + history + rest, and its write-back.

`prepare` applies contract §7 with counts taken once (the request's messages now, stored ones
never again) and splices stored history into the upstream body as its stored JSON text.
`persist` stores the request's messages and the reply in one statement, as a task of its own so
that a cancelled request cannot cut the write short.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from proxy import db, history, messages
from proxy.app import Runtime
from proxy.errors import DatabaseUnavailable
from proxy.messages import NewMessage
from proxy.tokens import REPLY_PRIMING, TOKENS_PER_MESSAGE

HEAD_ROLES = frozenset({"system", "developer"})


class Turn(msgspec.Struct):
    """What the write-back needs once the upstream has answered."""

    session_id: str
    model: Any
    new: list[NewMessage]
    headers: dict[str, str]


def _reserved_output(body: dict[str, Any], default: int) -> int:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return default


def prepare(
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
    head_tokens = sum(rt.tokens.message(model, m) for m in head)
    new = [NewMessage(m, rt.tokens.message(model, m)) for m in rest if m["role"] not in HEAD_ROLES]
    rest_tokens = sum(n.tokens for n in new) + sum(
        rt.tokens.message(model, m) for m in rest if m["role"] in HEAD_ROLES
    )
    budget = history.budget(
        info.context_window,
        _reserved_output(body, info.reserve_output_tokens),
        head_tokens + rest_tokens + REPLY_PRIMING,
    )
    trimmed = history.trim(ctx.history, budget, ctx.max_history_tokens)
    body["messages"] = [*head, *(msgspec.Raw(m.body) for m in trimmed.messages), *rest]
    headers = {
        "x-session-id": session_id,
        "x-history-messages": str(len(trimmed.messages)),
        "x-history-tokens": str(trimmed.tokens),
        "x-history-dropped": str(trimmed.dropped),
    }
    return Turn(session_id, model, new, headers), body


async def persist(rt: Runtime, turn: Turn, reply: dict[str, Any], tokens: int, status: str) -> None:
    """Store the turn: one statement, retried once on a fresh connection if the first one died.

    Runs as its own task so that a request cancelled mid-write cannot cut it short.
    """
    rows = [*turn.new, NewMessage(reply, tokens, status)]

    async def write() -> None:
        for attempt in (1, 2):
            try:
                async with db.connection(rt.pool, rt.settings.db_acquire_timeout) as conn:
                    await messages.store_turn(conn, turn.session_id, rows)
                return
            except DatabaseUnavailable:
                if attempt == 2:
                    raise

    task = rt.track(asyncio.create_task(write()))
    await asyncio.shield(task)


def reply_tokens(rt: Runtime, model: Any, reply: dict[str, Any], usage: Any) -> int:
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        return int(usage["completion_tokens"]) + TOKENS_PER_MESSAGE
    return rt.tokens.message(model, reply)


def reply_message(message: dict[str, Any]) -> dict[str, Any]:
    """The parts of `choices[0].message` that go back upstream as history, exactly as sent."""
    reply: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
    for name in ("refusal", "tool_calls", "function_call", "audio"):
        if message.get(name):
            reply[name] = message[name]
    return reply


def first_message(answer: Any) -> dict[str, Any] | None:
    if not isinstance(answer, dict):
        return None
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    message = choices[0].get("message")
    return message if isinstance(message, dict) else None
