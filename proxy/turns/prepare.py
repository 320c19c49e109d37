"""A turn's upstream body: the request's head, the session's history trimmed to fit, the rest.

Contract §7, with counts taken once: the request's messages now, stored ones never again (their
count was stored with them). Stored history is spliced into the upstream body as its stored JSON
text, never decoded or re-encoded. `prepare` is pure but for the history metrics, so that a turn
can be prepared again (with less history) and sent again; it is async only because a request
with long text is counted in a worker thread (`TokenCounter.counts`).
"""

from __future__ import annotations

from typing import Any

import msgspec

from proxy import history, metrics
from proxy.runtime import Runtime
from proxy.store.messages import NewMessage, TurnContext
from proxy.tokens import REPLY_PRIMING
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
        "x-history-messages": str(len(trimmed.messages)),
        "x-history-tokens": str(trimmed.tokens),
        "x-history-dropped": str(trimmed.dropped),
    }
    if session_id is not None:
        headers = {"x-session-id": session_id, **headers}
    prompt_tokens = head_tokens + trimmed.tokens + rest_tokens + REPLY_PRIMING
    return Turn(session_id, model, new, headers, extra_write=extra_write, user_id=ctx.user_id,
                prompt_tokens=prompt_tokens, extra_stores=extra_stores), body
