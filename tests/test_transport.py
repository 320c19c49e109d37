"""proxy/transport.py against real sockets: local asyncio servers on 127.0.0.1, no mocks.

Each server is scripted per request (`Script`): it parses the request with h11, records it,
and writes the raw answer bytes it is given, so framing, keep-alive and failures are exact.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import h11
import httpx
import pytest
import trustme

from proxy.config import Settings
from proxy.transport import FastTransport
from proxy.upstream import make_client


@dataclass
class Seen:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    connection: int


Reply = Callable[[Seen, asyncio.StreamWriter], Awaitable[bool]]  # True: keep the connection


@dataclass
class Server:
    reply: Reply
    requests: list[Seen] = field(default_factory=list)
    connections: int = 0
    closed_connections: int = 0
    port: int = 0
    base: str = ""
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    readers: dict[int, asyncio.StreamReader] = field(default_factory=dict)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.connections += 1
        number = self.connections
        self.readers[number] = reader
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                seen = await _read_request(conn, reader, number)
                if seen is None:
                    break
                self.requests.append(seen)
                if not await self.reply(seen, writer):
                    break
                await writer.drain()
                conn.start_next_cycle() if conn.our_state is h11.DONE else None
                if conn.our_state is not h11.IDLE:  # h11 did not see our raw answer: reset
                    conn = h11.Connection(h11.SERVER)
        except (ConnectionError, h11.RemoteProtocolError, asyncio.CancelledError):
            pass
        finally:
            self.closed_connections += 1
            writer.close()


async def _read_request(
    conn: h11.Connection, reader: asyncio.StreamReader, number: int
) -> Seen | None:
    request: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(65536)
            if not data and request is None:
                return None
            conn.receive_data(data)
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            headers = {k.decode(): v.decode() for k, v in request.headers}
            return Seen(request.method.decode(), request.target.decode(), headers, bytes(body),
                        number)
        elif isinstance(event, h11.ConnectionClosed):
            return None


def ok(body: bytes, *extra: str) -> bytes:
    head = ["HTTP/1.1 200 OK", f"content-length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def fixed(*answers: bytes) -> Reply:
    """Answer the n-th request with the n-th bytes (the last one repeats)."""
    count = 0

    async def reply(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        nonlocal count
        answer = answers[min(count, len(answers) - 1)]
        count += 1
        writer.write(answer)
        return True

    return reply


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[Server]]]:
    servers: list[tuple[asyncio.Server, Server]] = []

    async def start(reply: Reply, tls: ssl.SSLContext | None = None) -> Server:
        server = Server(reply)
        listener = await asyncio.start_server(server.handle, "127.0.0.1", 0, ssl=tls)
        servers.append((listener, server))
        server.port = listener.sockets[0].getsockname()[1]
        server.base = f"{'https' if tls else 'http'}://127.0.0.1:{server.port}"
        return server

    yield start
    for listener, server in servers:
        listener.close()
        for task in server.tasks:
            task.cancel()
        await asyncio.gather(*server.tasks, return_exceptions=True)
        await listener.wait_closed()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    client = httpx.AsyncClient(transport=FastTransport(), timeout=httpx.Timeout(5.0))
    yield client
    await client.aclose()


async def test_keep_alive_reuses_one_connection(serve: Any, http: httpx.AsyncClient) -> None:
    server = await serve(fixed(ok(b"one"), ok(b"two"), ok(b"three")))
    bodies = [(await http.get(f"{server.base}/v1/x?n={n}")).content for n in range(3)]
    assert bodies == [b"one", b"two", b"three"]
    assert [(s.method, s.target, s.connection) for s in server.requests] == [
        ("GET", "/v1/x?n=0", 1), ("GET", "/v1/x?n=1", 1), ("GET", "/v1/x?n=2", 1),
    ]
    assert server.requests[0].headers["host"] == f"127.0.0.1:{server.port}"


async def test_chunked_answer_is_read_whole_and_the_connection_kept(
    serve: Any, http: httpx.AsyncClient
) -> None:
    chunked = (b"HTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\nx-a: 1\r\n\r\n"
               b"5\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\n\r\n")
    server = await serve(fixed(chunked, ok(b"after")))
    first = await http.post(f"{server.base}/p", content=b"{}")
    second = await http.get(f"{server.base}/q")
    assert (first.status_code, first.content, first.headers["x-a"]) == (201, b"hello world", "1")
    assert first.http_version == "HTTP/1.1"
    assert second.content == b"after"
    assert server.connections == 1
    assert server.requests[0].body == b"{}"
    assert server.requests[0].headers["content-length"] == "2"


async def test_body_until_the_connection_ends(serve: Any, http: httpx.AsyncClient) -> None:
    async def reply(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nno length here")
        return False

    server = await serve(reply)
    assert (await http.get(server.base + "/")).content == b"no length here"
    assert (await http.get(server.base + "/")).content == b"no length here"
    assert server.connections == 2


async def test_connection_close_is_honoured(serve: Any, http: httpx.AsyncClient) -> None:
    server = await serve(fixed(ok(b"bye", "connection: close"), ok(b"again")))
    assert (await http.get(server.base + "/")).content == b"bye"
    assert (await http.get(server.base + "/")).content == b"again"
    assert [s.connection for s in server.requests] == [1, 2]


async def test_streamed_upload_goes_chunked(serve: Any, http: httpx.AsyncClient) -> None:
    server = await serve(fixed(ok(b"stored")))

    async def parts() -> AsyncIterator[bytes]:
        for n in range(50):
            yield b"part %d;" % n
            await asyncio.sleep(0)

    response = await http.post(server.base + "/upload", content=parts())
    assert response.content == b"stored"
    assert server.requests[0].body == b"".join(b"part %d;" % n for n in range(50))
    assert server.requests[0].headers["transfer-encoding"] == "chunked"


async def test_large_bodies_both_ways(serve: Any, http: httpx.AsyncClient) -> None:
    big = bytes(range(256)) * (8 * 4096)  # 8 MiB

    async def echo(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(ok(seen.body[::-1]))
        return True

    server = await serve(echo)
    response = await http.post(server.base + "/echo", content=big)
    assert response.content == big[::-1]
    async with http.stream("POST", server.base + "/echo", content=big) as streamed:
        got = [chunk async for chunk in streamed.aiter_raw()]
    assert b"".join(got) == big[::-1]
    assert len(got) > 1  # handed over as it arrived, not in one piece
    assert server.connections == 1


async def test_head_reads_no_body_and_keeps_the_connection(
    serve: Any, http: httpx.AsyncClient
) -> None:
    server = await serve(fixed(b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n", ok(b"body")))
    head = await http.head(server.base + "/file")
    assert (head.status_code, head.headers["content-length"], head.content) == (200, "1234", b"")
    assert (await http.get(server.base + "/file")).content == b"body"
    assert server.connections == 1


async def test_refused_connection_is_a_connect_error(http: httpx.AsyncClient) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(httpx.ConnectError):
        await http.get(f"http://127.0.0.1:{port}/")


async def test_no_answer_is_a_read_timeout(serve: Any) -> None:
    async def silent(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(30)
        return False

    server = await serve(silent)
    async with httpx.AsyncClient(transport=FastTransport(),
                                 timeout=httpx.Timeout(5.0, read=0.2)) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.get(server.base + "/")


async def test_a_stall_between_body_bytes_is_a_read_timeout(serve: Any) -> None:
    async def stalls(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf")
        await writer.drain()
        await asyncio.sleep(30)
        return False

    server = await serve(stalls)
    async with httpx.AsyncClient(transport=FastTransport(),
                                 timeout=httpx.Timeout(5.0, read=0.2)) as http:
        async with http.stream("GET", server.base + "/") as response:
            assert response.status_code == 200
            got = b""
            with pytest.raises(httpx.ReadTimeout):
                async for chunk in response.aiter_raw():
                    got += chunk
    assert got == b"half"


async def test_a_body_cut_short_is_a_protocol_error(serve: Any, http: httpx.AsyncClient) -> None:
    async def cut(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf")
        return False

    server = await serve(cut)
    with pytest.raises(httpx.RemoteProtocolError):
        await http.get(server.base + "/")


async def test_a_closed_keep_alive_connection_is_retried_once(
    serve: Any, http: httpx.AsyncClient
) -> None:
    answered = 0

    async def once_per_connection(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        nonlocal answered
        if seen.connection == 1 and answered == 1:
            return False  # the second request on the first connection: hang up, no answer
        answered += 1
        writer.write(ok(b"answer %d" % answered))
        return True

    server = await serve(once_per_connection)
    assert (await http.post(server.base + "/", content=b"a")).content == b"answer 1"
    assert (await http.post(server.base + "/", content=b"b")).content == b"answer 2"
    assert [(s.body, s.connection) for s in server.requests] == [(b"a", 1), (b"b", 1), (b"b", 2)]


async def test_a_streamed_body_is_not_replayed(serve: Any, http: httpx.AsyncClient) -> None:
    async def first_only(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        if len(server.requests) > 1:
            return False
        writer.write(ok(b"first"))
        return True

    server = await serve(first_only)

    async def parts() -> AsyncIterator[bytes]:
        yield b"once"

    assert (await http.get(server.base + "/")).content == b"first"
    with pytest.raises(httpx.RemoteProtocolError):
        await http.post(server.base + "/", content=parts())
    assert [s.connection for s in server.requests] == [1, 1]


async def test_closing_early_closes_the_connection(serve: Any, http: httpx.AsyncClient) -> None:
    gone = asyncio.Event()

    async def slow(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        if seen.target == "/fast":
            writer.write(ok(b"fast"))
            return True
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nfirs\r\n")
        await writer.drain()
        # Nothing more is sent: only the client closing its end ends this connection.
        assert await server.readers[seen.connection].read() == b""
        gone.set()
        return False

    server = await serve(slow)
    async with http.stream("GET", server.base + "/slow") as response:
        async for chunk in response.aiter_raw():
            assert chunk == b"firs"
            break
    await asyncio.wait_for(gone.wait(), 5)  # the upstream saw the connection go
    assert (await http.get(server.base + "/fast")).content == b"fast"
    assert [s.connection for s in server.requests] == [1, 2]


async def test_https_with_a_local_certificate(serve: Any) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    server = await serve(fixed(ok(b"secret"), ok(b"again")), tls=server_context)
    async with httpx.AsyncClient(transport=FastTransport(ssl_context=client_context)) as http:
        assert (await http.get(server.base + "/")).content == b"secret"
        assert (await http.get(server.base + "/")).content == b"again"
    assert server.connections == 1
    async with httpx.AsyncClient(transport=FastTransport()) as untrusting:
        with pytest.raises(httpx.ConnectError):  # the system's CAs do not know this one
            await untrusting.get(server.base + "/")


async def test_the_client_keeps_no_upstream_cookies(serve: Any) -> None:
    server = await serve(fixed(ok(b"a", "set-cookie: sid=alice; Path=/"), ok(b"b")))
    http = make_client(Settings())
    try:
        first = await http.get(server.base + "/")
        await http.get(server.base + "/")
    finally:
        await http.aclose()
    assert first.headers["set-cookie"] == "sid=alice; Path=/"
    assert "cookie" not in server.requests[1].headers
    assert len(http.cookies) == 0
    assert isinstance(http._transport, FastTransport)


async def test_expired_idle_connections_are_not_reused(serve: Any) -> None:
    server = await serve(fixed(ok(b"x")))
    async with httpx.AsyncClient(transport=FastTransport(keepalive_expiry=0.05)) as http:
        await http.get(server.base + "/")
        await asyncio.sleep(0.1)
        await http.get(server.base + "/")
    assert [s.connection for s in server.requests] == [1, 2]


def test_cookies_set_on_the_client_are_not_kept() -> None:
    http = make_client(Settings())
    http.cookies.set("sid", "alice", domain="127.0.0.1")
    http.cookies = {"sid": "bob"}
    assert len(http.cookies) == 0
    assert "cookie" not in http.build_request("GET", "http://127.0.0.1/").headers
