"""What a client resends of its own history (contract §6, "Clients that keep their own
history"), pure: no I/O.

Agent tool loops send `[user, assistant(tool_calls), tool]` on the call after a tool call, and
chat apps resend the whole conversation, although the session already holds all but the newest
messages. The request's messages after its head that begin with a run equal to the session's
newest stored messages are that run (`find`): it is not stored again, and the injected history
ends before it.

Two messages are equal when these agree (a field that is null, absent, or an empty
`tool_calls` list is one and the same):

- `role`, `name`, `tool_call_id`: exactly;
- `content`: exactly — a string character for character, an array of parts as the JSON it is
  (key order aside); for an assistant message with tool calls, `""` is null;
- `tool_calls`: the same calls in the same order, each with the same `id`, `function.name` and
  `function.arguments` (arguments as the JSON they hold, key order and spacing aside, since
  some clients parse and re-serialise them; exactly when they are not JSON);
- the legacy `function_call`'s `name` and `arguments`, and an audio reply's `audio.id`.

Everything else (`refusal`, `annotations`, `audio`'s other fields, a call's `type`, fields an
SDK adds such as `parsed`) is ignored: upstreams and SDKs add, drop and reshape those.

Cost: nothing is decoded unless the roles line up first. `find` compares each message's kind
(role, and whether it carries tool calls) — known for a stored message without decoding it —
then decodes only the stored messages inside the longest run of equal kinds. Both passes are
linear (Knuth-Morris-Pratt), whatever the messages.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeVar

import msgspec

from proxy import codec

Key = tuple[Any, ...]
T = TypeVar("T")
_sorted = msgspec.json.Encoder(order="sorted").encode


class StoredMessage(Protocol):
    """A stored message as the overlap sees it: its role and tool-call flag (columns), and its
    JSON text, decoded only when it can match."""

    @property
    def role(self) -> str: ...

    @property
    def has_tool_calls(self) -> bool: ...

    @property
    def body(self) -> str: ...


def find(request: Sequence[Mapping[str, Any]], stored: Sequence[StoredMessage]) -> int:
    """The largest k such that `request[:k]` equals `stored[-k:]` (oldest first); 0 for none."""
    limit = min(len(request), len(stored))
    if limit == 0:
        return 0
    mine, theirs = request[:limit], stored[len(stored) - limit:]
    # The cheap pass: the run can be no longer than the longest run of equal kinds.
    longest = _suffix_prefix([(s.role, s.has_tool_calls) for s in theirs],
                             [kind(m) for m in mine])
    if longest == 0:
        return 0
    theirs = theirs[len(theirs) - longest:]
    return _suffix_prefix([stored_key(s) for s in theirs], [key(m) for m in mine[:longest]])


def stored_since(new: Sequence[Mapping[str, Any]], since: Sequence[StoredMessage]) -> int:
    """How many of `new`, from the first, are the messages `since` begins with.

    For a turn that recognised an overlap while another turn on the session stored messages
    after it: `since` is what was stored after the overlap, `new` what this turn would add.
    """
    count = 0
    for mine, theirs in zip(new, since, strict=False):
        if kind(mine) != (theirs.role, theirs.has_tool_calls) or key(mine) != stored_key(theirs):
            break
        count += 1
    return count


def kind(message: Mapping[str, Any]) -> tuple[Any, bool]:
    """The role and whether the message opens a tool exchange, as stored beside its body."""
    role = message.get("role")
    return role, role == "assistant" and bool(message.get("tool_calls"))


def key(message: Mapping[str, Any]) -> Key:
    """What two equal messages share (the module's docstring): equal keys, equal messages."""
    role = message.get("role")
    calls = message.get("tool_calls")
    content = message.get("content")
    if content == "" and calls and role == "assistant":
        content = None
    function_call = message.get("function_call")
    audio = message.get("audio")
    return (
        _exact(role),
        _exact(content),
        _exact(message.get("name")),
        _exact(message.get("tool_call_id")),
        tuple(map(_call, calls)) if isinstance(calls, list) and calls else _exact(calls or None),
        _function(function_call) if isinstance(function_call, dict) else _exact(function_call),
        _exact(audio.get("id")) if isinstance(audio, dict) else _exact(audio),
    )


def stored_key(message: StoredMessage) -> Key:
    value = codec.loads(message.body)
    return key(value if isinstance(value, dict) else {})


def _exact(value: Any) -> Any:
    """A value compared exactly: a string as itself, anything else as its JSON text with
    sorted keys (so `1`, `1.0` and `true` differ, and key order does not matter)."""
    if value is None or isinstance(value, str):
        return value
    try:
        return ("json", _sorted(value))
    except UnicodeEncodeError:  # a lone surrogate: the stdlib writes it as an escape
        return ("json", json.dumps(value, sort_keys=True, ensure_ascii=True))


def _call(call: Any) -> Any:
    if not isinstance(call, dict):
        return _exact(call)
    function = call.get("function")
    if not isinstance(function, dict):
        return (_exact(call.get("id")), _exact(function))
    return (_exact(call.get("id")), *_function(function))


def _function(function: dict[str, Any]) -> tuple[Any, Any]:
    return _exact(function.get("name")), _arguments(function.get("arguments"))


def _arguments(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return ("arguments", _exact(codec.loads_strict(value)))
        except codec.InvalidJSON:
            pass
    return _exact(value)


def _suffix_prefix(text: Sequence[T], pattern: Sequence[T]) -> int:
    """The largest k such that `text[-k:] == pattern[:k]`, in linear time (the failure function
    of Knuth-Morris-Pratt over `pattern`, then `text` run through it)."""
    if not text or not pattern:
        return 0
    n = len(pattern)
    fail = [0] * n
    j = 0
    for i in range(1, n):
        while j and pattern[i] != pattern[j]:
            j = fail[j - 1]
        if pattern[i] == pattern[j]:
            j += 1
        fail[i] = j
    j = 0
    for item in text:
        while j and (j == n or item != pattern[j]):
            j = fail[j - 1]
        if item == pattern[j]:
            j += 1
    return j

