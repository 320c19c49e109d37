"""The history rules of contract §7, pure: no I/O, no tokenizing.

The stored window (the newest `max_history_messages`, oldest first) is cut into units. A message
that is not a `tool` (or legacy `function`) message opens a unit. An assistant message with
`tool_calls` opens a tool exchange, and the `tool` messages answering its calls (by
`tool_call_id`) join it. Whole units are then dropped, oldest first, until the rest fits the
token budget. The result is a suffix of whole units and never begins with a `tool` message.

Some stored messages cannot go upstream as history at all, because an OpenAI-compatible upstream
rejects the whole request around them; they are left out (and counted as dropped):

* an orphan `tool` message — its assistant lies beyond the window's edge, or it answers no call
  of the exchange it follows (concurrent turns interleaved, or a client sent it out of the blue);
* a broken exchange — an assistant `tool_calls` message whose calls did not all get an answer:
  the client never sent the tool results, or the reply was cut off mid-stream (stored
  `incomplete`, possibly with half a call). Left in, it would make every later turn fail.
  The one exception is the newest unit when the request itself opens with `tool` messages
  (`continued`): those answer it, and it is the head of the exchange the request completes, so
  it is kept, over the budget if need be, since without it the request is invalid anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

ANSWER_ROLES = frozenset({"tool", "function"})


class Message(Protocol):
    @property
    def role(self) -> str: ...

    @property
    def tokens(self) -> int: ...

    @property
    def calls(self) -> tuple[str | None, ...]:
        """The ids of an assistant message's tool calls (None for a call without an id)."""
        ...

    @property
    def answers(self) -> str | None:
        """The `tool_call_id` a tool message answers."""
        ...


M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class Trimmed(Generic[M]):
    messages: list[M]
    tokens: int
    dropped: int  # messages of the window left out (window edge, broken exchanges, budget)


@dataclass
class _Unit(Generic[M]):
    messages: list[M]
    pending: set[str | None]  # calls of the opening assistant message still unanswered

    @property
    def whole(self) -> bool:
        return not self.pending


def units(window: Sequence[M], *, continued: bool = False) -> list[list[M]]:
    """Split `window` into the whole units history may use, oldest first.

    With `continued`, a newest exchange still waiting for answers is kept: the request brings them.
    """
    result: list[_Unit[M]] = []
    for message in window:
        if message.role in ANSWER_ROLES:
            if not result:
                continue  # an orphan: left out
            current = result[-1]
            if message.answers is not None and message.answers in current.pending:
                current.pending.discard(message.answers)
                current.messages.append(message)
            elif message.role == "function" and not current.pending:
                current.messages.append(message)  # legacy function results carry no call id
            continue  # otherwise an orphan: left out
        if result and not result[-1].whole:
            result.pop()  # a broken exchange, followed by something other than its answers
        calls = message.calls if message.role == "assistant" else ()
        result.append(_Unit([message], set(calls)))
    if result and not result[-1].whole and not continued:
        result.pop()
    return [unit.messages for unit in result]


def trim(
    window: Sequence[M],
    budget: int,
    max_tokens: int | None = None,
    *,
    continued: bool = False,
) -> Trimmed[M]:
    """The newest whole units of `window` whose tokens fit `budget` and `max_tokens`.

    With `continued` (the request opens with `tool` messages), the newest unit is the exchange
    those messages answer; it is kept even when it alone is over the limit.
    """
    limit = budget if max_tokens is None else min(budget, max_tokens)
    if not any(m.calls or m.role in ANSWER_ROLES for m in window):
        return _newest(window, limit)
    return _by_units(window, limit, continued)


def _by_units(window: Sequence[M], limit: int, continued: bool) -> Trimmed[M]:
    parts = units(window, continued=continued)
    kept: list[list[M]] = []
    total = 0
    for index, unit in enumerate(reversed(parts)):
        cost = sum(m.tokens for m in unit)
        pinned = index == 0 and continued and bool(unit[0].calls)
        if total + cost > limit and not pinned:
            break
        kept.append(unit)
        total += cost
    messages = [m for unit in reversed(kept) for m in unit]
    return Trimmed(messages, total, len(window) - len(messages))


def _newest(window: Sequence[M], limit: int) -> Trimmed[M]:
    """`trim` of a window without tool messages: every message is a unit of its own."""
    total = 0
    start = len(window)
    while start and total + window[start - 1].tokens <= limit:
        start -= 1
        total += window[start].tokens
    return Trimmed(list(window[start:]), total, start)


def budget(context_window: int, reserved_output: int, request_tokens: int) -> int:
    """Tokens left for history: context - reply reserve - the request's own messages."""
    return max(0, context_window - reserved_output - request_tokens)
