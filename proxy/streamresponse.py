"""`ClosingStream`: a streamed Litestar response whose body iterator is closed however it ends.

Litestar leaves an abandoned iterator to the garbage collector; a stream that holds an upstream
response or a database connection (and a turn's stream, whose `finally` stores the turn) must be
closed at once instead, when the client goes away as when the body ends.

Its items are bytes, or the turn engine's events (proxy/turns/stream.py), sent as their `raw`.
"""

from __future__ import annotations

from collections.abc import AsyncIterable
from typing import Any, Protocol

from litestar.response import Stream
from litestar.response.streaming import ASGIStreamingResponse
from litestar.types import HTTPResponseBodyEvent, Send


class _ClosingStreamingResponse(ASGIStreamingResponse):
    """Closes the body iterator however the response ends, so its `finally` runs at once."""

    __slots__ = ()

    async def _stream(self, send: Send) -> None:
        async for chunk in self.iterator:
            event: HTTPResponseBodyEvent = {
                "type": "http.response.body",
                "body": chunk if type(chunk) is bytes else chunk.raw,  # type: ignore[union-attr]
                "more_body": True,
            }
            await send(event)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def send_body(self, send: Any, receive: Any) -> None:
        try:
            await super().send_body(send, receive)
        finally:
            aclose = getattr(self.iterator, "aclose", None)
            if aclose is not None:
                await aclose()


class Sendable(Protocol):
    """A body item that is not bytes: sent as its `raw` bytes."""

    @property
    def raw(self) -> bytes: ...


class ClosingStream(Stream):
    def __init__(
        self, content: AsyncIterable[bytes] | AsyncIterable[Sendable], **kwargs: Any
    ) -> None:
        super().__init__(content, **kwargs)  # type: ignore[arg-type]  # items: see `_stream`

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> Any:
        response = super().to_asgi_response(*args, **kwargs)
        response.__class__ = _ClosingStreamingResponse
        return response
