"""A request body validated against a pydantic model: strictly, and keeping exact text.

`parse_model` is a route's body check: the first problem becomes a 400 naming its field.
`validated` is the check alone, for a caller that words its own errors (proxy/document.py).
Models that subclass `schemas.ExactText` take lone surrogates, which pydantic alone refuses.
"""

from __future__ import annotations

from typing import Any, NoReturn, TypeVar

from pydantic import BaseModel, ValidationError

from proxy.errors import BadRequest
from proxy.schemas import ExactText

T = TypeVar("T", bound=BaseModel)


def parse_model(model: type[T], data: Any) -> T:
    """Validate `data` against `model`; the first problem becomes a 400 naming its field."""
    if not isinstance(data, dict):
        raise BadRequest("The request body must be a JSON object", code="invalid_value")
    try:
        return validated(model, data)
    except ValidationError as exc:
        _refuse(exc)


def validated(model: type[T], data: Any) -> T:
    """`data` validated strictly against `model` (pydantic's ValidationError when it fails).

    For an `ExactText` model, lone surrogates in `data`'s strings are taken and kept.
    """
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as exc:
        if not issubclass(model, ExactText) or not any(
            e["type"] == "string_unicode" for e in exc.errors()
        ):
            raise
    # pydantic cannot hold a lone surrogate, which a client may send and must get back as sent:
    # validate a stand-in of the same length, then put the original characters back.
    there, back = _stand_ins(data)
    parsed = model.model_validate(_translated(data, there), strict=True)
    _restore(parsed, back)
    return parsed


# Stand-ins for lone surrogates: code points the data does not hold anywhere, private-use ones
# first. Chosen for each document, so that putting the surrogates back (the inverse table,
# over every string) can never change a character the client sent: no string collides.
_CANDIDATES = (range(0xF0000, 0xFFFFE), range(0x100000, 0x10FFFE), range(0xE000, 0xF900),
               range(0x80, 0xD800), range(0xF900, 0x10000), range(0x10000, 0xF0000))


def _stand_ins(data: Any) -> tuple[dict[int, int], dict[int, int]]:
    """(surrogate -> stand-in, stand-in -> surrogate) for the lone surrogates in `data`."""
    used: set[str] = set()
    _alphabet(data, used)
    surrogates = sorted(c for c in used if 0xD800 <= ord(c) < 0xE000)
    free = (p for block in _CANDIDATES for p in block if chr(p) not in used)
    there = {ord(c): p for c, p in zip(surrogates, free, strict=False)}
    if len(there) < len(surrogates):  # every code point but a few is in the body: no stand-in
        raise BadRequest("The request holds too many distinct characters to be checked")
    return there, {p: c for c, p in there.items()}


def _alphabet(value: Any, used: set[str]) -> None:
    if isinstance(value, str):
        used.update(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            _alphabet(key, used)
            _alphabet(item, used)
    elif isinstance(value, list):
        for item in value:
            _alphabet(item, used)


def _translated(value: Any, table: dict[int, int]) -> Any:
    if isinstance(value, str):
        return value if value.isascii() else value.translate(table)
    if isinstance(value, dict):
        return {_translated(k, table): _translated(v, table) for k, v in value.items()}
    if isinstance(value, list):
        return [_translated(v, table) for v in value]
    if isinstance(value, BaseModel):
        _restore(value, table)
    return value


def _restore(model: BaseModel, back: dict[int, int]) -> None:
    for name in type(model).model_fields:
        if name in model.__dict__:
            model.__dict__[name] = _translated(model.__dict__[name], back)
    extra = model.__pydantic_extra__
    if extra:
        for name in list(extra):
            extra[_translated(name, back)] = _translated(extra.pop(name), back)


def _refuse(exc: ValidationError) -> NoReturn:
    """The first problem pydantic found, as a 400 naming its field."""
    first = exc.errors()[0]
    param = _param(first["loc"])
    kind = first["type"]
    if kind == "extra_forbidden":
        raise BadRequest(f"Unknown parameter: {param}", param=param,
                         code="unknown_parameter") from None
    if kind == "missing":
        raise BadRequest(f"Missing required parameter: {param}", param=param,
                         code="missing_required_parameter") from None
    raise BadRequest(f"Invalid value for {param}: {_reason(first)}", param=param) from None


def _param(loc: tuple[int | str, ...]) -> str | None:
    """pydantic's location as the API names fields elsewhere: `items[1].role`, `metadata.k`."""
    param = ""
    for part in loc:
        param += f"[{part}]" if isinstance(part, int) else f".{part}" if param else str(part)
    return param or None


def _reason(error: Any) -> str:
    # pydantic's messages describe the rule, never echo the input.
    return str(error.get("msg", "invalid value")).rstrip(".")
