"""`POST /v1/chat/completions`: history injected before, the turn stored after (contract §6, §7).

A turn costs one database read (key, session and newest messages together) and one write (the
whole turn in one statement). Stored history is never re-tokenized or re-encoded: its JSON text
is spliced into the upstream body as it is.
"""

from __future__ import annotations

from typing import Any

import httpx
from litestar import Request, Response, post

from proxy import auth, codec, db, idempotency, messages, metrics, turn
from proxy import upstream as up
from proxy.app import Runtime, runtime
from proxy.errors import (
    BadRequest,
    SessionNotFound,
    Unauthorized,
    UpstreamError,
)
from proxy.incoming import Incoming
from proxy.openapi import CHAT_COMPLETIONS
from proxy.routes.parsing import is_session_id, read_json, verify_key
from proxy.routes.passthrough import relay
from proxy.routes.streaming import stream_turn

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
PROXY_FIELDS = ("session_id", "max_history_messages")


def _session_id(request: Incoming, body: dict[str, Any]) -> str | None:
    in_body = body.pop("session_id", None)
    in_header = request.headers.get("x-session-id")
    if in_body is not None and not isinstance(in_body, str):
        raise BadRequest("session_id must be a string", param="session_id")
    if in_body is not None and in_header is not None and in_body != in_header:
        raise BadRequest(
            "session_id in the body and the X-Session-Id header differ", param="session_id"
        )
    value = in_body if in_body is not None else in_header
    if value is not None and not is_session_id(value):
        # Names no session; PostgreSQL could not even take some such strings (NUL, surrogates).
        raise SessionNotFound(value)
    return value


def _history_override(body: dict[str, Any]) -> int | None:
    value = body.pop("max_history_messages", None)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 1000:
        raise BadRequest(
            "max_history_messages must be an integer between 0 and 1000",
            param="max_history_messages",
        )
    return value


def _check_messages(rt: Runtime, body: dict[str, Any]) -> list[dict[str, Any]]:
    items = body.get("messages")
    if not isinstance(items, list):
        raise BadRequest("messages must be an array", param="messages",
                         code="missing_required_parameter" if items is None else "invalid_value")
    if not items:
        raise BadRequest("messages must hold at least one message", param="messages")
    if len(items) > rt.settings.max_request_messages:
        raise BadRequest(
            f"At most {rt.settings.max_request_messages} messages per request", param="messages"
        )
    for index, item in enumerate(items):
        where = f"messages[{index}]"
        if not isinstance(item, dict):
            raise BadRequest("Each message must be an object", param=where)
        role = item.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise BadRequest(
                f"{where}.role must be one of {', '.join(sorted(ROLES))}", param=f"{where}.role"
            )
        _check_message_fields(item, where)
    return items


def _check_message_fields(item: dict[str, Any], where: str) -> None:
    """The shapes a stored message must have to be sent upstream again as history."""
    content = item.get("content")
    if not (content is None or isinstance(content, str) or (
        isinstance(content, list) and all(isinstance(part, dict) for part in content)
    )):
        raise BadRequest(f"{where}.content must be a string, an array of content parts or null",
                         param=f"{where}.content")
    for name in ("name", "tool_call_id"):
        if name in item and not isinstance(item[name], str):
            raise BadRequest(f"{where}.{name} must be a string", param=f"{where}.{name}")
    calls = item.get("tool_calls")
    if calls is not None and not (
        isinstance(calls, list) and all(isinstance(call, dict) for call in calls)
    ):
        raise BadRequest(f"{where}.tool_calls must be an array of objects",
                         param=f"{where}.tool_calls")


@post("/v1/chat/completions", status_code=200, **CHAT_COMPLETIONS)
async def chat_completions(request: Request[Any, Any, Any]) -> Response[Any]:
    """Reached through Litestar only for what proxy/routes/direct.py leaves to it."""
    rt = runtime(request)
    return await complete(rt, Incoming(request.scope, request.receive, rt.settings.max_body_bytes))


async def complete(rt: Runtime, request: Incoming) -> Response[Any]:
    """The answer to one chat completion request (every route to it ends here)."""
    key_hash = auth.client_key_hash(request.headers.get("authorization"))
    idem_key = idempotency.check_key(request.headers.get("idempotency-key"))
    body = await read_json(request)
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object")
    had_proxy_fields = any(name in body for name in PROXY_FIELDS)
    session_id = _session_id(request, body)
    override = _history_override(body)
    items = _check_messages(rt, body)
    target = rt.settings.upstream_for(body.get("model"))

    if session_id is None:
        # For the access log line: the user's id, never the key.
        request.state["user_id"] = await verify_key(rt, key_hash, stores_nothing=True)
        # Nothing to change: the client's bytes go upstream as they came.
        content = codec.dumps(body) if had_proxy_fields else await request.body()
        streamed = body.get("stream") is True
        return await relay(
            rt, target, "POST", "/chat/completions", "", request.headers.items(), content,
            state=request.state, stream=streamed, whole=not streamed,
        )

    async with db.connection(rt.pool, rt.settings.db_acquire_timeout) as conn:
        ctx = await messages.read_turn(conn, key_hash, session_id, override)
    if ctx is None:
        raise Unauthorized("Invalid API key")
    state = request.state  # the access log's fields (proxy/logs.py)
    state["user_id"] = ctx.user_id
    if not ctx.session_found:
        raise SessionNotFound(session_id)
    state["session_id"] = session_id

    current, upstream_body = await turn.prepare(rt, body, items, ctx, session_id)
    if idem_key is not None:
        fingerprint = idempotency.request_hash(session_id, await request.body())
        async with db.connection(rt.pool, rt.settings.db_acquire_timeout) as conn:
            outcome = await idempotency.claim(conn, ctx.user_id, idem_key, fingerprint)
        if isinstance(outcome, idempotency.Answer):
            return _replay(outcome)
        current.claim = outcome
    try:
        response = await up.open_stream(
            rt.http, "POST", up.url_for(target, "/chat/completions"),
            up.request_headers(target, request.headers.items()), codec.dumps(upstream_body),
            state=state, name=target.name,
        )
        if body.get("stream") is True:
            return await stream_turn(rt, response, current, state)
        return await _complete(rt, response, current)
    finally:
        # Whatever answered without storing a turn (an upstream error, a 200 that is not a
        # completion) gives the key back, so that a retry runs again.
        if current.claim is not None and not current.settled:
            await turn.release_claim(rt, current.claim)


def _replay(answer: idempotency.Answer) -> Response[Any]:
    metrics.replay()
    return Response(
        answer.body,
        status_code=answer.status_code,
        headers={**answer.headers, "idempotent-replayed": "true"},
    )


async def _complete(rt: Runtime, response: httpx.Response, current: turn.Turn) -> Response[Any]:
    raw = await up.read_body(response)
    headers = up.response_headers(response.headers)
    if response.status_code != 200:
        return Response(raw, status_code=response.status_code, headers=headers)
    try:
        answer = codec.loads(raw)
    except codec.InvalidJSON:
        raise UpstreamError("The upstream answered with a body that is not JSON") from None
    message = turn.first_message(answer)
    if message is None:  # a 200 that is not a chat completion: passed through, nothing stored
        return Response(raw, status_code=200, headers=headers)
    reply = turn.reply_message(message)
    headers = {**headers, **current.headers}
    sent = idempotency.Answer(200, headers, raw) if current.claim is not None else None
    await turn.persist(rt, current, reply, answer.get("usage"), "complete", sent)
    return Response(raw, status_code=200, headers=headers)


handlers = [chat_completions]
