"""Reading a request: JSON bodies, query integers, the caller's identity.

Every failure here is a 400/401 in the OpenAI envelope, raised before any database write or
upstream call.
"""

from __future__ import annotations

from typing import Any, NoReturn, TypeVar

from litestar import Request
from pydantic import BaseModel, ValidationError

from proxy import auth, codec, db, store
from proxy.app import Runtime, runtime
from proxy.errors import BadRequest, DatabaseUnavailable, SessionNotFound, Unauthorized
from proxy.incoming import Incoming

MAX_JSON_DEPTH = 64
MAX_ID_LENGTH = 64
MAX_OFFSET = 2_147_483_647  # beyond any real list, and within what PostgreSQL's OFFSET takes
T = TypeVar("T", bound=BaseModel)


def is_object_id(value: object) -> bool:
    """Whether `value` has the shape of one of our ids (`sess_`, `user_`, `key_` + letters and
    digits, or alike).

    Anything else names nothing, so it is answered 404 without a query: PostgreSQL cannot even
    take some strings (a NUL, a lone surrogate) as a parameter.
    """
    return (
        isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH and value.isascii()
        and value.replace("_", "").isalnum()
    )


def is_session_id(value: object) -> bool:
    return is_object_id(value)


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


def query_int(
    request: Request[Any, Any, Any], name: str, default: int, low: int, high: int | None = None
) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer", param=name) from None
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise BadRequest(f"{name} must be {bound}", param=name)
    return value


def query_bool(request: Request[Any, Any, Any], name: str) -> bool:
    raw = request.query_params.get(name)
    if raw is None:
        return False
    lowered = raw.lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise BadRequest(f"{name} must be true or false", param=name)


class ExactText(BaseModel):
    """A request body whose strings are stored exactly (`codec.pack_text`): `parse_model` takes
    lone surrogates in it, which pydantic alone refuses. Other bodies (names, ids) refuse them.
    """


def parse_model(model: type[T], data: Any) -> T:
    """Validate `data` against `model`; the first problem becomes a 400 naming its field."""
    if not isinstance(data, dict):
        raise BadRequest("The request body must be a JSON object", code="invalid_value")
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as exc:
        if not issubclass(model, ExactText) or not any(
            e["type"] == "string_unicode" for e in exc.errors()
        ):
            _refuse(exc)
    # pydantic cannot hold a lone surrogate, which a client may send and must get back as sent:
    # validate a stand-in of the same length, then put the original characters back.
    try:
        parsed = model.model_validate(_swap(data), strict=True)
    except ValidationError as exc:
        _refuse(exc)
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


async def authenticate(
    request: Request[Any, Any, Any], *, stores_nothing: bool = False
) -> str:
    """The caller's user id; 401 for a missing, malformed, unknown or revoked key.

    With the database down this is a 503, except for a route that `stores_nothing` called with
    a key confirmed moments ago (proxy/keylease.py). A `{session_id}` in the path
    that cannot be a session id is a 404 here, before anything passes it to PostgreSQL.
    """
    key_hash = auth.client_key_hash(request.headers.get("authorization"))
    user_id = await verify_key(runtime(request), key_hash, stores_nothing=stores_nothing)
    path_id = request.path_params.get("session_id")
    if path_id is not None and not is_session_id(path_id):
        raise SessionNotFound(str(path_id))
    # For the access log line (proxy/logs.py): the id only, never the key or the user's name.
    request.scope["state"]["user_id"] = user_id
    return user_id


async def verify_key(rt: Runtime, key_hash: bytes, *, stores_nothing: bool = False) -> str:
    """The user id of the key hashed as `key_hash` (`auth.client_key_hash`; see `authenticate`).

    Answered without the database while the lease vouches for the key (proxy/keylease.py).
    """
    keys = rt.keys
    user_id = keys.user(key_hash)
    if user_id is not None:
        return user_id
    generation = keys.generation
    try:
        async with db.connection(rt.pool, rt.settings.db_acquire_timeout) as conn:
            user_id = await store.user_for_key(conn, key_hash)
    except DatabaseUnavailable:
        user_id = keys.recent(key_hash) if stores_nothing else None
        if user_id is None:
            raise
    else:
        if user_id is None:
            keys.forget(key_hash)
            raise Unauthorized("Invalid API key")
        keys.remember(key_hash, user_id, generation)
    return user_id


def addressed(request: Request[Any, Any, Any], session_id: str) -> None:
    """Name the caller's session this request found (or created) in its access log line.

    Only once found: an id that named no session of the caller's is never logged.
    """
    request.scope["state"]["session_id"] = session_id
