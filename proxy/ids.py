"""The ids the proxy makes (`sess_…`, `user_…`, `key_…`), and the shape a client's id must have.

An id that does not have the shape names nothing, so it is answered without a query (PostgreSQL
cannot even take some strings, a NUL or a lone surrogate, as a parameter) and is never echoed.
"""

from __future__ import annotations

import secrets
import string

MAX_ID_LENGTH = 64
_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str, length: int = 24) -> str:
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(length))


def is_object_id(value: object) -> bool:
    """Whether `value` has the shape of one of our ids (a prefix + letters and digits, or alike)."""
    return (
        isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH and value.isascii()
        and value.replace("_", "").isalnum()
    )


def is_session_id(value: object) -> bool:
    """Whether `value` has the shape of a session id (`sess_` + letters and digits, or alike)."""
    return is_object_id(value)
