"""The history rules of contract §7, pure: no I/O, no tokenizing.

The stored window (the newest `max_history_messages`, oldest first) is cut into units: a message
that is not a `tool` message opens a unit, and `tool` messages join the unit before them, so an
assistant message with `tool_calls` and its answers stay together. `tool` messages at the very
start of the window lost their assistant to the window's edge and are left out. Whole units are
then dropped, oldest first, until the rest fits the token budget. The result is always a suffix
of whole units that never begins with a `tool` message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


class Message(Protocol):
    @property
    def role(self) -> str: ...

    @property
    def tokens(self) -> int: ...


M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class Trimmed(Generic[M]):
    messages: list[M]
    tokens: int
    dropped: int  # messages of the window left out (window edge or budget)


def units(window: Sequence[M]) -> list[list[M]]:
    """Split a window into whole units, leaving out leading orphan `tool` messages."""
    result: list[list[M]] = []
    for message in window:
        if message.role == "tool":
            if result:
                result[-1].append(message)
        else:
            result.append([message])
    return result


def trim(window: Sequence[M], budget: int, max_tokens: int | None = None) -> Trimmed[M]:
    """The newest whole units of `window` whose tokens fit `budget` and `max_tokens`."""
    limit = budget if max_tokens is None else min(budget, max_tokens)
    kept: list[list[M]] = []
    total = 0
    for unit in reversed(units(window)):
        cost = sum(m.tokens for m in unit)
        if total + cost > limit:
            break
        kept.append(unit)
        total += cost
    messages = [m for unit in reversed(kept) for m in unit]
    return Trimmed(messages, total, len(window) - len(messages))


def budget(context_window: int, reserved_output: int, request_tokens: int) -> int:
    """Tokens left for history: context - reply reserve - the request's own messages."""
    return max(0, context_window - reserved_output - request_tokens)
