"""Reading a request: its JSON body and its query parameters (a body's model: proxy/validation.py).

Every failure here is a 400 in the OpenAI envelope, raised before any database write or upstream
call. Works on Litestar's `Request` and on the raw chat request (proxy/rawrequest.py) alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from litestar import Request

from proxy import codec
from proxy.errors import BadRequest
from proxy.rawrequest import Incoming

MAX_JSON_DEPTH = 64
MAX_OFFSET = 2_147_483_647  # beyond any real list, and within what PostgreSQL's OFFSET takes


def json_content_type(
    request: Request[Any, Any, Any] | Incoming, *, missing: bool = True
) -> bool:
    """Whether the body is declared JSON; `missing` is the answer without a Content-Type."""
    value = request.headers.get("content-type")
    if value is None:
        return missing
    media = value.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


async def read_json(request: Request[Any, Any, Any] | Incoming, *, empty: Any = None) -> Any:
    """The decoded body; `empty` when there is none (or 400 when `empty` is None)."""
    if not json_content_type(request):
        raise BadRequest("Content-Type must be application/json", code="invalid_value")
    raw = await request.body()
    if not raw.strip():
        if empty is not None:
            return empty
        raise BadRequest("The request body must be a JSON object", code="invalid_json")
    try:
        value = codec.loads_strict(raw)  # NaN, Infinity, 1e400: refused, never changed
    except codec.InvalidJSON:
        raise BadRequest("The request body is not valid JSON", code="invalid_json") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise BadRequest(f"JSON nested deeper than {MAX_JSON_DEPTH} levels", code="invalid_json")
    return value


def _depth(value: Any) -> int:
    """Nesting depth, iteratively (a hostile body must not exhaust the stack)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            deepest = max(deepest, level)
            if level <= MAX_JSON_DEPTH:
                stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            deepest = max(deepest, level)
            if level <= MAX_JSON_DEPTH:
                stack.extend((v, level + 1) for v in item)
    return deepest


# Query parameters: each is stated once, read by its handler and documented from the same
# statement (proxy/openapi.py `query`).


@dataclass(frozen=True, slots=True)
class IntQuery:
    """An integer from `low` to `high`; `default` when it is not sent."""

    name: str
    default: int
    low: int
    high: int
    description: str

    def read(self, request: Request[Any, Any, Any]) -> int:
        raw = request.query_params.get(self.name)
        if raw is None:
            return self.default
        try:
            value = int(raw)
        except ValueError:
            raise BadRequest(f"{self.name} must be an integer", param=self.name) from None
        if not self.low <= value <= self.high:
            raise BadRequest(
                f"{self.name} must be between {self.low} and {self.high}", param=self.name
            )
        return value


@dataclass(frozen=True, slots=True)
class BoolQuery:
    """`true`/`1` or `false`/`0` (any case); false when it is not sent."""

    name: str
    description: str

    def read(self, request: Request[Any, Any, Any]) -> bool:
        raw = request.query_params.get(self.name)
        if raw is None:
            return False
        lowered = raw.lower()
        if lowered in ("true", "1"):
            return True
        if lowered in ("false", "0"):
            return False
        raise BadRequest(f"{self.name} must be true or false", param=self.name)


@dataclass(frozen=True, slots=True)
class ChoiceQuery:
    """One of `choices`; the first when it is not sent."""

    name: str
    choices: tuple[str, ...]
    description: str

    def read(self, request: Request[Any, Any, Any]) -> str:
        value: str = request.query_params.get(self.name, self.choices[0])
        if value not in self.choices:
            raise BadRequest(f"{self.name} must be {' or '.join(self.choices)}", param=self.name)
        return value


@dataclass(frozen=True, slots=True)
class TextQuery:
    """A string parameter, documented here and read by the handler that owns its rules
    (search words, filters and cursors: proxy/listing.py)."""

    name: str
    description: str
    max_length: int | None = None
    required: bool = False

