"""Variant: the shipped server whose turn write does not require an active session.

The write's UPDATE of the session row takes any session (`WHERE id = $1`, as before a write
refused a session deleted or merged away while its turn ran). For measurement only: with it,
such a turn is stored in a session nobody can see.
"""

from __future__ import annotations

import _base

if __name__ == "__main__":
    from proxy.store import messages

    messages._STORE_TURN = _base.swap(messages._STORE_TURN, "WHERE id = $1 AND is_active",
                                      "WHERE id = $1")
    _base.serve()
