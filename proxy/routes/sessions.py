"""The sessions API (contract §5), under `/v1/chat/sessions` and `/chat/sessions`.

Every lookup is scoped to the caller: another user's session is the same 404 as a missing one.
"""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, delete, get, patch, post, put
from pydantic import ConfigDict, Field

from proxy import codec, db, schemas
from proxy.access import addressed, authenticate
from proxy.errors import SessionNotFound
from proxy.openapi import documented, query
from proxy.reading import MAX_OFFSET, BoolQuery, ChoiceQuery, IntQuery, read_json
from proxy.routes import paths
from proxy.runtime import runtime
from proxy.schemas import (
    ExactText,
    HistoryMessages,
    HistoryTokens,
    Metadata,
    ModelName,
    SessionName,
)
from proxy.store import messages, sessions
from proxy.validation import parse_model

# What the handlers answer: JSON objects (so the OpenAPI schema says so), encoded by `_json`.
Answer = Response[dict[str, Any]]


class SessionFields(ExactText):
    """The fields a client may set; anything else is 400 unknown_parameter."""

    model_config = ConfigDict(extra="forbid")

    session_name: SessionName = None
    model: ModelName = None
    system_prompt: str | None = None
    max_history_messages: HistoryMessages = 20
    max_history_tokens: HistoryTokens | None = None
    metadata: Metadata = Field(default_factory=dict)


def _given(body: SessionFields) -> dict[str, Any]:
    return {name: getattr(body, name) for name in body.model_fields_set}


def _json(value: Any, status_code: int = 200) -> Response[Any]:
    # Encoded here: session text may hold lone surrogates, which only codec.dumps writes.
    return Response(codec.dumps(value), status_code=status_code, media_type="application/json")


TAGS = ["sessions"]
SESSIONS_LIMIT = IntQuery("limit", 20, 1, 100, "page size")
MESSAGES_LIMIT = IntQuery("limit", 50, 1, 500, "page size")
OFFSET = IntQuery("offset", 0, 0, MAX_OFFSET, "how many to skip")
INCLUDE_INACTIVE = BoolQuery(
    "include_inactive", "also list deleted sessions not yet purged (`true` / `false`)")
ORDER = ChoiceQuery("order", ("asc", "desc"), "by `seq`")
SESSION_BODY = "Any of these fields; anything else is 400 `unknown_parameter`."


@post(paths(), status_code=201, tags=TAGS, summary="Create a session", **documented(
    201, schemas.Session, "The new session", 400, 401, 413, 503,
    body=SessionFields, body_description=SESSION_BODY,
))
async def create_session(request: Request[Any, Any, Any]) -> Answer:
    user_id = await authenticate(request)
    rt = runtime(request)
    body = parse_model(SessionFields, await read_json(request, empty={}))
    fields = _given(body)
    fields.setdefault("max_history_messages", rt.settings.default_max_history_messages)
    async with db.connection(rt.pool, rt.settings.db_acquire_timeout) as conn:
        session = await sessions.create_session(conn, user_id, fields)
    addressed(request, session["id"])
    return _json(session, 201)


@get(paths(), tags=TAGS, summary="List the caller's sessions", **documented(
    200, schemas.SessionList, "The caller's sessions, most recent activity first", 400, 401, 503,
    parameters=(
        query(SESSIONS_LIMIT), query(OFFSET), query(INCLUDE_INACTIVE),
    ),
))
async def list_sessions(request: Request[Any, Any, Any]) -> Answer:
    user_id = await authenticate(request)
    rt = runtime(request)
    limit = SESSIONS_LIMIT.read(request)
    offset = OFFSET.read(request)
    include_inactive = INCLUDE_INACTIVE.read(request)
    async with db.connection(rt.pool, rt.settings.db_acquire_timeout) as conn:
        async with conn.transaction(isolation="repeatable_read", readonly=True):  # one snapshot
            data, total = await sessions.list_sessions(
                conn, user_id, limit, offset, include_inactive
            )
    return _json(_page(data, total, limit, offset))


def _page(data: list[dict[str, Any]], total: int, limit: int, offset: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "total": total,
        "limit": limit,
        "offset": offset,
        "has_more": offset + len(data) < total,
    }


@get(paths("/{session_id:str}"), tags=TAGS, summary="Get a session", **documented(
    200, schemas.Session, "The session", 401, 404, 503,
))
async def get_session(request: Request[Any, Any, Any], session_id: str) -> Answer:
    user_id = await authenticate(request)
    rt = runtime(request)
    async with db.connection(rt.pool, rt.settings.db_acquire_timeout) as conn:
        session = await sessions.get_session(conn, user_id, session_id)
    if session is None:
        raise SessionNotFound(session_id)
    addressed(request, session_id)
    return _json(session)


async def _update(request: Request[Any, Any, Any], session_id: str) -> Answer:
    user_id = await authenticate(request)
    rt = runtime(request)
    body = parse_model(SessionFields, await read_json(request, empty={}))
    async with db.connection(rt.pool, rt.settings.db_acquire_timeout) as conn:
        session = await sessions.update_session(conn, user_id, session_id, _given(body))
    if session is None:
        raise SessionNotFound(session_id)
    addressed(request, session_id)
    return _json(session)


_UPDATE = documented(
    200, schemas.Session, "The updated session", 400, 401, 404, 413, 503,
    body=SessionFields, body_description="The fields to change; the others stay as they are.",
)


@put(paths("/{session_id:str}"), tags=TAGS, summary="Update a session", **_UPDATE)
async def put_session(request: Request[Any, Any, Any], session_id: str) -> Answer:
    return await _update(request, session_id)


@patch(paths("/{session_id:str}"), tags=TAGS, summary="Update a session", **_UPDATE)
async def patch_session(request: Request[Any, Any, Any], session_id: str) -> Answer:
    return await _update(request, session_id)


@delete(paths("/{session_id:str}"), status_code=204, tags=TAGS, summary="Delete a session",
        description="A soft delete: `is_active` becomes false and the session answers 404 "
        "everywhere until it is restored, or purged by the retention job.",
        **documented(204, None, "Deleted", 401, 404, 503))
async def delete_session(request: Request[Any, Any, Any], session_id: str) -> Response[None]:
    user_id = await authenticate(request)
    rt = runtime(request)
    async with db.connection(rt.pool, rt.settings.db_acquire_timeout) as conn:
        deleted = await sessions.soft_delete_session(conn, user_id, session_id)
    if not deleted:
        raise SessionNotFound(session_id)
    addressed(request, session_id)
    return Response(None, status_code=204)


@get(paths("/{session_id:str}/messages"), tags=TAGS, summary="List a session's messages",
     **documented(
         200, schemas.MessageList, "The session's stored messages", 400, 401, 404, 503,
         parameters=(
             query(MESSAGES_LIMIT), query(OFFSET), query(ORDER),
         ),
     ))
async def list_messages(request: Request[Any, Any, Any], session_id: str) -> Answer:
    user_id = await authenticate(request)
    rt = runtime(request)
    limit = MESSAGES_LIMIT.read(request)
    offset = OFFSET.read(request)
    order = ORDER.read(request)
    async with db.connection(rt.pool, rt.settings.db_acquire_timeout) as conn:
        # One snapshot, so that `total` and `has_more` agree with the page.
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            session = await sessions.get_session(conn, user_id, session_id)
            if session is None:
                raise SessionNotFound(session_id)
            data = await messages.list_messages(conn, session_id, limit, offset, order == "desc")
    addressed(request, session_id)
    return _json(_page(data, session["message_count"], limit, offset))


handlers = [
    create_session,
    list_sessions,
    get_session,
    put_session,
    patch_session,
    delete_session,
    list_messages,
]
