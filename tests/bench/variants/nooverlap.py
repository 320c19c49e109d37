"""Variant: the shipped server without overlap recognition (proxy/overlap.py).

The turn's read fetches the window only (`LIMIT COALESCE($3, max_history_messages)`, as before
the overlap: it never fetches more because the request may resend stored messages; `$4` is
still named, so the shipped caller runs unchanged), and `overlap.find` answers 0 at once, so
nothing is recognised as resent and every turn is written without the `next_seq` check. For
measurement only: with it, a client resending its history stores it again.
"""

from __future__ import annotations

from typing import Any

import _base

_LIMIT = "LIMIT GREATEST(COALESCE($3::int, s.max_history_messages), $4::int))"
_BEFORE = "LIMIT COALESCE($3::int, s.max_history_messages) + 0 * $4::int)"


def _nothing_resent(request: Any, stored: Any) -> int:
    return 0


if __name__ == "__main__":
    from proxy import overlap
    from proxy.store import messages

    messages._READ_BY_KEY = _base.swap(messages._READ_BY_KEY, _LIMIT, _BEFORE)
    messages._READ_BY_USER = _base.swap(messages._READ_BY_USER, _LIMIT, _BEFORE)
    overlap.find = _nothing_resent
    _base.serve()
