"""One `POST /v1/responses` as a turn of the engine, answered whole or as Responses events.

The request becomes one chat completions turn (proxy/responses/request.py): with a
conversation, a turn on that session (history read, trimmed and stored by the engine); else a
turn whose history is the `previous_response_id` chain (proxy/responses/chain.py) and which has
no session. The response row is the turn's `extra_write` (`Record`): written in the turn's own
transaction (a stored response in a conversation writes the session's turn too, in the same
statement, so the turn is still one round trip), with, for an `Idempotency-Key`, the answer a
retry gets back (the response, or its events as a stream) recorded over the engine's. The
answer is sent after that write, so the next request sees the turn. An upstream error passes
through as it came.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from proxy import codec
from proxy.errors import (
    ConversationGone,
    ObjectNotFound,
    SessionGone,
    SessionNotFound,
    UpstreamError,
)
from proxy.ids import is_session_id
from proxy.responses import answer, request
from proxy.responses.answer import Reply, response_object
from proxy.responses.chain import Chain
from proxy.responses.events import EventStream
from proxy.runtime import Runtime
from proxy.sse import ReplyAssembler
from proxy.store import idempotency, responses
from proxy.store.idempotency import Answer
from proxy.tokens import REPLY_PRIMING
from proxy.turns import (
    Answered,
    Caller,
    Idempotency,
    Passthrough,
    Replayed,
    StoredTurn,
    Streaming,
    TurnRequest,
    finish_reason,
    request_hash,
    run_turn,
)

JSON = {"content-type": "application/json"}
EVENTS = {"content-type": "text/event-stream", "cache-control": "no-cache"}


@dataclass(frozen=True, slots=True)
class Whole:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class Streamed:
    """Responses events; whoever holds `events` must close it however it stops reading."""

    headers: dict[str, str]
    events: AsyncGenerator[bytes, None]


@dataclass
class Record:
    """The turn's `extra_write`: the response stored (unless `store: false`) and, for an
    Idempotency-Key, the answer to replay; `final` is the response as stored."""

    response_id: str
    created_at: int
    plan: request.Plan
    key: str | None
    final: dict[str, Any] | None = field(default=None)

    def render(self, reply: Reply | None, error: dict[str, Any] | None = None) -> dict[str, Any]:
        return response_object(
            self.response_id, self.created_at, self.plan.settings, reply=reply,
            previous_response_id=self.plan.previous_response_id,
            conversation=self.plan.conversation, error=error,
        )

    async def write(self, conn: asyncpg.Connection, stored: StoredTurn) -> None:
        last = stored.messages[-1]
        reply = Reply(last.message, stored.status, stored.finish_reason, stored.usage,
                      stored.prompt_tokens, last.tokens)
        final = self.render(reply)
        if self.plan.store:
            await responses.insert_response(conn, responses.NewResponse(
                self.response_id, stored.user_id, self.plan.previous_response_id,
                stored.session_id, stored.status, stored.finish_reason, stored.usage,
                stored.prompt_tokens, self.plan.settings, self.created_at,
            ), stored.messages, with_turn=stored.session_id is not None and not stored.in_session)
        if self.key is not None and stored.status == "complete":
            await idempotency.settle(conn, stored.user_id, self.key,
                                     replay(final, self.plan.stream))
        self.final = final


def replay(final: dict[str, Any], streamed: bool) -> Answer:
    """What a retry with the same Idempotency-Key gets: the response, or its events."""
    if not streamed:
        return Answer(200, JSON, codec.dumps(final))
    events = EventStream(final, answer.stem(final["id"]))
    return Answer(200, EVENTS, events.start() + events.finish(final))


async def respond(
    rt: Runtime, caller: Caller, body: Any, raw: bytes, key: str | None,
    headers: Iterable[tuple[str, str]], state: dict[str, Any],
) -> Whole | Streamed:
    """The answer to one Responses request (raises the proxy's errors before any is sent)."""
    plan = request.plan(body)
    conversation = plan.conversation
    if conversation is not None and not is_session_id(conversation):
        raise ObjectNotFound("Conversation", conversation, param="conversation")
    sent = list(plan.body["messages"])  # the engine splices history into the body's list
    record = Record(answer.new_response_id(), int(time.time()), plan, key)
    stores = plan.store or key is not None
    history = None if conversation else Chain(
        plan.previous_response_id, rt.settings.default_max_history_messages, stores)
    claim = Idempotency(key, request_hash("responses", raw)) if key is not None else None
    turn = TurnRequest(
        caller, conversation, plan.body, headers, plan.stream, plan.history_limit, claim, state,
        extra_write=record.write if stores else None, history=history,
        # a stored response in a conversation: its row and the session's turn, one statement
        extra_stores=conversation is not None and plan.store,
    )
    try:
        outcome = await run_turn(rt, turn)
    except SessionGone:
        raise ConversationGone(str(conversation)) from None
    except SessionNotFound:
        raise ObjectNotFound("Conversation", str(conversation), param="conversation") from None
    if isinstance(outcome, Replayed):
        got = outcome.answer
        return Whole(got.status_code, {**got.headers, "idempotent-replayed": "true"}, got.body)
    if isinstance(outcome, Passthrough):
        if outcome.status == 200:
            raise UpstreamError("The upstream answered with something that is not a completion")
        return Whole(outcome.status, outcome.headers, outcome.raw)
    if isinstance(outcome, Answered):
        final = record.final
        if final is None:  # nothing was written for it (store: false)
            reply = await _counted(rt, plan, sent, outcome.headers, Reply(
                outcome.reply, "complete", finish_reason(outcome.answer),
                outcome.answer.get("usage"), 0, 0))
            final = record.render(reply)
        final = answer.with_logprobs(final, answer.logprobs_of(_first_choice(outcome.answer)))
        return Whole(200, JSON, codec.dumps(final))
    assert isinstance(outcome, Streaming)
    return Streamed(EVENTS, _events(rt, outcome, record, sent))


def _first_choice(completion: Any) -> Any:
    choices = completion.get("choices") if isinstance(completion, dict) else None
    return choices[0] if isinstance(choices, list) and choices else None


async def _events(
    rt: Runtime, outcome: Streaming, record: Record, sent: list[dict[str, Any]]
) -> AsyncGenerator[bytes, None]:
    stream = EventStream(record.render(None), answer.stem(record.response_id))
    assembled = ReplyAssembler()  # for a response nothing was written for
    events = outcome.events
    try:
        yield stream.start()
        async for event in events:
            if event.chunk is not None:
                assembled.fold(event.chunk)
                if data := stream.feed(event.chunk):
                    yield data
                continue
            final = record.final
            if final is None and assembled.valid and (
                event.done or (record.plan.store is False and record.key is None)
            ):
                status = "complete" if event.done else "incomplete"
                final = record.render(await _counted(rt, record.plan, sent, outcome.headers, Reply(
                    assembled.message(), status, assembled.finish_reason, assembled.usage, 0, 0)))
            if final is None:  # nothing arrived, or the turn could not be stored
                error = event.error
                if isinstance(error, SessionGone):
                    error = ConversationGone(str(record.plan.conversation))
                message = error.message if error is not None else "The turn failed"
                final = record.render(None, {"code": "server_error", "message": message})
            yield stream.finish(final)
            break
    finally:
        await events.aclose()


async def _counted(
    rt: Runtime, plan: request.Plan, sent: list[dict[str, Any]], headers: dict[str, str],
    reply: Reply,
) -> Reply:
    """`reply` with its tokens counted, for a usage the upstream did not give."""
    usage = reply.usage
    if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
        return reply
    model = plan.body.get("model")
    counts = await rt.tokens.counts(model, [*sent, reply.message])
    history = int(headers.get("x-history-tokens", "0"))
    return Reply(reply.message, reply.status, reply.finish_reason, usage,
                 history + sum(counts[:-1]) + REPLY_PRIMING, counts[-1])

