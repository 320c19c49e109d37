"""What a client can do to a live server's connections (issue 13, items 5, 7, 9, 13 and 15).

Raw sockets against a real `chatproxy serve` (its uvicorn protocol is where these defects
lived): silent connections and one-byte-at-a-time heads are closed after the head timeout, an
oversized head gets 431, connections beyond the cap get 503, and the server keeps answering
everyone else meanwhile. Paths and header bytes are checked here too, as a client's bytes
reach the server (every HTTP client library normalises dot segments before sending).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import User
from tests.fault_helpers import FakeUpstream, Serve, serve_env

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

HEAD_TIMEOUT = 1  # seconds, in the guarded server's settings


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


def start(database_url: str, fake: FakeUpstream, tmp: Path, **env: str) -> Serve:
    server = Serve(serve_env(database_url, fake.base_url, tmp, CHATPROXY_LOG_LEVEL="warning",
                             **env), tmp / "serve.log")
    return server.start()


@pytest.fixture(scope="module")
def guarded(database_url: str, fake: FakeUpstream,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    server = start(database_url, fake, tmp_path_factory.mktemp("guarded"),
                   CHATPROXY_HEAD_TIMEOUT=str(HEAD_TIMEOUT), CHATPROXY_MAX_CONNECTIONS="1000")
    yield server
    server.stop()


@pytest.fixture
async def api(guarded: Serve, alice: User) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=guarded.url, headers=alice.headers,
                                 timeout=30) as client:
        yield client


def envelope(status: int, code: str, message: str, type_: str = "invalid_request_error",
             param: str | None = None) -> tuple[int, dict[str, Any]]:
    return status, {"error": {"message": message, "type": type_, "param": param, "code": code}}


TIMEOUT_408 = envelope(408, "request_timeout", "The request head did not arrive in time")
TOO_LARGE_431 = envelope(431, "request_header_too_large", "The request head is too large")
BUSY_503 = envelope(503, "too_many_connections",
                    "The server has too many open connections, try again", "server_error")


async def connect(server: Serve) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port)


async def answer_of(reader: asyncio.StreamReader, within: float = 15) -> tuple[int, Any]:
    """The one response a refused connection gets (status, JSON body), read up to its end."""
    async with asyncio.timeout(within):
        raw = await reader.read()  # until the server closes
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower(), head
    return int(head.split(b" ", 2)[1]), json.loads(body)


async def closed(reader: asyncio.StreamReader, within: float) -> bool:
    """Whether the server closed the connection (EOF) within `within` seconds, sending nothing."""
    try:
        async with asyncio.timeout(within):
            return await reader.read(1) == b""
    except TimeoutError:
        return False


async def busy_traffic(api: httpx.AsyncClient, seconds: float) -> int:
    """Ordinary requests, one after another, for `seconds`; how many were answered 200."""
    ok = 0
    deadline = time.monotonic() + seconds
    sid = (await api.post("/v1/chat/sessions", json={})).json()["id"]
    while time.monotonic() < deadline:
        r = await api.post("/v1/chat/completions", json={
            "model": "echo", "session_id": sid, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        assert (await api.get("/health")).status_code == 200
        ok += 1
    return ok


# --- 7. silent and slow connections --------------------------------------------------------------


async def test_silent_connections_are_closed_after_the_head_timeout(
    guarded: Serve, api: httpx.AsyncClient
) -> None:
    silent = [await connect(guarded) for _ in range(200)]
    # Not cut short: a client gets the whole head timeout to start its request.
    assert not any(await asyncio.gather(*(closed(r, 0.3) for r, _ in silent)))
    served = asyncio.ensure_future(busy_traffic(api, HEAD_TIMEOUT + 1.0))
    assert all(await asyncio.gather(*(closed(r, HEAD_TIMEOUT + 10) for r, _ in silent)))
    assert await served > 0  # the server went on serving meanwhile
    for _, writer in silent:
        writer.close()


async def trickle(server: Serve) -> tuple[int, Any]:
    """A request head sent a byte at a time, never finished: what the server answers."""
    reader, writer = await connect(server)
    writer.write(b"GET /health HTTP/1.1\r\nHost: proxy\r\nX-Slow: ")
    answer = asyncio.ensure_future(answer_of(reader))
    try:
        while not answer.done():
            writer.write(b"a")
            await writer.drain()
            await asyncio.sleep(0.2)
    except ConnectionError:
        pass  # the server closed while a byte was on its way
    writer.close()
    return await answer


async def test_a_head_sent_a_byte_at_a_time_gets_408_and_is_closed(
    guarded: Serve, api: httpx.AsyncClient
) -> None:
    served = asyncio.ensure_future(busy_traffic(api, HEAD_TIMEOUT + 1.0))
    answers = await asyncio.gather(*(trickle(guarded) for _ in range(50)))
    assert answers == [TIMEOUT_408] * 50
    assert await served > 0


async def test_an_oversized_head_gets_431_and_a_large_one_is_served(
    guarded: Serve, alice: User
) -> None:
    reader, writer = await connect(guarded)
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer ")

    async def flood() -> None:  # the 16 MB Authorization header
        try:
            for _ in range(256):
                writer.write(b"a" * 65536)
                await writer.drain()
        except ConnectionError:
            pass

    sending = asyncio.ensure_future(flood())
    assert await answer_of(reader) == TOO_LARGE_431
    await sending
    writer.close()
    async with httpx.AsyncClient(base_url=guarded.url, timeout=30) as http:
        r = await http.get("/health", headers={"x-large": "a" * 60_000})  # under 64 KiB
        assert (r.status_code, r.json()) == (200, {"status": "ok"})


async def test_a_body_past_the_head_cap_and_pipelined_requests_are_served(
    guarded: Serve, alice: User
) -> None:
    # One write: a short head, then a body four times the head cap. Only the head is capped.
    body = json.dumps({"model": "echo", "messages": [{"role": "user", "content": "x" * 262_144}]})
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer "
            f"{alice.key}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n")
    reader, writer = await connect(guarded)
    writer.write(head.encode() + body.encode())
    async with asyncio.timeout(30):
        raw = await reader.read()
    writer.close()
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert json.loads(raw.partition(b"\r\n\r\n")[2])["choices"][0]["message"]["content"] == (
        "reply to " + "x" * 262_144)
    # Two requests in one write, then the connection left idle: both answered, then closed.
    reader, writer = await connect(guarded)
    writer.write(b"GET /health HTTP/1.1\r\nHost: proxy\r\n\r\n" * 2)
    async with asyncio.timeout(HEAD_TIMEOUT + 10):
        raw = await reader.read()
    writer.close()
    assert raw.count(b"HTTP/1.1 200 OK") == 2 and raw.endswith(b'{"status":"ok"}')


async def test_a_malformed_request_gets_the_envelope(guarded: Serve) -> None:
    reader, writer = await connect(guarded)
    writer.write(b"NOT HTTP AT ALL\r\n\r\n")
    assert await answer_of(reader) == envelope(400, "invalid_value", "Invalid HTTP request")
    writer.close()


async def test_connections_beyond_the_cap_get_503_and_others_go_on_later(
    database_url: str, fake: FakeUpstream, tmp_path: Path
) -> None:
    capped = start(database_url, fake, tmp_path, CHATPROXY_MAX_CONNECTIONS="20")
    try:
        held = [await connect(capped) for _ in range(20)]
        await asyncio.sleep(0.2)  # all accepted
        reader, writer = await connect(capped)
        assert await answer_of(reader) == BUSY_503
        writer.close()
        async with httpx.AsyncClient(base_url=capped.url, timeout=30) as http:
            r = await http.get("/health")  # a client that sends at once still reads the answer
            assert (r.status_code, r.json()) == BUSY_503
            for _, held_writer in held:
                held_writer.close()
            await asyncio.sleep(0.5)
            r = await http.get("/health")
            assert (r.status_code, r.json()) == (200, {"status": "ok"})
    finally:
        capped.stop()


# --- 5 and 13. paths as a client's bytes reach the server ------------------------------------

BAD_PATH = envelope(400, "invalid_value", "Invalid path: dot segments, backslashes, encoded ? "
                    "or #, and characters other than printable ASCII are not allowed",
                    param="path")


async def raw_get(server: Serve, path: bytes, key: str) -> tuple[int, bytes]:
    reader, writer = await connect(server)
    writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n"
                 b"Authorization: Bearer " + key.encode() + b"\r\n\r\n")
    async with asyncio.timeout(15):
        raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def test_passthrough_paths_never_leave_the_upstream_base(
    guarded: Serve, fake: FakeUpstream, alice: User
) -> None:
    before = len(fake.paths)
    for path in (b"/v1/../../internal/billing", b"/v1/%2e%2e/%2e%2e/internal/keys",
                 b"/v1/%2E%2e/internal", b"/v1/models%3Fadmin=1", b"/v1/models%23x",
                 b"/v1/models%0D%0AX-Injected:%20yes", b"/v1/a%5C..%5Cinternal"):
        status, body = await raw_get(guarded, path, alice.key)
        assert (path, status, json.loads(body)) == (path, *BAD_PATH)
    assert fake.paths[before:] == []
    status, _ = await raw_get(guarded, b"/v1/models/org%2Fmodel", alice.key)
    assert (status, fake.paths[before:]) == (200, [b"/v1/models/org/model"])


# --- 9 and 15. header bytes, and what Connection names -------------------------------------------


async def test_header_bytes_travel_as_they_came_and_hop_by_hop_ones_stop(
    guarded: Serve, fake: FakeUpstream, api: httpx.AsyncClient
) -> None:
    sid = (await api.post("/v1/chat/sessions", json={})).json()["id"]
    for session in (sid, None):
        before = len(fake.requests)
        body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
        r = await api.post("/v1/chat/completions",
                           json={**body, "session_id": session} if session else body,
                           headers=[("x-title", "Café".encode()), ("connection", "x-hop"),
                                    ("x-hop", "secret")])
        assert r.status_code == 200, r.text
        headers, _ = fake.requests[before]
        assert headers["x-title"].encode("latin-1") == "Café".encode()
        assert "x-hop" not in headers
