"""Variant: the shipped server without a turn id row per write (sql/006_turn_ids.sql).

The turn's statement inserts no `chat_turns` row (`$9` is still named, so the shipped
`store_turn` runs unchanged around it), and no id is made for it (`new_turn_id` answers one
fixed id). For measurement only: with it, a write retried after its connection died could
store the turn twice.
"""

from __future__ import annotations

import uuid

import _base

_TURN = ", turn AS (INSERT INTO chat_turns (turn_id) SELECT $9 FROM s)"
_NONE = ", turn AS (SELECT $9::uuid AS turn_id)"  # unused: PostgreSQL plans it away
_ID = uuid.UUID(int=1)


def _fixed() -> uuid.UUID:
    return _ID


if __name__ == "__main__":
    from proxy.store import messages

    messages._STORE_TURN = _base.swap(messages._STORE_TURN, _TURN, _NONE)
    messages.new_turn_id = _fixed
    _base.serve()
