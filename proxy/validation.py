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
    parsed = model.model_validate(_swap(data), strict=True)
    _restore(parsed)
    return parsed


# Lone surrogates <-> the first 2048 code points of Supplementary Private Use Area-A. The swap
# is its own inverse, so text that already holds such characters comes back unchanged too.
_SWAP = {c: c - 0xD800 + 0xF0000 for c in range(0xD800, 0xE000)}
_SWAP |= {v: k for k, v in _SWAP.items()}


def _swap(value: Any) -> Any:
    if isinstance(value, str):
        return value if value.isascii() else value.translate(_SWAP)
    if isinstance(value, dict):
        return {_swap(k): _swap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_swap(v) for v in value]
    if isinstance(value, BaseModel):
        _restore(value)
    return value


def _restore(model: BaseModel) -> None:
    for name in type(model).model_fields:
        if name in model.__dict__:
            model.__dict__[name] = _swap(model.__dict__[name])
    extra = model.__pydantic_extra__
    if extra:
        for name in list(extra):
            extra[_swap(name)] = _swap(extra.pop(name))


def _refuse(exc: ValidationError) -> NoReturn:
    """The first problem pydantic found, as a 400 naming its field."""
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    kind = first["type"]
    if kind == "extra_forbidden":
        raise BadRequest(f"Unknown parameter: {param}", param=param,
                         code="unknown_parameter") from None
    if kind == "missing":
        raise BadRequest(f"Missing required parameter: {param}", param=param,
                         code="missing_required_parameter") from None
    raise BadRequest(f"Invalid value for {param}: {_reason(first)}", param=param) from None


def _reason(error: Any) -> str:
    # pydantic's messages describe the rule, never echo the input.
    return str(error.get("msg", "invalid value")).rstrip(".")
