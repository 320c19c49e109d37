"""JSON in and out, exactly: fast msgspec first, the stdlib where only it is faithful.

msgspec refuses lone surrogates (`"\\ud800"`), which clients may legally send and which must
come back character for character; the stdlib decodes them and, with `ensure_ascii`, writes them
back as the same escapes. Both paths produce the same Python values.

`loads_strict` is for what a client sends: JSON as RFC 8259 has it, so `NaN`, `Infinity` and a
number beyond a float's range (`1e400`) are refused on both paths (msgspec refuses them itself; the
stdlib would take them, and they would go upstream or into storage changed). `loads` stays lenient
for what upstreams send, which has been seen to carry `-Infinity` in logprobs.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


class InvalidJSON(ValueError):
    """The bytes are not one JSON document."""


def loads(data: bytes | str) -> Any:
    try:
        return _decode(data)
    except RecursionError:  # nested past msgspec's own limit: no parser will take it
        raise InvalidJSON("not valid JSON") from None
    except msgspec.DecodeError:
        pass
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise InvalidJSON("not valid JSON") from None


def loads_strict(data: bytes | str) -> Any:
    """`loads` for client input: NaN, Infinity and out-of-range numbers are InvalidJSON."""
    try:
        return _decode(data)
    except RecursionError:
        raise InvalidJSON("not valid JSON") from None
    except msgspec.DecodeError:
        pass
    try:  # the stdlib only for what msgspec cannot hold (lone surrogates): the rare path
        return json.loads(data, parse_constant=_no_constant, parse_float=_finite_float)
    except (ValueError, RecursionError):
        raise InvalidJSON("not valid JSON") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (_INF, -_INF):  # a literal beyond a float's range, such as 1e400
        raise ValueError("number out of range")
    return value


_INF = float("inf")


def dumps(value: Any) -> bytes:
    """Compact JSON as UTF-8; lone surrogates become `\\uXXXX` escapes.

    `msgspec.Raw` values (already-encoded JSON, such as stored history) are spliced in as they are.
    """
    try:
        return _encode(value)
    except UnicodeEncodeError:
        return json.dumps(
            value, ensure_ascii=True, separators=(",", ":"), default=_raw_default
        ).encode()


def _raw_default(value: Any) -> Any:
    if isinstance(value, msgspec.Raw):
        return loads(bytes(value))
    raise TypeError(f"cannot encode {type(value).__name__}")


def dumps_text(value: Any) -> str:
    """Like `dumps`, as str, always storable in a PostgreSQL `text` column (no NUL byte)."""
    return dumps(value).decode()


def pack_text(value: str | None) -> str | None:
    """A str PostgreSQL `text`/`jsonb` can keep; `unpack_text` returns the original exactly."""
    if value is None:
        return None
    if value.startswith("\x01") or "\x00" in value or not _is_utf8(value):
        return "\x01" + json.dumps(value, ensure_ascii=True)
    return value


def unpack_text(value: str | None) -> str | None:
    if value is None or not value.startswith("\x01"):
        return value
    result: str = json.loads(value[1:])
    return result


def _is_utf8(value: str) -> bool:
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True
