"""What the MCP tools do (contract §9), free of MCP: each one acts as `user_id` and answers a dict.

Every tool is a short recipe over the functions the sessions API uses (`proxy.store`,
`proxy.lifecycle`, `proxy.messages`, `proxy.document`, `proxy.retention`), so REST and MCP
share their SQL, their validation and their ownership rule: another user's session is the same
`SessionNotFound` as a missing one; `send_message` is a turn run by the turn engine
(`proxy.turns.run_turn`), as `/v1/chat/completions` runs one. A bad argument raises a
`ProxyError` before anything is written; `proxy.mcp.server` turns it into a tool result with
`isError: true`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any

import asyncpg

from proxy import codec, document, exports, history, metrics, retention, searchtext
from proxy.errors import BadRequest, SessionNotFound, UpstreamError
from proxy.ids import is_session_id
from proxy.runtime import Runtime
from proxy.store import lifecycle, messages, sessions
from proxy.tokens import REPLY_PRIMING
from proxy.turns import Answered, Caller, Passthrough, TurnRequest, run_turn, summary

MAX_UPSTREAM_MESSAGE = 1000  # characters of an upstream's error message a tool result repeats


def _checked(session_id: str, param: str = "session_id") -> None:
    """A string that cannot be a session id names none: not found, without a query."""
    if not is_session_id(session_id):  # e.g. a NUL, which PostgreSQL cannot take
        raise SessionNotFound(session_id, param=param)


async def list_sessions(
    rt: Runtime, user_id: str, include_inactive: bool, limit: int, offset: int,
    query: str | None = None,
) -> dict[str, Any]:
    """A page of the caller's sessions; with `query`, those whose name or a message holds
    every word of it (contract §12's search)."""
    where = None
    if query is not None:
        try:
            words = searchtext.query_words(query)
        except searchtext.BadQuery as exc:
            raise BadRequest(str(exc).replace("q ", "query ", 1), param="query") from None
        where = sessions.SessionFilter(query=searchtext.tsquery(words))
    async with rt.connection() as conn:
        async with conn.transaction(isolation="repeatable_read", readonly=True):  # one snapshot
            data, total, _ = await sessions.list_sessions(
                conn, user_id, limit, offset, include_inactive, where=where)
    return {"sessions": data, "total": total, "has_more": offset + len(data) < total}


async def get_messages(
    rt: Runtime, user_id: str, session_id: str, limit: int, offset: int, descending: bool
) -> dict[str, Any]:
    _checked(session_id)
    async with rt.connection() as conn:
        # One snapshot, so that `total` and `has_more` agree with the page.
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            session = await sessions.get_session(conn, user_id, session_id)
            if session is None:
                raise SessionNotFound(session_id)
            data = await messages.list_messages(conn, session_id, limit, offset, descending)
    total = session["message_count"]
    return {"messages": data, "total": total, "has_more": offset + len(data) < total}


async def resume_session(rt: Runtime, user_id: str, session_id: str) -> dict[str, Any]:
    """Restore the session (if it was deleted) and the history a turn on it would be sent now.

    That is contract §7 (and §11) for a turn on the session's own model that brings no
    messages and no `max_tokens`, by the turn's own rules (`summary.fit`): the newest
    `max_history_messages`, tool exchanges whole, within the model's context window less its
    reply reserve and the system prompt, and `max_history_tokens`; with summaries on, the
    session's summary when the turn would carry it (`summary`), counted in that budget.
    """
    _checked(session_id)
    async with rt.connection() as conn:
        session = await lifecycle.restore_session(conn, user_id, session_id)
        ctx = None if session is None else await messages.read_turn_as(
            conn, user_id, session_id, None)
        if session is None or ctx is None:
            raise SessionNotFound(session_id)
        model, prompt = session["model"], session["system_prompt"]
        info = rt.tokens.table.lookup(model)
        head = rt.tokens.message(model, {"role": "system", "content": prompt}) if prompt else 0
        budget = history.budget(info.context_window, info.reserve_output_tokens,
                                head + REPLY_PRIMING)
        fitted = summary.fit(ctx, ctx.history, budget, continued=False,
                             enabled=rt.settings.summary_model is not None)
        chosen = [m.seq for m in fitted.trimmed.messages]
        # The chosen messages as message objects: their seqs' range, read by seq (a message
        # is never changed, and one a clear removed meanwhile is left out).
        found = await messages.list_messages(
            conn, session_id, chosen[-1] - chosen[0] + 1, 0, False, after_seq=chosen[0] - 1,
            before_seq=chosen[-1] + 1) if chosen else []
    by_seq = {m["seq"]: m for m in found}
    held = fitted.summary
    carried = None if held is None else {
        "text": held.text, "up_to_seq": held.up_to_seq, "tokens": held.tokens}
    return {"session": session, "messages": [by_seq[s] for s in chosen if s in by_seq],
            "summary": carried}


async def create_session(rt: Runtime, user_id: str, fields: dict[str, Any]) -> dict[str, Any]:
    fields.setdefault("max_history_messages", rt.settings.default_max_history_messages)
    async with rt.connection() as conn:
        session = await sessions.create_session(conn, user_id, fields)
    return {"session": session}


async def send_message(
    rt: Runtime, user_id: str, session_id: str, content: str, model: str | None,
    state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One turn on the session, run by the engine exactly as `/v1/chat/completions` with the
    session runs it (non-streamed; `model` defaults to the session's): the stored reply and the
    session after the turn. `state` receives the access log's fields of the turn."""
    _checked(session_id)
    if model is None:
        async with rt.connection() as conn:
            session = await sessions.get_session(conn, user_id, session_id)
        if session is None:
            raise SessionNotFound(session_id)
        model = session["model"]
        if model is None:
            raise BadRequest(f"Session {session_id} has no model: give the model to send to",
                             param="model")
    body = {"model": model, "messages": [{"role": "user", "content": content}]}
    outcome = await run_turn(rt, TurnRequest(
        Caller(user_id=user_id), session_id, body, state={} if state is None else state))
    if isinstance(outcome, Passthrough):
        raise refusal(outcome)
    assert isinstance(outcome, Answered), "a turn without streaming or a key answers whole"
    async with rt.connection() as conn:  # the turn is stored: the session as it is now
        after = await sessions.get_session(conn, user_id, session_id, include_inactive=True)
    if after is None:  # purged the moment the turn was stored
        raise SessionNotFound(session_id)
    return {"reply": outcome.reply, "session": after}


def refusal(outcome: Passthrough) -> UpstreamError:
    """What the upstream said instead of a completion: the message of its error envelope, when
    it sent one; never its bytes otherwise."""
    if outcome.status == 200:
        return UpstreamError("The upstream answered with something that is not a chat "
                             "completion; nothing was stored")
    try:
        answer = codec.loads(outcome.raw)
    except codec.InvalidJSON:
        answer = None
    error = answer.get("error") if isinstance(answer, dict) else None
    said = error.get("message") if isinstance(error, dict) else None
    text = f"The upstream refused the turn (HTTP {outcome.status})"
    if isinstance(said, str) and said.strip():
        if len(said) > MAX_UPSTREAM_MESSAGE:
            said = said[:MAX_UPSTREAM_MESSAGE] + "…"
        # A lone surrogate (JSON's "\ud800") cannot be sent: it becomes "?".
        text += ": " + said.encode("utf-8", "replace").decode()
    return UpstreamError(text + "; nothing was stored")


async def export_session(rt: Runtime, user_id: str, session_id: str) -> dict[str, Any]:
    """The export document of contract §5, whole (an MCP result is one message)."""
    _checked(session_id)
    admission = rt.exports.admit(user_id)  # the REST export's budget (proxy/exports.py)
    try:
        body = await exports.spool(rt.exports, partial(rt.connection, bulk=True), session_id,
                                   user_id)
        with body:
            raw = body.read()
    finally:
        admission.leave()
    doc: dict[str, Any] = codec.loads(raw)
    return doc


async def import_session(rt: Runtime, user_id: str, doc: dict[str, Any]) -> dict[str, Any]:
    parsed = await asyncio.to_thread(  # counting a large document must not stall the loop
        document.parse, doc, rt.settings.default_max_history_messages, rt.tokens.message)
    async with rt.connection(bulk=True) as conn:
        session = await lifecycle.import_session(conn, user_id, parsed)
    return {"session": await retention.pruned(rt.pool, rt.settings, user_id, session)}


async def merge_sessions(
    rt: Runtime, user_id: str, primary_id: str, secondary_id: str
) -> dict[str, Any]:
    _checked(primary_id, "primary_id")
    _checked(secondary_id, "secondary_id")
    async with rt.connection(bulk=True) as conn:
        session = await lifecycle.merge_sessions(conn, user_id, primary_id, secondary_id)
    return {"session": await retention.pruned(rt.pool, rt.settings, user_id, session)}


async def fork_session(
    rt: Runtime, user_id: str, session_id: str, up_to_seq: int | None, session_name: str | None
) -> dict[str, Any]:
    _checked(session_id)
    name = (session_name is not None, session_name)
    async with rt.connection(bulk=True) as conn:
        session = await lifecycle.fork_session(conn, user_id, session_id, up_to_seq, name)
    return {"session": await retention.pruned(rt.pool, rt.settings, user_id, session)}


async def clear_session(rt: Runtime, user_id: str, session_id: str) -> dict[str, Any]:
    await _on_own(rt, user_id, session_id, lifecycle.clear_messages)
    return {"session_id": session_id, "cleared": True}


async def delete_session(rt: Runtime, user_id: str, session_id: str) -> dict[str, Any]:
    await _on_own(rt, user_id, session_id, sessions.soft_delete_session)
    return {"session_id": session_id, "deleted": True}


async def _on_own(
    rt: Runtime, user_id: str, session_id: str,
    act: Callable[[asyncpg.Connection, str, str], Awaitable[bool]],
) -> None:
    """`act(conn, user_id, session_id)`, which answers whether it found the caller's session."""
    _checked(session_id)
    async with rt.connection(bulk=True) as conn:  # clearing deletes a whole session's rows
        if not await act(conn, user_id, session_id):
            raise SessionNotFound(session_id)


async def cleanup_sessions(rt: Runtime, user_id: str, older_than: str | None) -> dict[str, Any]:
    """The caller's own retention run; `older_than` (`7d`) or else the configured retention."""
    period = None
    if older_than is not None:
        try:
            period = retention.parse_duration(older_than)
        except ValueError:
            raise BadRequest("older_than must be a duration like 30s, 15m, 12h, 7d or 2w "
                             "(at most 36500d)", param="older_than") from None
    keep_for = retention.retention_of(rt.settings, period)
    if keep_for is None:  # CHATPROXY_RETENTION_DAYS=0 keeps everything, unless told otherwise
        return {"deleted_sessions": 0, "deleted_messages": 0}
    async with rt.connection(bulk=True) as conn:
        inactive, deleted, removed = await retention.purge_expired(
            conn, datetime.now(UTC) - keep_for, user_id=user_id)
    metrics.retention_deleted(inactive + deleted, removed)
    return {"deleted_sessions": inactive + deleted, "deleted_messages": removed}
