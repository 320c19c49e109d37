"""What a turn gives back to its door: `run_turn`'s four outcomes, and a streamed answer's events.

None of them is HTTP. `headers` are the response headers the turn has: the upstream's (minus
hop-by-hop ones) and the history's (`x-session-id`, `x-history-*`; and `cache-control` for an
event stream). An HTTP door sends them as they are, another door may ignore them; a replay
(`Replayed`) has exactly the ones first sent.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import msgspec

from proxy.errors import ProxyError
from proxy.store.idempotency import Answer


class Event(msgspec.Struct):
    """One server-sent event of a streamed answer, as relayed: `raw` byte for byte.

    `chunk` is its data parsed, when it is a `chat.completion.chunk`. The last event is either
    `done` (`data: [DONE]`, sent once the turn is stored) or carries the `error` the stream
    ended with (its `raw` is that error's envelope as an event).
    """

    raw: bytes
    chunk: dict[str, Any] | None = None
    done: bool = False
    error: ProxyError | None = None


@dataclass(frozen=True, slots=True)
class Replayed:
    """The stored answer to an earlier request with the same Idempotency-Key; nothing ran."""

    answer: Answer


@dataclass(frozen=True, slots=True)
class Passthrough:
    """The upstream's answer as it came (an HTTP error, or a 200 that is not a completion);
    nothing was stored."""

    status: int
    headers: dict[str, str]
    raw: bytes


@dataclass(frozen=True, slots=True)
class Answered:
    """A whole completion, stored: `raw` as the upstream sent it, `answer` parsed, and `reply`,
    the assistant message as stored (and sent upstream as history from now on)."""

    raw: bytes
    answer: dict[str, Any]
    reply: dict[str, Any]
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class Streaming:
    """A streamed completion: `events` as they arrive. The turn is stored before the last
    event; closing `events` early (the client went away) stores what arrived, as incomplete.
    Whoever holds `events` must close it (`aclose`) however it stops reading."""

    headers: dict[str, str]
    events: AsyncGenerator[Event, None]


Outcome = Replayed | Passthrough | Answered | Streaming
