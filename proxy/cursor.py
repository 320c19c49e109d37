"""Opaque keyset cursors (`after=`, `next_cursor`): a position in a list, as a URL-safe token.

A position is the sort key of the last row of a page. For the session list: its activity
timestamp (to the microsecond, exactly as stored) and its id, which breaks ties (the token is
base64url of `s|microseconds|id`). For search results: the message's id and seq
(`m|id|seq`). The first field names the list, so that one list's cursor is refused by
another. A cursor only says where to continue: every query is still scoped to the caller, so a
forged one can show nothing that is not the caller's. Anything that does not decode is
`BadCursor`.
"""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime, timedelta

SESSIONS = "s"
MESSAGES = "m"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_LENGTH = 200
_MAX_BIGINT = 2**63 - 1


class BadCursor(ValueError):
    """Not a cursor this list handed out."""


def encode(kind: str, moment: datetime, ident: str | int) -> str:
    micros = (moment - _EPOCH) // timedelta(microseconds=1)
    raw = f"{kind}|{micros}|{ident}".encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _raw(token: str) -> str:
    if not token or len(token) > _MAX_LENGTH or not token.isascii():
        raise BadCursor("not a cursor")
    try:
        return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadCursor("not a cursor") from None


def _decode(kind: str, token: str) -> tuple[datetime, str]:
    raw = _raw(token)
    try:
        tag, micros, ident = raw.split("|")
        moment = _EPOCH + timedelta(microseconds=int(micros))
    except (ValueError, OverflowError):
        raise BadCursor("not a cursor") from None
    if tag != kind or not ident:
        raise BadCursor("not a cursor for this list")
    return moment, ident


def session_position(token: str) -> tuple[datetime, str]:
    """(activity, session id) from a session list cursor."""
    moment, ident = _decode(SESSIONS, token)
    if len(ident) > 64 or not ident.replace("_", "").isalnum():
        raise BadCursor("not a cursor")
    return moment, ident


def encode_message(message_id: int, seq: int) -> str:
    raw = f"{MESSAGES}|{message_id}|{seq}".encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def message_position(token: str) -> tuple[int, int]:
    """(message id, seq) from a search cursor."""
    raw = _raw(token)
    try:
        tag, message_id, seq = raw.split("|")
    except ValueError:
        raise BadCursor("not a cursor") from None
    if tag != MESSAGES:
        raise BadCursor("not a cursor for this list")
    if not (message_id.isdigit() and seq.isdigit()):
        raise BadCursor("not a cursor")
    if not (0 < int(message_id) <= _MAX_BIGINT and 0 <= int(seq) <= _MAX_BIGINT):
        raise BadCursor("not a cursor")
    return int(message_id), int(seq)
