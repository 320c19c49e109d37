"""The turn engine: one chat turn on a session, from the caller's messages to the stored reply.

It knows nothing about HTTP: a door (the chat completions route; MCP, the Responses API next)
builds a `TurnRequest`, calls `run_turn`, and translates the `Outcome` (proxy/turns/outcome.py).
A turn's states:

    read ──> prepare ──> claim ──> call ──┬──> Passthrough   an upstream error, or a 200 that
     │                     │              │                   is not a completion: not stored
     │                     │              ├──> Answered      stored, then returned
     │                     ├──> Replayed  └──> Streaming     events relayed as they come; stored
     │                     │                                 before [DONE] (client gone, upstream
     └─> 401, 404          └─> 409, 422                      broke off: stored as incomplete by a
                                                             task of its own)

The claim is only taken for an Idempotency-Key, and given back on every way out that stored
nothing (an error, a cancellation, a Passthrough).

- read: the caller (a key, or a user id), the session and its newest messages, in one round
  trip (proxy/store/messages.py). This is the one step that knows where history comes from: a
  door with another source (the Responses API's chain of earlier responses) gives its own
  (`TurnRequest.history`, a `HistorySource`); everything after it sees a `TurnContext`. A turn
  with such a source may have no session: then only the door's `extra_write` stores it.
- prepare: the upstream body, the budget and the trimming (proxy/turns/prepare.py). The call
  sends what prepare built, so an overflow retry is prepare (with less history) and call again:
  when the upstream refuses a turn that carried history as too long for its context, the turn
  is prepared once more within fewer tokens and sent once more (proxy/turns/overflow.py), under
  the same claim, before anything reached the client; a second refusal passes through.
- claim: an Idempotency-Key, held for the rest of the turn (proxy/turns/claim.py).
- write: one statement, shielded from the request's cancellation (proxy/turns/write.py), with
  the claim settled and the door's `extra_write` in the same transaction.
- after: once a stored turn's answer (or stream) is done, a summary job is scheduled when the
  turn left out messages its session's summary does not cover (proxy/summaries.py); nothing of
  it is awaited on the turn's path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator, Iterable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import msgspec

from proxy import codec, db, metrics, summaries
from proxy import upstream as up
from proxy.errors import ProxyError, SessionNotFound, Unauthorized, UpstreamError
from proxy.runtime import Runtime
from proxy.store import messages
from proxy.store.idempotency import Answer
from proxy.store.messages import TurnContext
from proxy.turns import overflow, prepare, stream
from proxy.turns.claim import Idempotency, claimed
from proxy.turns.outcome import Answered, Event, Outcome, Passthrough, Replayed, Streaming
from proxy.turns.write import (
    ExtraWrite,
    Turn,
    finish_reason,
    first_message,
    persist,
    reply_message,
)


@dataclass(frozen=True, slots=True)
class Caller:
    """Who asks: a client key's SHA-256 hash (checked by the turn's read itself), or a user id
    a door has verified on its own (e.g. a local MCP server acting as one user)."""

    key_hash: bytes | None = None
    user_id: str | None = None


class HistorySource(Protocol):
    """Where a turn's history comes from when it is not a session's (the Responses API's chain
    of earlier responses): `read` is the turn's read (None: the caller is unknown; a context
    whose `session_found` is false: what it names is not the caller's, and `missing()` is the
    error to raise)."""

    async def read(self, rt: Runtime, caller: Caller, limit: int | None) -> TurnContext | None: ...

    def missing(self) -> ProxyError: ...


@dataclass(slots=True)
class TurnRequest:
    """One turn as a door hands it over.

    `body` is the upstream request: `messages` checked (proxy/chatbody.py checks a chat
    request's), the proxy's own fields removed; every other field goes upstream as it is.
    `stream` must agree with the body's `stream`. `headers` are the client's, forwarded upstream
    (proxy/upstream.py drops what must not go). `state` receives the access log's fields.
    `history` replaces the session's read; with it, `session_id` may be None (nothing is
    stored in a session). `extra_stores`: `extra_write` stores the turn's messages in the
    session itself, in the one statement it runs (so that the turn needs one round trip).
    """

    caller: Caller
    session_id: str | None
    body: dict[str, Any]
    headers: Iterable[tuple[str, str]] = ()
    stream: bool = False
    history_limit: int | None = None  # instead of the session's max_history_messages
    idempotency: Idempotency | None = None
    state: dict[str, Any] = field(default_factory=dict)
    extra_write: ExtraWrite | None = None
    history: HistorySource | None = None
    extra_stores: bool = False


async def run_turn(rt: Runtime, request: TurnRequest) -> Outcome:
    """Run one turn: read, prepare, claim, call, and answer or stream (see the module's states).

    Raises the proxy's errors (401, 404, 409, 422, 502, 503, 504) before anything is answered.
    """
    ctx = await _read(rt, request)
    items = request.body["messages"]
    turn, body = await prepare.prepare(
        rt, request.body, items, ctx, request.session_id, request.extra_write,
        extra_stores=request.extra_stores,
    )
    again = _Again(rt, request, items, ctx)
    if request.idempotency is None:
        return await _answer(rt, request, turn, body, None, again)
    async with AsyncExitStack() as held:
        claim = await held.enter_async_context(claimed(rt, ctx.user_id, request.idempotency))
        if isinstance(claim, Answer):
            metrics.replay()
            return Replayed(claim)
        turn = msgspec.structs.replace(turn, claim=claim)
        return await _answer(rt, request, turn, body, held, again)


@dataclass(frozen=True, slots=True)
class _Again:
    """The turn prepared again, within fewer tokens of history, for an overflow retry."""

    rt: Runtime
    request: TurnRequest
    items: list[dict[str, Any]]
    ctx: TurnContext

    async def within(self, tokens: int) -> tuple[Turn, dict[str, Any]]:
        ctx, request = self.ctx, self.request
        cap = tokens if ctx.max_history_tokens is None else min(tokens, ctx.max_history_tokens)
        return await prepare.prepare(
            self.rt, request.body, self.items, dataclasses.replace(ctx, max_history_tokens=cap),
            request.session_id, request.extra_write, extra_stores=request.extra_stores,
        )

    def carried(self, turn: Turn) -> int:
        """Tokens of history `turn` carries: its stored messages' and its summary's."""
        tokens = int(turn.headers["x-history-tokens"])
        if "x-history-summary-seq" in turn.headers and self.ctx.summary is not None:
            tokens += self.ctx.summary.tokens
        return tokens


async def _read(rt: Runtime, request: TurnRequest) -> TurnContext:
    caller = request.caller
    if request.history is not None:
        ctx = await request.history.read(rt, caller, request.history_limit)
    else:
        ctx = await _read_session(rt, request)
    if ctx is None:
        raise Unauthorized("Invalid API key" if caller.key_hash is not None else "Unknown user")
    state = request.state  # the access log's fields (proxy/logs.py)
    state["user_id"] = ctx.user_id
    if not ctx.session_found:
        if request.history is not None:
            raise request.history.missing()
        raise SessionNotFound(str(request.session_id))
    if request.session_id is not None:
        state["session_id"] = request.session_id
    return ctx


async def _read_session(rt: Runtime, request: TurnRequest) -> TurnContext | None:
    caller = request.caller
    assert request.session_id is not None, "a turn without a history source has a session"
    items = request.body["messages"]
    resent = len(items) - prepare.head_length(items)  # what may repeat stored messages
    async with db.connection(rt.pool, rt.settings.db_acquire_timeout) as conn:
        if caller.key_hash is not None:
            ctx = await messages.read_turn(
                conn, caller.key_hash, request.session_id, request.history_limit, resent
            )
        else:
            assert caller.user_id is not None, "a caller is a key or a user"
            ctx = await messages.read_turn_as(
                conn, caller.user_id, request.session_id, request.history_limit, resent
            )
    return ctx


async def _answer(
    rt: Runtime, request: TurnRequest, turn: Turn, body: dict[str, Any],
    held: AsyncExitStack | None, again: _Again,
) -> Outcome:
    try:
        response = await _call(rt, request, body)
        if response.status_code != 200:  # before any byte reached the client, streamed or not
            retried = await _retry(rt, response, turn, again)
            if isinstance(retried, Passthrough):
                return retried
            turn, body = retried
            response = await _call(rt, request, body)
    finally:
        _count_history(turn)  # once, for the history the turn was last sent with
    outcome: Outcome
    if request.stream:
        outcome = await stream.open_stream(rt, response, turn, held, request.state)
    else:
        outcome = await _complete(rt, response, turn)
    if turn.summary_due is not None and turn.session_id is not None:
        if isinstance(outcome, Answered):
            summaries.schedule(rt, turn.session_id, turn.summary_due, turn.model)
        elif isinstance(outcome, Streaming):
            events = _then_summarise(rt, turn, outcome.events)
            outcome = Streaming(outcome.headers, stream.around(rt, events, outcome.events))
    return outcome


def _count_history(turn: Turn) -> None:
    """The history metrics (X-History-*) of one turn."""
    headers = turn.headers
    metrics.history(int(headers["x-history-messages"]), int(headers["x-history-tokens"]),
                    int(headers["x-history-dropped"]))


async def _retry(
    rt: Runtime, response: httpx.Response, turn: Turn, again: _Again
) -> Passthrough | tuple[Turn, dict[str, Any]]:
    """An upstream error: the turn prepared again with less history, to be sent again, when
    the upstream refused it as too long for its context (contract §11), else the error as it
    came."""
    raw = await up.read_body(response)
    refused = Passthrough(response.status_code, up.response_headers(response.headers), raw)
    carried = again.carried(turn)
    found = overflow.refusal(response.status_code, raw) if carried else None
    if found is None:
        return refused
    table = rt.tokens.table.lookup(turn.model).context_window
    overflow.learn(rt.context_limits, turn.user_id, turn.model, found, table)
    fewer, body = await again.within(max(0, carried - overflow.to_leave_out(found, carried)))
    if again.carried(fewer) >= carried:
        return refused  # nothing could be left out (a tool exchange the request answers)
    headers = {**fewer.headers, "x-history-retried": "1"}
    fewer = msgspec.structs.replace(fewer, claim=turn.claim, headers=headers)
    metrics.overflow_retry(turn.model)
    return fewer, body


async def _then_summarise(
    rt: Runtime, turn: Turn, events: AsyncGenerator[Event, None]
) -> AsyncGenerator[Event, None]:
    """The stream's events, then (however it ends) the summary job the turn made due."""
    try:
        async for event in events:
            yield event
    finally:
        await events.aclose()
        if turn.summary_due is not None and turn.session_id is not None:
            summaries.schedule(rt, turn.session_id, turn.summary_due, turn.model)


async def _call(rt: Runtime, request: TurnRequest, body: dict[str, Any]) -> httpx.Response:
    target = rt.settings.upstream_for(body.get("model"))
    return await up.open_stream(
        rt.http, "POST", up.url_for(target, "/chat/completions"),
        up.request_headers(target, request.headers), codec.dumps(body),
        state=request.state, name=target.name,
    )


async def _complete(rt: Runtime, response: httpx.Response, turn: Turn) -> Outcome:
    raw = await up.read_body(response)
    headers = up.response_headers(response.headers)
    if response.status_code != 200:
        return Passthrough(response.status_code, headers, raw)
    try:
        answer = codec.loads(raw)
    except codec.InvalidJSON:
        raise UpstreamError("The upstream answered with a body that is not JSON") from None
    message = first_message(answer)
    if message is None:  # a 200 that is not a chat completion: passed through, nothing stored
        return Passthrough(200, headers, raw)
    reply = reply_message(message)
    headers = {**headers, **turn.headers}
    sent = Answer(200, headers, raw) if turn.claim is not None else None
    await persist(rt, turn, reply, answer.get("usage"), "complete", sent,
                  finish_reason=finish_reason(answer))
    return Answered(raw, answer, reply, headers)
