"""What `/schema/openapi.json` says about the routes the proxy owns (contract §3-§6, §8, §10).

The handlers parse their bodies themselves (so that every error is the OpenAI envelope), so
Litestar cannot see their request or response types; this module tells it. `documented(...)`
returns the route decorator's keyword arguments:

- `responses`: a `ResponseSpec` per status — the success body (a model from `proxy.schemas`) and
  the OpenAI error envelope for each error status the route can answer, with an example;
- `operation_class`: an `Operation` subclass that adds the request body, the query and header
  parameters the handler reads, and the success response's headers, and drops what Litestar
  guessed on its own (its 400 for path parameters, in its own error format).

Request bodies are the JSON Schemas of the very pydantic models the handlers validate with
(`SessionFields`, `ForkBody`, ...), inlined, so the schema and the validation cannot disagree.
Nothing here runs per request: it is read once, when the schema is first served.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, cast

from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import (
    BaseSchemaObject,
    Components,
    Example,
    OpenAPIHeader,
    OpenAPIMediaType,
    OpenAPIType,
    Operation,
    Parameter,
    RequestBody,
    Schema,
    SecurityScheme,
)
from pydantic import BaseModel

from proxy import schemas
from proxy.errors import error_body
from proxy.reading import BoolQuery, ChoiceQuery, IntQuery, TextQuery
from proxy.responses.shapes import ResponseCreate, ResponseObject

DESCRIPTION = (
    "An OpenAI-compatible proxy that keeps chat history in sessions. Every error the proxy "
    "itself produces is OpenAI's error envelope (`ErrorResponse`); any route may also answer "
    "500 `internal_error`. Every response carries `X-Request-Id` (the client's, or a new one). "
    "`/v1/*` routes not listed here are passed to the upstream unchanged but for the key."
)
USER_KEY = "userKey"
ADMIN_KEY = "adminKey"


def components() -> Components:
    """The security schemes the routes refer to (`OpenAPIConfig(components=...)`)."""
    return Components(security_schemes={
        USER_KEY: SecurityScheme(
            type="http", scheme="bearer", bearer_format="sk-cp-...",
            description="A client key issued by `chatproxy keys create` or the admin API.",
        ),
        ADMIN_KEY: SecurityScheme(
            type="http", scheme="bearer",
            description="`CHATPROXY_ADMIN_KEY`; with none configured `/admin/*` answers 404.",
        ),
    })


@dataclass
class Verbatim(BaseSchemaObject):
    """A JSON value written into the document as it is (Litestar leaves out null members of the
    dicts it writes, and an error's `"param": null` or a schema must keep theirs)."""

    value: Any

    def to_schema(self) -> Any:
        return self.value


# --- errors -------------------------------------------------------------------------------------

_ERRORS: dict[int, tuple[str, str, str, str | None]] = {
    # status: (description, example code, example message, example param)
    400: ("Bad input: `invalid_json`, `invalid_value`, `missing_required_parameter`, "
          "`unknown_parameter` or (Responses) `unsupported_value`; `param` names the field.",
          "unknown_parameter", "Unknown parameter: colour", "colour"),
    401: ("Missing, unknown or revoked key (`invalid_api_key`).",
          "invalid_api_key", "Invalid API key", None),
    403: ("A user key on an admin route (`insufficient_permissions`).",
          "insufficient_permissions", "This key cannot use the admin API", None),
    413: ("The body is larger than `CHATPROXY_MAX_BODY_BYTES` (`request_too_large`).",
          "request_too_large", "Request body too large", None),
    422: ("The same `Idempotency-Key` with a different body (`idempotency_key_reused`).",
          "idempotency_key_reused", "This Idempotency-Key was used with a different request",
          None),
    429: ("Too many of this user's exports are under way (`rate_limit_exceeded`, "
          "`CHATPROXY_EXPORTS_PER_USER`); retry when one has finished.",
          "rate_limit_exceeded", "Too many exports under way for this user (at most 2); try "
          "again when one has finished", None),
    502: ("The upstream could not be reached or answered garbage (`upstream_error`).",
          "upstream_error", "The upstream could not be reached", None),
    503: ("The database cannot be reached (`database_unavailable`), every connection the "
          "upstream may have stayed busy (`upstream_busy`), or, for a chat request, the "
          "server is shutting down (`server_shutting_down`); retry shortly.",
          "database_unavailable", "The database is unavailable, try again shortly", None),
    504: ("The upstream did not answer in time (`upstream_timeout`).",
          "upstream_timeout", "The upstream did not answer in time", None),
}
NOT_FOUND = {
    "session": ("Unknown, deleted or another user's session (`session_not_found`): all alike.",
                "session_not_found", "Session sess_x not found", "session_id"),
    "admin": ("The user or key does not exist, or no admin key is configured (`not_found`).",
              "not_found", "User user_x not found", "user_id"),
    "conversation": ("Unknown, deleted or another user's conversation (`not_found`): all "
                     "alike.", "not_found", "Conversation sess_x not found", "conversation_id"),
    "item": ("Unknown or another user's conversation, or an item it does not have "
             "(`not_found`).", "not_found", "Item msg_1 not found", "item_id"),
    "response": ("Unknown, deleted, unstored (`store: false`) or another user's response, or "
                 "conversation (`not_found`).", "not_found", "Response resp_x not found",
                 "response_id"),
    "summary": ("Unknown, deleted or another user's session (`session_not_found`), or a "
                "session without a summary (`not_found`).",
                "not_found", "Session sess_x has no summary", "session_id"),
}
CONFLICT = {
    "admin": ("The name is already taken (`conflict`).",
              "conflict", "A user named 'alice' already exists", "name"),
    "idempotency": ("A retry while the first request with this `Idempotency-Key` is still "
                    "running (`idempotency_key_in_use`).", "idempotency_key_in_use",
                    "A request with this Idempotency-Key is still in progress", None),
    "summary": ("A summary job is writing this session's summary right now (`conflict`).",
                "conflict",
                "This session's summary is being written right now; try again shortly", None),
}
_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
          404: "invalid_request_error", 409: "invalid_request_error",
          413: "invalid_request_error", 422: "invalid_request_error",
          429: "invalid_request_error"}


def _error(status: int, description: str, code: str, message: str,
           param: str | None) -> ResponseSpec:
    example = error_body(message, _TYPES.get(status, "server_error"), code, param)
    return ResponseSpec(
        schemas.ErrorResponse, description=description, generate_examples=False,
        examples=[Example(summary=code, value=Verbatim(example))],
    )


# --- the operation hook ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Extra:
    """What the Operation subclass adds to Litestar's own operation."""

    success: str
    statuses: frozenset[str]
    body: dict[str, Any] | None
    body_required: bool
    body_description: str | None
    parameters: tuple[Parameter, ...]
    headers: tuple[tuple[str, str, OpenAPIType], ...]
    streams: str | None


def _operation_class(extra: _Extra) -> type[Operation]:
    @dataclass
    class Described(Operation):
        def __post_init__(self) -> None:
            if extra.body is not None:
                self.request_body = RequestBody(
                    content={"application/json": OpenAPIMediaType(
                        schema=cast(Schema, Verbatim(copy.deepcopy(extra.body))))},
                    required=extra.body_required,
                    description=extra.body_description,
                )
            if extra.parameters:
                self.parameters = [*(self.parameters or []), *extra.parameters]
            responses = self.responses or {}
            for status in [s for s in responses if s not in extra.statuses]:
                del responses[status]  # e.g. Litestar's own 400 for path parameters
            success = responses.get(extra.success)
            if success is not None and not isinstance(success, dict):
                response = cast(Any, success)
                if extra.headers:
                    response.headers = {
                        name: OpenAPIHeader(schema=Schema(type=kind), description=text)
                        for name, text, kind in extra.headers
                    }
                if extra.streams and response.content is not None:
                    response.content["text/event-stream"] = OpenAPIMediaType(
                        schema=Schema(type=OpenAPIType.STRING, description=extra.streams))

    return Described


def request_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A pydantic model's JSON Schema with its `$defs` inlined and defaults left out (a value a
    client leaves out is left unchanged on update, or the configured default on create)."""
    schema = model.model_json_schema(mode="validation")
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, list):
            return [inline(v) for v in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return inline(defs[ref.removeprefix("#/$defs/")])
        result = {k: inline(v) for k, v in node.items() if k not in ("default", "title")}
        if isinstance(node.get("properties"), dict):  # field names are kept, whatever they are
            result["properties"] = {k: inline(v) for k, v in node["properties"].items()}
        return result

    result: dict[str, Any] = inline(schema)
    return result


# --- parameters -----------------------------------------------------------------------------------


def query(spec: IntQuery | BoolQuery | ChoiceQuery | TextQuery) -> Parameter:
    """A query parameter as its handler reads it (proxy/reading.py)."""
    if isinstance(spec, TextQuery):
        return Parameter(name=spec.name, param_in="query", required=spec.required,
                         description=spec.description,
                         schema=Schema(type=OpenAPIType.STRING, max_length=spec.max_length))
    if isinstance(spec, IntQuery):
        schema = Schema(type=OpenAPIType.INTEGER, minimum=spec.low, maximum=spec.high)
    elif isinstance(spec, BoolQuery):
        schema = Schema(type=OpenAPIType.BOOLEAN)
    else:
        schema = Schema(type=OpenAPIType.STRING, enum=list(spec.choices))
    return Parameter(name=spec.name, param_in="query", required=False,
                     description=spec.description, schema=schema)


def header(name: str, description: str, **schema: Any) -> Parameter:
    return Parameter(name=name, param_in="header", required=False, description=description,
                     schema=Schema(type=OpenAPIType.STRING, **schema))


def documented(
    status: int,
    answer: Any,
    description: str,
    *errors: int,
    body: type[BaseModel] | None = None,
    body_required: bool = False,
    body_description: str | None = None,
    not_found: str = "session",
    conflict: str = "admin",
    parameters: tuple[Parameter, ...] = (),
    headers: tuple[tuple[str, str, OpenAPIType], ...] = (),
    streams: str | None = None,
    admin: bool = False,
) -> dict[str, Any]:
    """The route decorator's OpenAPI keyword arguments.

    `status`/`answer` is the success status and its body model (None: no body); `errors` the
    error statuses the route can answer; `streams` describes the success answer's
    `text/event-stream` form, when it has one. Every route may also answer 500 `internal_error`.
    """
    responses: dict[int, ResponseSpec] = {
        status: ResponseSpec(answer, description=description, generate_examples=False)
    }
    for code in errors:
        if code == 404:
            responses[code] = _error(404, *NOT_FOUND[not_found])
        elif code == 409:
            responses[code] = _error(409, *CONFLICT[conflict])
        else:
            responses[code] = _error(code, *_ERRORS[code])
    responses = dict(sorted(responses.items()))
    extra = _Extra(
        success=str(status),
        statuses=frozenset(str(s) for s in responses),
        body=request_schema(body) if body is not None else None,
        body_required=body_required,
        body_description=body_description,
        parameters=parameters,
        headers=headers,
        streams=streams,
    )
    return {
        "responses": responses,
        "operation_class": _operation_class(extra),
        "security": [{ADMIN_KEY if admin else USER_KEY: []}],
    }


# --- the chat route -------------------------------------------------------------------------------

_HISTORY = " (with a session only)"
CHAT_COMPLETIONS = {
    "tags": ["chat"],
    "summary": "Chat completion, with a session's history",
    "description": (
        "OpenAI's chat completions. With `session_id` (body) or `X-Session-Id` (header) the "
        "session's history is injected between the request's leading system/developer "
        "messages and the rest, and the request's messages and the reply are stored as one "
        "turn before the response completes. Without, a transparent proxy. The body goes to "
        "the upstream its `model` picks, with that upstream's key.\n\n"
        "An upstream HTTP error is passed through unchanged (status, body, `Retry-After`); "
        "the errors below are the proxy's own."
    ),
    **documented(
        200, dict[str, Any],
        "The upstream's answer as it sent it: a chat completion, or (with `stream: true`) "
        "its server-sent events",
        400, 401, 404, 409, 413, 422, 502, 503, 504,
        body=schemas.ChatCompletionRequest, body_required=True,
        conflict="idempotency",
        parameters=(
            header("X-Session-Id", "the session, instead of `session_id` in the body (both "
                   "present and different: 400)"),
            header("Idempotency-Key", "a retry with the same key (scoped to the caller, kept "
                   "24 hours) gets the stored response again, without a second upstream call",
                   max_length=255),
        ),
        headers=(
            ("X-Session-Id", "the session" + _HISTORY, OpenAPIType.STRING),
            ("X-History-Messages", "stored messages injected" + _HISTORY, OpenAPIType.INTEGER),
            ("X-History-Tokens", "their tokens" + _HISTORY, OpenAPIType.INTEGER),
            ("X-History-Dropped", "stored messages of the window (less those the request "
             "resent) left out: for the token budget, at the window's edge, or in a tool "
             "exchange never wholly answered" + _HISTORY, OpenAPIType.INTEGER),
            ("X-History-Stored", "messages the session held before this turn" + _HISTORY,
             OpenAPIType.INTEGER),
            ("X-History-Overlap", "request messages (after its leading system/developer ones) "
             "recognised as the session's newest stored messages, resent by a client that "
             "keeps its own history: neither stored again nor injected; absent when none",
             OpenAPIType.INTEGER),
            ("X-History-Summary-Seq", "the newest seq the session's summary covers, when the "
             "turn carries it (right after the head)" + _HISTORY, OpenAPIType.INTEGER),
            ("X-History-Retried", "`1` when the upstream refused the turn as too long for its "
             "context and it was sent again with less history" + _HISTORY, OpenAPIType.STRING),
            ("Idempotent-Replayed", "`true` on a response served again for a repeated "
             "Idempotency-Key", OpenAPIType.STRING),
        ),
        streams="Server-sent events exactly as the upstream sent them, ending with "
        "`data: [DONE]` once the turn is stored, or with a final `data: {\"error\": {...}}` "
        "event when the upstream broke off.",
    ),
}

# --- the Responses route --------------------------------------------------------------------------

RESPONSES_CREATE = {
    "tags": ["responses"],
    "summary": "Create a response (OpenAI's Responses API, over chat completions)",
    "description": (
        "One chat completions request to the upstream `model` picks: `instructions` as the "
        "head system message, then the history (the `conversation`'s, trimmed as contract §7 "
        "says, or the `previous_response_id` chain's), then `input`. The turn is stored "
        "before the response completes: in the conversation, and, unless `store: false`, as "
        "a response `GET /v1/responses/{id}` answers. An upstream HTTP error is passed "
        "through unchanged; the errors below are the proxy's own."
    ),
    **documented(
        200, ResponseObject, "The response, or (with `stream: true`) its events",
        400, 401, 404, 409, 413, 422, 502, 503, 504,
        body=ResponseCreate, body_required=True, conflict="idempotency",
        not_found="response",
        parameters=(
            header("Idempotency-Key", "a retry with the same key (scoped to the caller, kept "
                   "24 hours) gets the stored response again, without a second upstream call",
                   max_length=255),
        ),
        headers=(
            ("Idempotent-Replayed", "`true` on a response served again for a repeated "
             "Idempotency-Key", OpenAPIType.STRING),
        ),
        streams="OpenAI's Responses events (`event:` and `data:` lines, `sequence_number` "
        "from 0): `response.created`, `response.in_progress`, `response.output_item.added`, "
        "`response.content_part.added`, `response.output_text.delta`…, "
        "`response.function_call_arguments.delta`…, the matching `.done` events, then "
        "`response.completed` (or `response.incomplete` / `response.failed`), sent once the "
        "turn is stored.",
    ),
}
