"""`POST /v1/chat/completions`: a thin door onto the turn engine (contract §6, §7).

With a session (`session_id` in the body, or `X-Session-Id`) the request is a turn: the engine
(proxy/turns/) reads the history, calls the upstream and stores the turn; this module reads the
request and turns the engine's outcome into a response. Without a session the request goes
upstream as the client sent it (less the proxy's own fields), and nothing is stored.
"""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, post

from proxy import auth, chatbody, codec
from proxy import upstream as up
from proxy.access import verify_key
from proxy.errors import BadRequest
from proxy.openapi import CHAT_COMPLETIONS
from proxy.rawrequest import Incoming
from proxy.reading import read_json
from proxy.runtime import Runtime, runtime
from proxy.streamresponse import ClosingStream
from proxy.turns import (
    Answered,
    Caller,
    Idempotency,
    Outcome,
    Passthrough,
    Streaming,
    TurnRequest,
    check_key,
    request_hash,
    run_turn,
)


@post("/v1/chat/completions", status_code=200, **CHAT_COMPLETIONS)
async def chat_completions(request: Request[Any, Any, Any]) -> Response[Any]:
    """Reached through Litestar only for what proxy/routes/fastpath.py leaves to it."""
    rt = runtime(request)
    return await complete(rt, Incoming(request.scope, request.receive, rt.settings.max_body_bytes))


async def complete(rt: Runtime, request: Incoming) -> Response[Any]:
    """The answer to one chat completion request (every route to it ends here)."""
    key_hash = auth.client_key_hash(request.headers.get("authorization"))
    idem_key = check_key(request.headers.get("idempotency-key"))
    body = await read_json(request)
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object")
    had_proxy_fields = any(name in body for name in chatbody.PROXY_FIELDS)
    session_id = chatbody.session_id(request.headers, body)
    override = chatbody.history_override(body)
    chatbody.check_messages(body, rt.settings.max_request_messages)
    streamed = body.get("stream") is True

    if session_id is None:
        # For the access log line: the user's id, never the key.
        request.state["user_id"] = await verify_key(rt, key_hash, stores_nothing=True)
        # Nothing to change: the client's bytes go upstream as they came.
        content = codec.dumps(body) if had_proxy_fields else await request.body()
        return await up.relay(
            rt.http, rt.settings.upstream_for(body.get("model")), "POST", "/chat/completions",
            "", request.headers.items(), content,
            state=request.state, stream=streamed, whole=not streamed,
        )

    idempotency = None
    if idem_key is not None:
        idempotency = Idempotency(idem_key, request_hash(session_id, await request.body()))
    outcome = await run_turn(rt, TurnRequest(
        Caller(key_hash=key_hash), session_id, body, request.headers.items(), streamed,
        override, idempotency, request.state,
    ))
    return _response(outcome)


def _response(outcome: Outcome) -> Response[Any]:
    if isinstance(outcome, Answered):
        return Response(outcome.raw, status_code=200, headers=outcome.headers)
    if isinstance(outcome, Streaming):
        return ClosingStream(outcome.events, status_code=200, headers=outcome.headers)
    if isinstance(outcome, Passthrough):
        return Response(outcome.raw, status_code=outcome.status, headers=outcome.headers)
    answer = outcome.answer  # Replayed
    return Response(
        answer.body,
        status_code=answer.status_code,
        headers={**answer.headers, "idempotent-replayed": "true"},
    )


handlers = [chat_completions]
