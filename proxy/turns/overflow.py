"""Overflow recovery (contract §11): an upstream's "context too long" refusal recognised, how much
history a retry leaves out, and the context windows such refusals taught this process.

`refusal` reads an upstream error's status and body. A refusal is recognised by its code
(`context_length_exceeded`, llama.cpp's `exceed_context_size_error`) or by its message, in the
forms below (`FORMS`, one row per wording real servers use), found anywhere in the body: in
`error.message`, in a plain-text body, and inside an error that a gateway (LiteLLM, OpenRouter,
Ollama) wrapped as a JSON string in its own. When the message states the window (`limit`) and
what the request came to (`requested`), the retry leaves out at least the excess plus 5%;
otherwise half of the history's tokens (`to_leave_out`).

A stated window is kept per user and model in the process (`Runtime.context_limits`, never
above the model table's, at most `MAX_LEARNED` of them) and used as that model's
`context_window` for that user's next turns (`limits`), so that they fit the first time. Per
user, because an upstream's error may quote the request: one user's message saying "maximum
context length is 1 tokens" must not shrink the history of everyone else's turns. A small
learned window also caps the reply's reserve at a quarter of it, when the request sets no
`max_tokens`: the table's reserve (4,096 by default) would leave a 4k-window model no history
at all, and a server that refuses an oversized prompt does not count a reply limit the request
did not set.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from proxy import codec
from proxy.tokens import ModelInfo

MARGIN = 1.05  # leave out the excess plus 5%
STATUSES = frozenset({400, 413, 422, 500})  # what servers answer a prompt too long with
CODES = frozenset({"context_length_exceeded", "exceed_context_size_error",
                   "model_max_prompt_tokens_exceeded"})
_N = r"(\d[\d,]*)"  # a count, maybe with thousands separators
MAX_TEXT = 4096  # characters of each message searched (an error's wording comes first)
MAX_LEARNED = 10_000  # (user, model) windows kept; the oldest goes first


def _form(pattern: str) -> re.Pattern[str]:
    """A wording, `{n}` standing for a count."""
    return re.compile(pattern.replace("{n}", _N), re.IGNORECASE | re.DOTALL)


# (server, wording): named groups `limit`, `total` (the request's whole size), `prompt` and
# `completion` (its parts). The first row that matches wins, so longer forms come first.
FORMS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("vllm-0.11", _form(r"maximum context length is (?P<limit>{n}) tokens.*?requested "
                        r"(?P<completion>{n}) output tokens and your prompt contains at least "
                        r"(?P<prompt>{n}) input tokens, for a total of at least (?P<total>{n})")),
    ("openai-parts", _form(r"maximum context length is (?P<limit>{n}) tokens.*?(?:requested|"
                           r"resulted in) (?P<total>{n}) tokens \((?P<prompt>{n}) in the "
                           r"messages, (?P<completion>{n}) in the completion\)")),
    ("openrouter", _form(r"maximum context length is (?P<limit>{n}) tokens.*?requested about "
                         r"(?P<total>{n}) tokens")),
    ("vllm-messages", _form(r"maximum context length is (?P<limit>{n}) tokens.*?requested "
                            r"(?P<prompt>{n}) (?:tokens )?in the messages")),
    ("openai", _form(r"maximum context length is (?P<limit>{n}) tokens.*?(?:your messages "
                     r"resulted in|you requested) (?P<total>{n}) tokens")),
    ("vllm-max-tokens", _form(r"is too large: (?P<completion>{n})\. This model's maximum context "
                              r"length is (?P<limit>{n}) tokens and your request has "
                              r"(?P<prompt>{n}) input tokens")),
    ("vllm-v1", _form(r"maximum context length is (?P<limit>{n}) tokens.*?(?:your request has|"
                      r"your prompt contains at least) (?P<prompt>{n}) input tokens")),
    ("llama.cpp", _form(r"request \((?P<prompt>{n}) tokens\) exceeds the available context size "
                        r"\((?P<limit>{n}) tokens\)")),
    ("anthropic", _form(r"prompt is too long: (?P<total>{n}) tokens > (?P<limit>{n}) maximum")),
    ("gemini", _form(r"input token count \((?P<total>{n})\) exceeds the maximum number of tokens "
                     r"allowed \((?P<limit>{n})\)")),
    ("sglang", _form(r"input \((?P<prompt>{n}) tokens\) is longer than the model's context "
                     r"length \((?P<limit>{n}) tokens\)")),
    ("tgi", _form(r"`inputs` tokens \+ `max_new_tokens` must be <= (?P<limit>{n})\. Given: "
                  r"(?P<prompt>{n}) `inputs` tokens and (?P<completion>{n}) `max_new_tokens`")),
    ("mistral", _form(r"prompt contains (?P<prompt>{n}) tokens.*?too large for model with "
                      r"(?P<limit>{n}) maximum context length")),
    ("xai", _form(r"maximum prompt length is (?P<limit>{n}) but the request contains "
                  r"(?P<total>{n}) tokens")),
    ("context-length", _form(r"maximum context length is (?P<limit>{n}) tokens")),
    ("llama.cpp-old", _form(r"the request exceeds the available context size")),
    ("ollama", _form(r"the input length exceeds the context length")),
    ("openai-responses", _form(r"input exceeds the context window")),
    ("litellm", _form(r"ContextWindowExceededError")),
    ("generic", _form(r"context[ _](?:length|window) exceeded|exceeds? (?:the )?(?:model's )?"
                      r"(?:maximum )?context (?:length|window|size)")),
)


@dataclass(frozen=True, slots=True)
class Refusal:
    """An upstream's refusal of a request too long for its context window: the window and the
    request's size in the upstream's tokens, when the message says them."""

    form: str
    limit: int | None = None
    requested: int | None = None

    @property
    def excess(self) -> int | None:
        if self.limit is None or self.requested is None or self.requested <= self.limit:
            return None
        return self.requested - self.limit


def refusal(status: int, raw: bytes) -> Refusal | None:
    """The refusal `raw` (an upstream error's body) states, or None for any other error."""
    if status not in STATUSES:
        return None
    try:
        body: Any = codec.loads(raw)
    except codec.InvalidJSON:
        body = raw.decode("utf-8", "replace")
    texts: list[str] = []
    coded = False
    numbers: dict[str, int] = {}
    for key, value in _leaves(body):
        if isinstance(value, str):
            texts.append(value)
            coded = coded or (key in ("code", "type") and value in CODES)
        elif key in ("n_ctx", "n_prompt_tokens") and isinstance(value, int):
            numbers[key] = value
    for text in texts:
        for form, pattern in FORMS:
            match = pattern.search(text, 0, MAX_TEXT)
            if match is not None:
                return _stated(form, match, numbers)
    if coded or numbers.keys() == {"n_ctx", "n_prompt_tokens"}:
        return _stated("code", None, numbers)
    return None


def _leaves(value: Any, key: str = "", depth: int = 0) -> Iterator[tuple[str, Any]]:
    """Every (key, scalar) in a JSON value, JSON held in a string included (a gateway's
    wrapping of another server's error)."""
    if depth > 8:
        return
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, str(k), depth + 1)
    elif isinstance(value, list):
        for v in value:
            yield from _leaves(v, key, depth + 1)
    else:
        yield key, value
        if isinstance(value, str) and value.lstrip().startswith(("{", "[")):
            try:
                inner = codec.loads(value)
            except codec.InvalidJSON:
                return
            yield from _leaves(inner, key, depth + 1)


def _stated(form: str, match: re.Match[str] | None, numbers: dict[str, int]) -> Refusal:
    found = {name: int(text.replace(",", "")) for name, text in
             (match.groupdict() if match is not None else {}).items() if text is not None}
    limit = found.get("limit", numbers.get("n_ctx"))
    total = found.get("total")
    if total is None and "prompt" in found:
        total = found["prompt"] + found.get("completion", 0)
    if total is None:
        total = numbers.get("n_prompt_tokens")
    return Refusal(form, limit, total)


def to_leave_out(refused: Refusal, injected: int) -> int:
    """Tokens of history the retry leaves out (at least): the excess plus 5% when stated, else
    half the injected history's."""
    excess = refused.excess
    if excess is not None:
        return math.ceil(excess * MARGIN)
    return math.ceil(injected / 2)


Learned = dict[tuple[str, str], int]  # (user id, model) -> the window a refusal stated


def learn(
    limits: Learned, user_id: str, model: object, refused: Refusal, table_window: int
) -> None:
    """Keep the window the refusal of `user_id`'s request stated for `model`, if smaller than
    what is known."""
    if not isinstance(model, str) or refused.limit is None or refused.limit <= 0:
        return
    key = (user_id, model)
    known = min(limits.get(key, table_window), table_window)
    if refused.limit < known:
        if key not in limits and len(limits) >= MAX_LEARNED:
            del limits[next(iter(limits))]
        limits[key] = refused.limit


def limits(
    learned: Learned, user_id: str, model: object, info: ModelInfo
) -> tuple[int, int]:
    """`model`'s (context window, default reply reserve) for `user_id`: the table's, or the
    window a refusal of theirs stated, with the reserve at most a quarter of it."""
    window = learned.get((user_id, model)) if isinstance(model, str) else None
    if window is None or window >= info.context_window:
        return info.context_window, info.reserve_output_tokens
    return window, min(info.reserve_output_tokens, window // 4)
