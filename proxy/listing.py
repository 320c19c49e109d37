"""The lists' query parameters (contract §12): search words, session filters, keyset cursors.

Reads a request's query items (`(name, value)` pairs, repeats kept) into the values the store
functions take; every problem is a 400 naming the parameter, raised before any query runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from proxy import cursor, searchtext
from proxy.errors import BadRequest
from proxy.store.sessions import SessionFilter

Items = Sequence[tuple[str, str]]
METADATA = "metadata."
MAX_SEQ = 2**63 - 1


def _last(items: Items, name: str) -> str | None:
    values = [v for k, v in items if k == name]
    return values[-1] if values else None


def search_words(items: Items, *, required: bool = True) -> list[str] | None:
    """The words of `q` (None when it is absent and not `required`)."""
    q = _last(items, "q")
    if q is None:
        if not required:
            return None
        raise BadRequest("Missing required parameter: q", param="q",
                         code="missing_required_parameter")
    try:
        return searchtext.query_words(q)
    except searchtext.BadQuery as exc:
        raise BadRequest(str(exc), param="q") from None


def session_filter(items: Items) -> SessionFilter:
    """`model=`, `metadata.KEY=VALUE` (repeatable, all must match), `q=` and `after=`."""
    metadata = []
    for name, value in items:
        if name.startswith(METADATA):
            key = name[len(METADATA):]
            if not key:
                raise BadRequest("metadata filters are metadata.KEY=VALUE", param=name)
            metadata.append((key, value))
    words = search_words(items, required=False)
    after = _last(items, "after")
    try:
        position = cursor.session_position(after) if after is not None else None
    except cursor.BadCursor:
        raise BadRequest("after is not a cursor from this list (next_cursor)",
                         param="after") from None
    return SessionFilter(
        model=_last(items, "model"),
        metadata=metadata,
        query=searchtext.tsquery(words) if words else None,
        after=position,
    )


def message_position(items: Items) -> tuple[int, int] | None:
    """The search list's `after=` cursor, decoded."""
    after = _last(items, "after")
    if after is None:
        return None
    try:
        return cursor.message_position(after)
    except cursor.BadCursor:
        raise BadRequest("after is not a cursor from this list (next_cursor)",
                         param="after") from None


def seq_bounds(items: Items) -> tuple[int | None, int | None, bool | None]:
    """(`after_seq`, `before_seq`, descending): `after_seq` pages up (ascending), `before_seq`
    down (descending); `descending` is None when neither is given (`order` decides)."""
    after, before = _seq(items, "after_seq"), _seq(items, "before_seq")
    if after is not None and before is not None:
        raise BadRequest("Give after_seq or before_seq, not both", param="before_seq")
    if after is None and before is None:
        return None, None, None
    order = _last(items, "order")
    descending = before is not None
    if order is not None and order != ("desc" if descending else "asc"):
        raise BadRequest("after_seq lists in ascending order and before_seq in descending "
                         "order", param="order")
    return after, before, descending


def _seq(items: Items, name: str) -> int | None:
    raw = _last(items, name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer", param=name) from None
    if not 0 <= value <= MAX_SEQ:
        raise BadRequest(f"{name} must be between 0 and {MAX_SEQ}", param=name)
    return value


def next_cursor(positions: Sequence[tuple[datetime, str]], limit: int) -> str | None:
    """The session list's cursor for the page after this one: rows were fetched with
    `limit + 1`, so a row past `limit` means there is one."""
    if len(positions) <= limit:
        return None
    moment, ident = positions[limit - 1]
    return cursor.encode(cursor.SESSIONS, moment, ident)


def next_search_cursor(positions: Sequence[tuple[int, int]], limit: int) -> str | None:
    """The search's cursor for the page after this one (as `next_cursor`)."""
    if len(positions) <= limit:
        return None
    return cursor.encode_message(*positions[limit - 1])
