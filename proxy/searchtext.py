"""Search words: what is indexed for a message or a session name, the query, the snippet. PURE.

A word is a run of letters and digits (Unicode: `[^\\W_]`), case-folded, cut into pieces of at
most `MAX_WORD` characters. The same function splits what is stored and what is searched, so
the two always agree, whatever the database's locale and whatever PostgreSQL's own text parser
would make of e-mail addresses, numbers or file paths (`a.b@c.io` is the words `a`, `b`, `c`,
`io`). A word never holds NUL, a lone surrogate, a quote, a backslash or a space, so it is
always storable and always a plain tsquery lexeme.

What is indexed for a message: the text of its content (a string, or the `text` of each part of
an array) and its tool calls' `arguments`, at most `MAX_INDEXED` characters of it (which keeps
any message's tsvector well under PostgreSQL's 1 MB limit). The database receives the words as
one space-separated string per message and turns it into a tsvector with `array_to_tsvector`,
without parsing it again.
"""

from __future__ import annotations

import re
from typing import Any

MAX_WORD = 100  # characters; PostgreSQL refuses a lexeme over 2,046 bytes
MAX_INDEXED = 100_000  # characters of a message's text that are indexed
MAX_QUERY = 1_000  # characters of `q`
MAX_QUERY_WORDS = 32
SNIPPET = 160  # characters of a snippet, about
SNIPPET_BEFORE = 50  # of which before the first match, about

_WORD = re.compile(rf"[^\W_]{{1,{MAX_WORD}}}")
_SPACE = re.compile(r"\s+")


class BadQuery(ValueError):
    """`q` has no word to search for, or is too long."""


def message_text(message: dict[str, Any]) -> str:
    """The searchable text of a message (a chat message object): content, then arguments."""
    content = message.get("content")
    pieces: list[str] = []
    if isinstance(content, str):
        pieces.append(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(text := part.get("text"), str):
                pieces.append(text)
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(args := function.get("arguments"), str):
                pieces.append(args)
    return pieces[0] if len(pieces) == 1 else "\n".join(pieces)


def words(text: str | None) -> str:
    """The words of `text` (its first MAX_INDEXED characters), space-separated, for storing."""
    if not text:
        return ""
    return " ".join(_WORD.findall(text[:MAX_INDEXED].casefold()))


def message_words(message: dict[str, Any]) -> str:
    return words(message_text(message))


def query_words(q: str) -> list[str]:
    """The distinct words of a search query; BadQuery when there is none or `q` is too long."""
    if len(q) > MAX_QUERY:
        raise BadQuery(f"q must be at most {MAX_QUERY} characters")
    found = list(dict.fromkeys(_WORD.findall(q.casefold())))
    if not found:
        raise BadQuery("q must contain at least one letter or digit")
    if len(found) > MAX_QUERY_WORDS:
        raise BadQuery(f"q must have at most {MAX_QUERY_WORDS} words")
    return found


def tsquery(found: list[str]) -> str:
    """A tsquery (its text form) matching every word as a prefix: `'ab':* & 'cd':*`.

    Built from words alone (no quote, backslash or operator can be in one), and cast with
    `::tsquery`, which takes lexemes as they are, never through `to_tsquery`'s parser.
    """
    return " & ".join(f"'{w}':*" for w in found)


def snippet(text: str, found: list[str]) -> str:
    """About SNIPPET characters of `text` around the first word that starts with a query word,
    whitespace collapsed, with `…` where it was cut. Plain text, never markup."""
    start = 0
    for match in _WORD.finditer(text):
        word = match.group().casefold()
        if any(word.startswith(w) for w in found):
            start = match.start()
            break
    begin = max(0, start - SNIPPET_BEFORE)
    if begin > 0:  # start at a word boundary
        space = text.find(" ", begin, start)
        begin = space + 1 if space != -1 else begin
    end = min(len(text), begin + SNIPPET)
    if end < len(text):
        space = text.rfind(" ", start, end)
        end = space if space > start else end
    piece = _SPACE.sub(" ", text[begin:end]).strip()
    return ("…" if begin > 0 else "") + piece + ("…" if end < len(text) else "")
