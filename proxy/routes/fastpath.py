"""`POST /v1/chat/completions` and `POST /v1/responses` answered straight from ASGI, ahead of
Litestar's router.

The routes every turn takes pay for no router, signature model, exception middleware or
response object conversion: a request with exactly that method and path goes to the route's own
function (`complete`, proxy/routes/chat.py, and `create`, proxy/routes/responses.py, handed in
by create_app) here, and its `Response` or `Stream` is sent as ASGI messages. Litestar keeps
the routes for everything else (their OpenAPI entries, another method's 405, a trailing slash),
and both answer through the same function, with errors rendered by the same functions
(proxy/errors.py).

A streamed body is pumped by the request's own task, so its first event goes out without
waiting for a loop cycle; a watcher task waits for `http.disconnect`, and a client that leaves
cancels the pump at once, even while the upstream is silent. The stream's iterator is closed
however the response ends (its `finally` stores the turn).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from litestar import Litestar, Response
from litestar.enums import ScopeType
from litestar.response import Stream
from litestar.types import (
    ASGIApp,
    HTTPResponseBodyEvent,
    HTTPResponseStartEvent,
    Receive,
    Scope,
    Send,
)

from proxy.errors import SHUTDOWN_CUT, ProxyError, ShuttingDown, internal_error, render_error
from proxy.rawrequest import Incoming
from proxy.runtime import Runtime

log = logging.getLogger("chatproxy")

PATH = "/v1/chat/completions"
RESPONSES = "/v1/responses"
_NO_BODY = frozenset({204, 304})


Complete = Callable[[Runtime, Incoming], Awaitable[Response[Any]]]


def chat_first(
    app: Litestar, rest: ASGIApp, complete: Complete, *, responses: Complete | None = None
) -> ASGIApp:
    """`complete` answers `POST /v1/chat/completions`, `responses` `POST /v1/responses`; `rest`
    (Litestar's handler) the others."""
    routes = {PATH: complete}
    if responses is not None:
        routes[RESPONSES] = responses

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == ScopeType.HTTP and scope["method"] == "POST"
                and (handler := routes.get(scope["path"])) is not None):
            await _answer(app, handler, scope, receive, send)
        else:
            await rest(scope, receive, send)

    return asgi


async def _answer(
    app: Litestar, complete: Complete, scope: Scope, receive: Receive, send: Send
) -> None:
    scope["path_template"] = scope["path"]  # the route's label in the access log and metrics
    rt = app.state.rt
    try:
        response = await complete(rt, Incoming(scope, receive, rt.settings.max_body_bytes))
    except ProxyError as exc:
        response = render_error(exc)
    except Exception as exc:  # a 500 in the envelope; the traceback is logged
        response = internal_error(scope, exc)
    except asyncio.CancelledError as exc:
        if exc.args != (SHUTDOWN_CUT,):
            raise  # not the server's shutdown (proxy/server.py): not ours to answer
        # The shutdown grace ran out while this waited (for the upstream, say): answer it
        # (nothing was stored, unless its write had begun) instead of dying mid-request.
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        log.warning("a request still running at the shutdown deadline was answered 503")
        response = render_error(ShuttingDown())
    if isinstance(response, Stream):
        await _stream(response, send, receive)
    else:
        await _whole(response, send)


def _head(response: Response[Any], length: int | None) -> list[tuple[bytes, bytes]]:
    headers = [(k.lower().encode("latin-1"), str(v).encode("latin-1"))
               for k, v in response.headers.items()]
    if response.status_code in _NO_BODY:  # as Litestar: no body, so no type or length
        return headers
    if not any(name == b"content-type" for name, _ in headers):
        media = str(response.media_type or "application/json")
        headers.append((b"content-type", media.encode("latin-1")))
    if length is not None and not any(name == b"content-length" for name, _ in headers):
        headers.append((b"content-length", str(length).encode("latin-1")))
    return headers


def _start(response: Response[Any], length: int | None) -> HTTPResponseStartEvent:
    return {"type": "http.response.start", "status": response.status_code or 200,
            "headers": _head(response, length)}


def _body(chunk: bytes, *, more: bool) -> HTTPResponseBodyEvent:
    return {"type": "http.response.body", "body": chunk, "more_body": more}


async def _whole(response: Response[Any], send: Send) -> None:
    body = response.content if response.status_code not in _NO_BODY else b""
    if not isinstance(body, bytes):
        raise TypeError("a fast route answers with bytes")
    await send(_start(response, len(body)))
    await send(_body(body, more=False))


async def _stream(response: Stream, send: Send, receive: Receive) -> None:
    iterator: AsyncIterator[Any] = response.iterator  # type: ignore[assignment]
    # The body is pumped in this task, at once; a watcher task cancels the pump if the client
    # leaves (even while the upstream is silent), and the iterator is closed however it ends.
    this = asyncio.current_task()
    assert this is not None
    pumping, left = True, False

    def leave(watch: asyncio.Future[None]) -> None:
        nonlocal left
        if pumping and not watch.cancelled() and watch.exception() is None:
            left = True
            this.cancel()

    watch = asyncio.ensure_future(_disconnected(receive))
    watch.add_done_callback(leave)
    try:
        await send(_start(response, None))
        await _pump(iterator, send)
    except asyncio.CancelledError:
        if not left:
            raise  # cancelled from outside (the server's shutdown): not ours to swallow
        this.uncancel()
    finally:
        pumping = False
        watch.remove_done_callback(leave)
        watch.cancel()
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()


async def _pump(iterator: AsyncIterator[Any], send: Send) -> None:
    async for chunk in iterator:  # bytes, or a turn's events (proxy/turns/outcome.py)
        await send(_body(chunk if type(chunk) is bytes else chunk.raw, more=True))
    await send(_body(b"", more=False))


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
