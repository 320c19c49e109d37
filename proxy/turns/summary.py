"""A turn's side of its session's summary (contract §11): whether it goes in, and whether a new
one is due. Pure: the engine's prepare step calls `fit` in place of the plain trimming.

The summary goes in only when the turn leaves stored messages out of its history — messages
before its window, or dropped from it — and summaries are on (`CHATPROXY_SUMMARY_MODEL`). It is
counted first: when it fits the budget (and `max_history_tokens`), the history is trimmed to
what is left; when it does not fit, it stays out and the history is trimmed as without it.

A new summary is due when the turn leaves out a message the summary does not cover yet. The job
then covers everything up to the newest message the turn read, the ones it still sends
included, so that the next job is due only once a window's worth of newer messages has been
left out: one summary call per window of dropped messages, not one per turn. Nothing is due
while the summary's job backs off after a failure.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy import history
from proxy.history import Trimmed
from proxy.store.messages import Stored, TurnContext
from proxy.store.summaries import Held


@dataclass(frozen=True, slots=True)
class Fitted:
    """The history a turn sends, the summary it carries (if any), and the seq a summary job
    should cover up to (None: none is due)."""

    trimmed: Trimmed[Stored]
    summary: Held | None
    due: int | None


def fit(
    ctx: TurnContext, window: list[Stored], budget: int, *, continued: bool, enabled: bool
) -> Fitted:
    """The turn's history within `budget`, with the session's summary when it applies.

    `window` is the part of `ctx.history` the turn may send: all of it, or what lies before the
    messages the request resends (proxy/overlap.py), which it brings itself."""
    trimmed = history.trim(window, budget, ctx.max_history_tokens, continued=continued)
    held = ctx.summary
    if not enabled or not window:
        return Fitted(trimmed, None, None)
    carried = None
    if held is not None and held.text is not None and _leaves_out(ctx, trimmed, held):
        limit = budget if ctx.max_history_tokens is None else min(budget, ctx.max_history_tokens)
        if held.tokens <= limit:
            cap = None if ctx.max_history_tokens is None else ctx.max_history_tokens - held.tokens
            trimmed = history.trim(window, budget - held.tokens, cap, continued=continued)
            carried = held
    return Fitted(trimmed, carried, _due(ctx, window, trimmed))


def _first_sent(trimmed: Trimmed[Stored]) -> int | None:
    return trimmed.messages[0].seq if trimmed.messages else None


def _leaves_out(ctx: TurnContext, trimmed: Trimmed[Stored], held: Held) -> bool:
    """Whether the turn leaves out messages the summary covers: any stored message older than
    the first one sent, or (the summary covering messages no longer stored, e.g. pruned) a
    summary that ends before it."""
    first = _first_sent(trimmed)
    if first is None or held.up_to_seq < first:
        return True
    return ctx.message_count > len(ctx.history) or ctx.history[0].seq < first


def _due(ctx: TurnContext, window: list[Stored], trimmed: Trimmed[Stored]) -> int | None:
    held = ctx.summary
    if held is not None and held.backing_off:
        return None
    covered = held.up_to_seq if held is not None and held.text is not None else 0
    first = _first_sent(trimmed)
    dropped = any(m.seq > covered for m in window if first is None or m.seq < first)
    # Messages before the window have seqs below its first one; some are newer than the
    # summary unless it reaches up to there.
    before = ctx.message_count > len(ctx.history) and window[0].seq - 1 > covered
    return window[-1].seq if dropped or before else None
