"""A streamed turn: events relayed as they arrive, the reply stored before `data: [DONE]`.

Each whole event goes on the moment it is complete, byte for byte, with its parsed chunk. The
final `[DONE]` is held until the turn is stored. However the stream ends early — the client went
away (the events are cancelled or closed) or the upstream broke off — what arrived is stored
with status "incomplete" by a task of its own, so the write outlives the request. The claim of
an Idempotency-Key, handed on with the stream, ends with it (proxy/turns/claim.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from functools import partial
from typing import Any

import httpx

from proxy import codec, metrics
from proxy import upstream as up
from proxy.errors import InternalError, ProxyError, UpstreamError, UpstreamTimeout
from proxy.runtime import Runtime
from proxy.sse import DONE, EventSplitter, EventTooLarge, ReplyAssembler, event_data
from proxy.store.idempotency import Answer
from proxy.turns.outcome import Event, Passthrough, Streaming
from proxy.turns.write import Turn, persist

log = logging.getLogger("chatproxy.stream")
DRAIN_SECONDS = 2.0  # after [DONE], how long the end of the upstream body may take


def _error_event(error: ProxyError) -> bytes:
    return b"data: " + codec.dumps(error.body()) + b"\n\n"


async def open_stream(
    rt: Runtime,
    response: httpx.Response,
    current: Turn,
    held: AsyncExitStack | None,
    state: dict[str, Any] | None = None,
) -> Passthrough | Streaming:
    """The turn's streamed answer; `held` (the claim's context, if any) goes with the stream.

    `state` (the request's access-log fields, with the upstream's name and the request's
    arrival) lets the relay measure the time to first byte.
    """
    headers = up.response_headers(response.headers)
    content_type = response.headers.get("content-type", "")
    if response.status_code != 200 or not content_type.startswith("text/event-stream"):
        # An upstream error (or a 200 that is not a stream) before the first event: passed
        # through unchanged, nothing stored.
        raw = await up.read_body(response)
        return Passthrough(response.status_code, headers, raw)
    headers.update(current.headers)
    headers["cache-control"] = "no-cache"
    ttfb = None
    if state is not None and isinstance(state.get("request_started"), float):
        ttfb = (state["request_started"], str(state.get("upstream", "default")))
    owned = held.pop_all() if held is not None else None  # from here on the relay's to end

    def abandon() -> None:
        rt.track(asyncio.create_task(_abandon(response, None, owned)))

    return Streaming(headers, Events(relay(rt, response, current, owned, headers, ttfb), abandon))


def around(
    rt: Runtime, events: AsyncGenerator[Event, None], inner: AsyncGenerator[Event, None]
) -> Events:
    """`events`, a generator over `inner`'s (a door's or the engine's own, run after the
    stream), that still ends `inner`'s turn when it is closed before it began."""

    def close_inner() -> None:
        rt.track(asyncio.create_task(inner.aclose()))

    return Events(events, close_inner)


class Events(AsyncGenerator[Event, None]):
    """A relay's events. Once started, the relay ends the turn however it stops (its own
    `finally`); closed before it ever started (a request cancelled before its body began), it
    still closes the upstream response and gives the Idempotency-Key back, by `abandon`."""

    def __init__(self, events: AsyncGenerator[Event, None], abandon: Callable[[], None]) -> None:
        self._events = events
        self._abandon: Callable[[], None] | None = abandon

    async def asend(self, value: None) -> Event:
        self._abandon = None
        return await self._events.asend(value)

    async def athrow(self, *args: Any) -> Event:
        self._unstarted()
        return await self._events.athrow(*args)

    async def aclose(self) -> None:
        self._unstarted()
        await self._events.aclose()

    def _unstarted(self) -> None:
        if self._abandon is not None:
            abandon, self._abandon = self._abandon, None
            abandon()


async def relay(
    rt: Runtime,
    response: httpx.Response,
    current: Turn,
    held: AsyncExitStack | None = None,
    headers: dict[str, str] | None = None,
    ttfb: tuple[float, str] | None = None,
) -> AsyncGenerator[Event, None]:
    """The stream's events; `headers` are the response's, recorded for an idempotent replay."""
    splitter = EventSplitter(rt.settings.max_event_bytes)
    assembler = ReplyAssembler()
    done_event: bytes | None = None
    failure: ProxyError | None = None
    stored = False  # set before the write starts: however the stream ends, one write at most
    sent: list[bytes] | None = [] if current.claim is not None else None  # for a replay

    def write(status: str) -> Awaitable[None]:
        reply = assembler.message()
        answer = None
        if sent is not None and status == "complete" and done_event is not None:
            answer = Answer(200, headers or {}, b"".join(sent) + done_event)
        return persist(rt, current, reply, assembler.usage, status, answer,
                       finish_reason=assembler.finish_reason)

    chunks = response.aiter_bytes()
    try:
        try:
            async for chunk in chunks:
                for event in splitter.feed(chunk):
                    data = event_data(event)
                    if data == DONE:
                        done_event = event
                        break
                    parsed = assembler.feed(data) if data is not None else None
                    if sent is not None:
                        sent.append(event)
                    if ttfb is not None:  # the first event: time to first byte
                        metrics.stream_ttfb(time.perf_counter() - ttfb[0], upstream=ttfb[1])
                        ttfb = None
                    yield Event(event, parsed)
                if done_event is not None:
                    break
            else:
                # The body ended. An unterminated last event is discarded (as SSE says),
                # unless it is the [DONE] of an upstream that forgot the blank line.
                if event_data(splitter.pending) == DONE:
                    done_event = b"data: [DONE]\n\n"
        except EventTooLarge as exc:
            failure = exc
        except httpx.TimeoutException:
            failure = UpstreamTimeout("The upstream stopped sending before the reply was complete")
        except httpx.HTTPError:
            failure = UpstreamError("The upstream broke off the stream")
        if done_event is None and failure is None:
            failure = UpstreamError("The upstream ended the stream before [DONE]")
        await _finish(response, chunks if failure is None else None)
        if assembler.valid:
            stored = True
            try:
                await write("complete" if failure is None else "incomplete")
            except ProxyError as exc:  # the database, or the session gone meanwhile
                failure = exc
            except Exception:  # a bug: still an error event, never a stream cut short
                log.exception("a streamed turn could not be stored")
                failure = InternalError()
        if failure is None and done_event is not None:
            yield Event(done_event, done=True)
        else:
            failure = failure or UpstreamError("The stream failed")
            yield Event(_error_event(failure), error=failure)
    finally:
        if not stored:
            # The client went away (cancelled or closed mid-stream): close the upstream
            # request and store what arrived, in a task of its own.
            status = "complete" if done_event is not None and failure is None else "incomplete"
            pending: Callable[[], Awaitable[None]] | None = (
                partial(write, status) if assembler.valid else None
            )
            rt.track(asyncio.create_task(_abandon(response, pending, held)))
        elif held is not None:
            await held.aclose()  # the write took the key: nothing to give back


async def _finish(response: httpx.Response, rest: AsyncIterator[bytes] | None) -> None:
    """Close the upstream response; after [DONE], read the `rest` of its body first, so that
    the connection goes back to the pool instead of being closed.

    The drain is bounded: an upstream that keeps the body open after [DONE] is cut off.
    """
    if rest is not None and not response.is_closed:
        try:
            async with asyncio.timeout(DRAIN_SECONDS):
                async for _ in rest:
                    pass
        except (TimeoutError, httpx.HTTPError, httpx.StreamError):
            pass
    await response.aclose()


async def _abandon(
    response: httpx.Response,
    write: Callable[[], Awaitable[None]] | None,
    held: AsyncExitStack | None,
) -> None:
    """After the client went away: the upstream closed, what arrived stored, and the claim
    ended (released, unless the write took it)."""
    try:
        await response.aclose()
        if write is not None:
            try:
                await write()
            except ProxyError as exc:
                log.warning("an incomplete streamed turn could not be stored: %s", exc.code)
            except Exception:
                log.exception("an incomplete streamed turn could not be stored")
    finally:
        if held is not None:
            await held.aclose()
