"""A session's summary (contract §11): `GET .../summary` and `POST .../compact`.

Served under both session prefixes with the sessions API's ownership rule. The summary is
written by proxy/summaries.py (its job, which `compact` runs now); its SQL is in
proxy/store/summaries.py.
"""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get, post
from pydantic import BaseModel, ConfigDict

from proxy import codec, schemas, summaries
from proxy.access import addressed, authenticate
from proxy.errors import BadRequest, Conflict, NotFound, SessionNotFound, UpstreamError
from proxy.openapi import documented
from proxy.reading import read_json
from proxy.routes import paths
from proxy.runtime import runtime
from proxy.store import sessions
from proxy.store import summaries as store
from proxy.validation import parse_model

TAGS = ["sessions"]


def _json(value: Any) -> Response[Any]:
    # Encoded here: a summary may hold lone surrogates, which only codec.dumps writes.
    return Response(codec.dumps(value), status_code=200, media_type="application/json")


def _none(session_id: str) -> NotFound:
    return NotFound(f"Session {session_id} has no summary", param="session_id")


@get(paths("/{session_id:str}/summary"), tags=TAGS, summary="Get a session's summary",
     description="The summary of the session's earlier messages, which a turn that leaves "
     "them out carries right after its head.",
     **documented(200, schemas.Summary, "The summary", 401, 404, 503, not_found="summary"))
async def get_summary(request: Request[Any, Any, Any], session_id: str) -> Response[Any]:
    user_id = await authenticate(request)
    rt = runtime(request)
    async with rt.connection() as conn:
        found, summary = await store.get_summary(conn, user_id, session_id)
    if not found:
        raise SessionNotFound(session_id)
    addressed(request, session_id)
    if summary is None:
        raise _none(session_id)
    return _json(summary.as_object())


class CompactBody(BaseModel):
    """No fields: a field is 400 `unknown_parameter`."""

    model_config = ConfigDict(extra="forbid")


@post(paths("/{session_id:str}/compact"), status_code=200, tags=TAGS,
      summary="Summarise a session's earlier messages now",
      description="Folds every message older than the session's window (its newest "
      "`max_history_messages`) into its summary now, with `CHATPROXY_SUMMARY_MODEL` (400 "
      "`summaries_off` when it is unset). An error of the summary model's upstream is passed "
      "through unchanged.",
      **documented(200, schemas.Summary, "The summary, covering everything before the window",
                   400, 401, 404, 409, 413, 502, 503, 504, body=CompactBody,
                   not_found="summary", conflict="summary"))
async def compact(request: Request[Any, Any, Any], session_id: str) -> Response[Any]:
    user_id = await authenticate(request)
    rt = runtime(request)
    parse_model(CompactBody, await read_json(request, empty={}))
    async with rt.connection() as conn:
        session = await sessions.get_session(conn, user_id, session_id)
    if session is None:
        raise SessionNotFound(session_id)
    addressed(request, session_id)
    if rt.settings.summary_model is None:
        raise BadRequest("Summaries are off: set CHATPROXY_SUMMARY_MODEL to the model that "
                         "writes them", code="summaries_off")
    try:
        outcome, summary = await summaries.compact(
            rt, session_id, session["model"] or rt.settings.summary_model)
    except summaries.SummaryFailed as exc:
        if exc.answer is None:
            raise UpstreamError("The summary model's answer holds no summary") from None
        status, headers, raw = exc.answer
        return Response(raw, status_code=status, headers=headers)
    if outcome == "busy":
        raise Conflict("This session's summary is being written right now; try again shortly")
    if summary is None:
        raise _none(session_id)
    return _json(summary.as_object())


handlers = [get_summary, compact]
