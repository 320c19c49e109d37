"""Variant: the shipped server without the session's summary in the turn's read.

The read's lateral join is the messages alone (no `UNION ALL` branch over `chat_summaries`, so
no summary row comes back), and the prepare step trims the history as before summaries
(`history.trim`, no `summary.fit`). Summaries are off in the benchmark
(`CHATPROXY_SUMMARY_MODEL` unset), so this measures only what their presence costs a turn
that never carries one. For measurement only.
"""

from __future__ import annotations

from typing import Any

import _base

_BRANCH = """
            UNION ALL
            -- The summary, once and not once per message: a row without a role, whose seq is
            -- the last one it covers and whose has_tool_calls says its job is backing off.
            SELECT up_to_seq, NULL, retry_after > now(), tokens, text FROM chat_summaries
            WHERE session_id = s.id
"""


if __name__ == "__main__":
    from proxy import history
    from proxy.store import messages
    from proxy.turns import summary

    def fit(ctx: Any, window: Any, budget: int, *, continued: bool, enabled: bool) -> Any:
        trimmed = history.trim(window, budget, ctx.max_history_tokens, continued=continued)
        return summary.Fitted(trimmed, None, None)

    messages._READ_BY_KEY = _base.swap(messages._READ_BY_KEY, _BRANCH, "\n")
    messages._READ_BY_USER = _base.swap(messages._READ_BY_USER, _BRANCH, "\n")
    summary.fit = fit
    _base.serve()
