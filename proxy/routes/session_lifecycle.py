"""The session lifecycle routes (contract §5): restore, clear, export, import, fork, merge.

Served under both session prefixes, with the sessions API's ownership rule: another user's
session is the same 404 as a missing one. The SQL is in `proxy.store.lifecycle`; the export
document's shape and validation in `proxy.document`.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

from litestar import Request, Response, delete, get, post
from pydantic import BaseModel, ConfigDict, Field

from proxy import codec, db, document, exports, retention, schemas
from proxy.access import addressed, authenticate
from proxy.errors import SessionNotFound
from proxy.ids import is_session_id
from proxy.openapi import documented
from proxy.reading import read_json
from proxy.routes import paths
from proxy.runtime import runtime
from proxy.schemas import ExactText, SessionName
from proxy.store import lifecycle
from proxy.streamresponse import ClosingStream
from proxy.validation import parse_model

MAX_SEQ = 2**62
TAGS = ["session lifecycle"]


def _json(value: Any, status_code: int = 200) -> Response[bytes]:
    # Encoded here: session and message text may hold lone surrogates.
    return Response(codec.dumps(value), status_code=status_code, media_type="application/json")


@post(paths("/{session_id:str}/restore"), status_code=200, tags=TAGS,
      summary="Restore a deleted session",
      description="Resumes a soft-deleted session that the retention job has not purged yet.",
      **documented(200, schemas.Session, "The session, active again", 401, 404, 503))
async def restore_session(request: Request[Any, Any, Any], session_id: str) -> Response[bytes]:
    user_id = await authenticate(request)
    rt = runtime(request)
    async with db.connection(rt.pool, rt.settings.db_acquire_timeout) as conn:
        session = await lifecycle.restore_session(conn, user_id, session_id)
    if session is None:
        raise SessionNotFound(session_id)
    addressed(request, session_id)
    return _json(session)


@delete(paths("/{session_id:str}/messages"), status_code=204, tags=TAGS,
        summary="Clear a session's history", description="The session stays; its history is "
        "empty.", **documented(204, None, "Cleared", 401, 404, 503))
async def clear_messages(request: Request[Any, Any, Any], session_id: str) -> Response[None]:
    user_id = await authenticate(request)
    rt = runtime(request)
    async with rt.connection(bulk=True) as conn:
        cleared = await lifecycle.clear_messages(conn, user_id, session_id)
    if not cleared:
        raise SessionNotFound(session_id)
    addressed(request, session_id)
    return Response(None, status_code=204)


@get(paths("/{session_id:str}/export"), tags=TAGS, summary="Export a session",
     description="The document is read from one consistent snapshot, then sent; a user has at "
     "most `CHATPROXY_EXPORTS_PER_USER` exports under way at once (429 beyond).",
     **documented(200, schemas.ExportDocument, "The export document: the session and every "
                  "message, in order", 401, 404, 429, 503))
async def export_session(request: Request[Any, Any, Any], session_id: str) -> Response[Any]:
    user_id = await authenticate(request)
    rt = runtime(request)
    admission = rt.exports.admit(user_id)
    try:  # read whole before the first byte is sent: a 404 is an answer, not a broken stream
        body = await exports.spool(rt.exports, partial(rt.connection, bulk=True), session_id,
                                   user_id)
    except BaseException:
        admission.leave()
        raise
    addressed(request, session_id)
    return ClosingStream(
        exports.Sending(body, admission),
        media_type="application/json",
        headers={"content-disposition": f'attachment; filename="{session_id}.json"'},
    )


@post(paths("/import"), status_code=201, tags=TAGS, summary="Import a session",
      **documented(201, schemas.Session, "A new session (new id, the caller as owner) holding "
                   "the document's messages", 400, 401, 413, 503,
                   body=schemas.ImportDocument, body_required=True,
                   body_description="An export document (`GET .../export`)."))
async def import_session(request: Request[Any, Any, Any]) -> Response[bytes]:
    user_id = await authenticate(request)
    rt = runtime(request)
    doc = await asyncio.to_thread(  # counting a large document must not stall the loop
        document.parse, await read_json(request), rt.settings.default_max_history_messages,
        rt.tokens.message,
    )
    async with rt.connection(bulk=True) as conn:
        session = await lifecycle.import_session(conn, user_id, doc)
    addressed(request, session["id"])
    return _json(await retention.pruned(rt.pool, rt.settings, user_id, session), 201)


class ForkBody(ExactText):
    model_config = ConfigDict(extra="forbid")

    up_to_seq: int | None = Field(default=None, ge=-MAX_SEQ, le=MAX_SEQ)
    session_name: SessionName = None


@post(paths("/{session_id:str}/fork"), status_code=201, tags=TAGS, summary="Fork a session",
      **documented(201, schemas.Session, "A new session with a copy of the messages up to "
                   "`up_to_seq` (default: all)", 400, 401, 404, 413, 503, body=ForkBody))
async def fork_session(request: Request[Any, Any, Any], session_id: str) -> Response[bytes]:
    user_id = await authenticate(request)
    rt = runtime(request)
    body = parse_model(ForkBody, await read_json(request, empty={}))
    name = ("session_name" in body.model_fields_set, body.session_name)
    async with rt.connection(bulk=True) as conn:
        session = await lifecycle.fork_session(conn, user_id, session_id, body.up_to_seq, name)
    addressed(request, session_id)
    return _json(await retention.pruned(rt.pool, rt.settings, user_id, session), 201)


class MergeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source_session_id: str = Field(max_length=200)


@post(paths("/{session_id:str}/merge"), status_code=200, tags=TAGS,
      summary="Merge another session into this one",
      description="The source's messages are appended after this session's, in their order, "
      "and the source is soft-deleted.",
      **documented(200, schemas.Session, "This session, with the source's messages", 400, 401,
                   404, 413, 503, body=MergeBody, body_required=True))
async def merge_sessions(request: Request[Any, Any, Any], session_id: str) -> Response[bytes]:
    user_id = await authenticate(request)
    rt = runtime(request)
    body = parse_model(MergeBody, await read_json(request, empty={}))
    if not is_session_id(body.source_session_id):  # e.g. a NUL, which PostgreSQL cannot take
        raise SessionNotFound(body.source_session_id, param="source_session_id")
    async with rt.connection(bulk=True) as conn:
        session = await lifecycle.merge_sessions(
            conn, user_id, session_id, body.source_session_id
        )
    addressed(request, session_id)
    return _json(await retention.pruned(rt.pool, rt.settings, user_id, session))


handlers = [
    restore_session,
    clear_messages,
    export_session,
    import_session,
    fork_session,
    merge_sessions,
]
