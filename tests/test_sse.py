"""The event splitter on long lines (issue 13, item 8): linear work, one event capped.

Linearity is checked by counting the bytes the boundary search is given, not by a clock; a
40 MB line from the upstream ends a session's stream with the error event.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import respx
from hypothesis import given
from hypothesis import strategies as st

from proxy import sse
from proxy.config import Settings
from proxy.sse import EventSplitter, EventTooLarge
from tests.conftest import User, configured
from tests.test_streaming import Upstream, chunk, error_event, event, streaming
from tests.turns import chat, new_session, proxy_with, stored, u

BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")


class Counting:
    """Stands in for the boundary pattern and adds up how many bytes each search may scan."""

    def __init__(self) -> None:
        self.scanned = 0

    def search(self, buffer: bytes | bytearray, pos: int = 0) -> re.Match[bytes] | None:
        self.scanned += len(buffer) - pos
        return BOUNDARY.search(buffer, pos)


def feed_all(splitter: EventSplitter, chunks: list[bytes]) -> list[bytes]:
    return [e for c in chunks for e in splitter.feed(c)]


def test_a_long_line_is_searched_once_not_once_per_chunk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    counting = Counting()
    monkeypatch.setattr(sse, "_BOUNDARY", counting)
    line = b"data: " + b"x" * (2 * 1024 * 1024)
    chunks = [line[i:i + 1024] for i in range(0, len(line), 1024)] + [b"\n\n"]
    events = feed_all(EventSplitter(), chunks)
    assert events == [line + b"\n\n"]
    # Each byte once, plus 3 bytes of overlap per chunk (a boundary across two chunks). A
    # search from the start of the buffer on every chunk would be about 1,000 times this.
    total = len(line) + 2
    assert counting.scanned <= total + 3 * len(chunks)


def cut(data: bytes, sizes: list[int]) -> Iterator[bytes]:
    start = 0
    for size in sizes:
        yield data[start:start + size]
        start += size
    yield data[start:]


@given(st.binary(max_size=200).map(lambda b: bytes(b"a\r\n:"[x % 4] for x in b)),
       st.lists(st.integers(0, 7), max_size=60))
def test_events_are_cut_exactly_where_the_whole_stream_has_boundaries(
    data: bytes, sizes: list[int]
) -> None:
    expected, start = [], 0
    for match in BOUNDARY.finditer(data):
        expected.append(data[start:match.end()])
        start = match.end()
    splitter = EventSplitter()
    assert feed_all(splitter, list(cut(data, sizes))) == expected
    assert splitter.pending == data[start:]


def test_an_event_over_the_cap_raises_after_the_events_before_it() -> None:
    splitter = EventSplitter(max_event_bytes=1024)
    assert splitter.feed(b"data: a\n\ndata: " + b"x" * 2000) == [b"data: a\n\n"]
    with pytest.raises(EventTooLarge):
        splitter.feed(b"\n\n")
    splitter = EventSplitter(max_event_bytes=1024)
    assert splitter.feed(b"data: " + b"y" * 1000) == []
    with pytest.raises(EventTooLarge) as raised:
        splitter.feed(b"y" * 100)  # still incomplete, but over the cap already
    assert raised.value.body()["error"] == {
        "message": "The upstream sent an event larger than 1024 bytes",
        "type": "server_error", "param": None, "code": "upstream_error"}
    splitter = EventSplitter(max_event_bytes=1024)  # one chunk holding a whole huge event
    with pytest.raises(EventTooLarge):
        splitter.feed(b"data: " + b"z" * 2000 + b"\n\n")


async def test_a_40_mb_line_ends_the_stream_with_the_error_event(
    client: Any, upstream: respx.Router, alice: User
) -> None:
    piece = b"z" * 65536
    line = [b"data: ", *([piece] * 640)]  # 40 MiB, no line end
    body = Upstream(*[event(chunk({"role": "assistant", "content": "so far"}))], *line,
                    b"\n\n", event(chunk(finish="stop")), b"data: [DONE]\n\n")
    upstream.post("/chat/completions").mock(return_value=streaming(body))
    sid = await new_session(client, alice)
    r = await chat(client, alice, sid, u("hi"), stream=True)
    assert r.status_code == 200
    assert r.content == (event(chunk({"role": "assistant", "content": "so far"}))
                         + error_event("The upstream sent an event larger than 16777216 bytes"))
    assert body.closed  # the upstream request was given up
    assert await stored(client, alice, sid) == [
        {"seq": 1, "role": "user", "content": "hi", "tokens": 5, "status": "complete"},
        {"seq": 2, "role": "assistant", "content": "so far", "tokens": 6, "status": "incomplete"},
    ]


async def test_the_cap_is_a_setting(
    settings: Settings, upstream: respx.Router, alice: User
) -> None:
    body = Upstream(b"data: " + b"w" * 5000 + b"\n\n", b"data: [DONE]\n\n")
    upstream.post("/chat/completions").mock(return_value=streaming(body))
    async with proxy_with(configured(settings, max_event_bytes=4096), upstream) as proxy:
        sid = await new_session(proxy, alice)
        r = await chat(proxy, alice, sid, u("hi"), stream=True)
        assert r.content == error_event("The upstream sent an event larger than 4096 bytes")
