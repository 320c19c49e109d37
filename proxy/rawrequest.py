"""A chat request as its handler reads it: headers by name, a size-capped body, the scope's state.

Built from the raw ASGI scope, so the same reading serves the route Litestar dispatches and the
one answered ahead of Litestar (proxy/routes/fastpath.py). The body is read once, on demand, and
refused with 413 past `limit` bytes, as Litestar's own `request_max_body_size` would.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from litestar.types import Receive, Scope

from proxy.errors import BadRequest, PayloadTooLarge


class Headers:
    """The request's headers by lowercase name (the first of a repeated one), as latin-1 text."""

    __slots__ = ("_first", "_raw")

    def __init__(self, raw: Iterable[tuple[bytes, bytes]]) -> None:  # ASGI's list, read twice
        self._raw = raw
        self._first: dict[str, str] | None = None

    def get(self, name: str) -> str | None:
        first = self._first
        if first is None:
            first = {}
            for key, value in self._raw:
                first.setdefault(key.decode("latin-1").lower(), value.decode("latin-1"))
            self._first = first
        return first.get(name)

    def items(self) -> list[tuple[str, str]]:
        """Every header in order, repeated ones included (what goes upstream)."""
        return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in self._raw]


class Incoming:
    __slots__ = ("_body", "_limit", "_receive", "headers", "state")

    def __init__(self, scope: Scope, receive: Receive, limit: int) -> None:
        self.headers = Headers(scope["headers"])
        # The access log's fields (proxy/logs.py), shared with whoever else holds the scope.
        self.state: dict[str, Any] = scope.setdefault("state", {})
        self._receive = receive
        self._limit = limit
        self._body: bytes | None = None

    async def body(self) -> bytes:
        if self._body is not None:
            return self._body
        declared = self.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._limit:
            raise PayloadTooLarge("Request body too large")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self._receive()
            if message["type"] != "http.request":  # the client went away mid-body
                raise BadRequest("The request body ended early")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._limit:
                raise PayloadTooLarge("Request body too large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        self._body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return self._body
