"""Server-sent events from an OpenAI-compatible stream, and the reply assembled from them. Pure.

`EventSplitter` cuts the byte stream into whole events without changing a byte, so each event
can be forwarded as soon as it is complete; one event is capped (`CHATPROXY_MAX_EVENT_BYTES`).
`ReplyAssembler` folds chat.completion.chunk deltas for choice 0 into the assistant message:
content, refusal and tool calls by index.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from proxy import codec
from proxy.errors import UpstreamError

_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_LONGEST = 4  # bytes in the longest boundary
DONE = b"[DONE]"
MAX_EVENT_BYTES = 16 * 1024 * 1024


class EventTooLarge(UpstreamError):
    """One event from the upstream outgrew the cap: the stream ends with the error event."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"The upstream sent an event larger than {limit} bytes")


class EventSplitter:
    """Linear in the stream's length: each byte is searched for a boundary once (plus the last
    three bytes before a chunk, where a boundary may straddle two chunks), and the buffer grows in
    place. An event (complete or not) longer than `max_event_bytes` raises EventTooLarge."""

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._buffer = bytearray()
        self._max = max_event_bytes
        self._over = False  # an event outgrew the cap; the events before it were handed out

    def feed(self, chunk: bytes) -> list[bytes]:
        """Whole events (each with its trailing blank line) completed by `chunk`."""
        if self._over:
            raise EventTooLarge(self._max)
        buffer = self._buffer
        data: bytes | bytearray = chunk  # the usual case: a chunk that starts an event
        pos = 0
        if buffer:
            # No boundary lies wholly in what was buffered before (it would have been cut there).
            pos = max(0, len(buffer) - (_LONGEST - 1))
            buffer += chunk
            data = buffer
        events = []
        start = 0
        while match := _BOUNDARY.search(data, pos):
            end = match.end()
            if end - start > self._max:
                self._over = True
                break
            events.append(bytes(data[start:end]))  # a whole chunk is not copied
            start = pos = end
        if data is chunk:
            if start == len(chunk) and not self._over:
                return events  # nothing left over: the usual end
            buffer += chunk[start:]
        else:
            del buffer[:start]
        if len(buffer) > self._max:
            self._over = True
        if self._over and not events:
            raise EventTooLarge(self._max)
        return events

    @property
    def pending(self) -> bytes:
        return bytes(self._buffer)


def closing(tail: bytes) -> bytes:
    """What to write after `tail` (the last four or more bytes written of an event stream) so
    that an event written next stands on its own: nothing after a whole event (or nothing
    written), the line end that ends the event after a whole line, and a line end plus a blank
    line in the middle of a line (the upstream broke off there)."""
    if not tail or tail.endswith((b"\r\n\r\n", b"\n\n", b"\r\r")):  # as _BOUNDARY
        return b""
    for end in (b"\r\n", b"\n", b"\r"):
        if tail.endswith(end):
            return end
    return b"\n\n"


def event_data(event: bytes) -> bytes | None:
    """The joined `data:` lines of one event, or None when it has none."""
    lines = [
        line[5:].removeprefix(b" ")
        for line in event.splitlines()
        if line.startswith(b"data:")
    ]
    return b"\n".join(lines) if lines else None


@dataclass
class ReplyAssembler:
    content: list[str] = field(default_factory=list)
    refusal: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    valid_chunks: int = 0
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    saw_content: bool = False

    def feed(self, data: bytes) -> dict[str, Any] | None:
        """Fold one event's data in; the chunk it parsed to, or None when it is not one."""
        try:
            chunk = codec.loads(data)
        except codec.InvalidJSON:
            return None
        if not isinstance(chunk, dict) or not isinstance(chunk.get("choices"), list):
            return None
        self.fold(chunk)
        return chunk

    def fold(self, chunk: dict[str, Any]) -> None:
        """Fold in a chunk already parsed (one whose `choices` is a list)."""
        self.valid_chunks += 1
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk["choices"]:
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                self._choice(choice)

    def _choice(self, choice: dict[str, Any]) -> None:
        if isinstance(choice.get("finish_reason"), str):
            self.finish_reason = choice["finish_reason"]
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return
        if isinstance(delta.get("content"), str):
            self.content.append(delta["content"])
            self.saw_content = True
        if isinstance(delta.get("refusal"), str):
            self.refusal.append(delta["refusal"])
        for call in delta.get("tool_calls") or ():
            if isinstance(call, dict):
                self._tool_call(call)

    def _tool_call(self, delta: dict[str, Any]) -> None:
        index = delta.get("index", 0)
        if not isinstance(index, int):
            return
        call = self.tool_calls.setdefault(
            index, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
        )
        if isinstance(delta.get("id"), str):
            call["id"] = delta["id"]
        if isinstance(delta.get("type"), str):
            call["type"] = delta["type"]
        function = delta.get("function")
        if isinstance(function, dict):
            for key in ("name", "arguments"):
                if isinstance(function.get(key), str):
                    call["function"][key] += function[key]

    @property
    def valid(self) -> bool:
        return self.valid_chunks > 0

    def message(self) -> dict[str, Any]:
        """The assistant message as the non-streamed API would have returned it.

        `content` is null only beside a refusal or tool calls, as in the non-streamed API: a
        reply cut off before its first word is stored with `""`, which an upstream accepts back
        as history (an assistant message with null content and nothing else it refuses).
        """
        empty = not self.refusal and not self.tool_calls
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(self.content) if self.saw_content or empty else None,
        }
        if self.refusal:
            message["refusal"] = "".join(self.refusal)
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        return message
