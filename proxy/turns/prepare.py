"""A turn's upstream body: the request's head, the session's history trimmed to fit, the rest.

Contract §7, with counts taken once: the request's messages now, stored ones never again (their
count was stored with them). Stored history is spliced into the upstream body as its stored JSON
text, never decoded or re-encoded. `prepare` is pure, so that a turn can be prepared again (with
less history) and sent again (the engine counts the history metrics once, for the turn as
sent); it is async only because a request with long text is counted in a worker thread
(`TokenCounter.counts`). The session's summary, when
it applies, goes right after the head (proxy/turns/summary.py), and a context window an upstream
refusal stated replaces the model table's (proxy/turns/overflow.py).
"""

from __future__ import annotations

from typing import Any

import msgspec

from proxy import history, overlap
from proxy.document import summary_message
from proxy.runtime import Runtime
from proxy.store.messages import NewMessage, TurnContext
from proxy.tokens import REPLY_PRIMING
from proxy.turns import overflow, summary
from proxy.turns.write import ExtraWrite, Turn

HEAD_ROLES = frozenset({"system", "developer"})


def _reserved_output(body: dict[str, Any], default: int) -> int:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return default


async def prepare(
    rt: Runtime, body: dict[str, Any], items: list[dict[str, Any]],
    ctx: TurnContext, session_id: str | None, extra_write: ExtraWrite | None = None,
    *, extra_stores: bool = False,
) -> tuple[Turn, dict[str, Any]]:
    """The upstream body (head + history + rest) and the turn to store once answered.

    `items` are the request's messages; the body's `messages` is replaced by the spliced list
    (so `items` must be kept by a caller that prepares again).
    """
    split = head_length(items)
    head, rest = items[:split], items[split:]
    if not head and ctx.system_prompt is not None:
        head = [{"role": "system", "content": ctx.system_prompt}]
    model = body.get("model")
    info = rt.tokens.table.lookup(model)
    # The request may open with the session's newest messages (proxy/overlap.py): those are
    # not stored again, the history ends before them, and they count with their stored tokens.
    tail = [*ctx.older, *ctx.history] if ctx.older else ctx.history
    resent = overlap.find(rest, tail)
    counts = await rt.tokens.counts(model, [*head, *rest[resent:]])  # off the loop when long
    head_tokens, rest_counts = sum(counts[: len(head)]), counts[len(head) :]
    new = [NewMessage(m, n) for m, n in zip(rest[resent:], rest_counts, strict=True)
           if m["role"] not in HEAD_ROLES]
    rest_tokens = sum(rest_counts) + sum(m.tokens for m in tail[len(tail) - resent :])
    window, reserve = overflow.limits(rt.context_limits, ctx.user_id, model, info)  # learned
    budget = history.budget(
        window, _reserved_output(body, reserve), head_tokens + rest_tokens + REPLY_PRIMING
    )
    # A request that opens with tool results (new, or resent) answers the newest stored tool
    # exchange before them.
    continued = bool(rest) and rest[0].get("role") == "tool"
    sendable = ctx.history[: max(0, len(ctx.history) - resent)]  # the window before the resent
    fitted = summary.fit(ctx, sendable, budget, continued=continued,
                         enabled=rt.settings.summary_model is not None)
    trimmed = fitted.trimmed
    held = fitted.summary  # carried right after the head, counted in the budget
    carried = [summary_message(held.text)] if held is not None and held.text is not None else []
    body["messages"] = [*head, *carried, *(msgspec.Raw(m.body) for m in trimmed.messages), *rest]
    headers = {
        "x-history-messages": str(len(trimmed.messages)),
        "x-history-tokens": str(trimmed.tokens),
        "x-history-dropped": str(trimmed.dropped),
        "x-history-stored": str(ctx.message_count),
    }
    if resent:
        headers["x-history-overlap"] = str(resent)
    if held is not None:
        headers["x-history-summary-seq"] = str(held.up_to_seq)
    if session_id is not None:
        headers = {"x-session-id": session_id, **headers}
    after_seq = ctx.next_seq if resent else None
    carried_tokens = trimmed.tokens + (held.tokens if held is not None else 0)
    prompt_tokens = head_tokens + carried_tokens + rest_tokens + REPLY_PRIMING
    return Turn(session_id, model, new, headers, extra_write=extra_write, after_seq=after_seq,
                summary_due=fitted.due if session_id is not None else None,  # a session's job
                user_id=ctx.user_id, prompt_tokens=prompt_tokens,
                extra_stores=extra_stores), body


def head_length(items: list[dict[str, Any]]) -> int:
    """How many of the request's messages are its head (the system/developer ones it opens
    with)."""
    split = 0
    while split < len(items) and items[split].get("role") in HEAD_ROLES:
        split += 1
    return split
