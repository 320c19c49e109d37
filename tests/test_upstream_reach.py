"""How the upstream is reached (issue 15, item 5): through the environment's HTTP proxy or the
configured one, past it by NO_PROXY, over TLS checked against a private CA bundle, at most
`upstream_max_connections` connections per origin, and never with a response head past 64 KiB.

Every upstream here is a live server on 127.0.0.1 and the proxy a real one (tests/net_doubles.py):
respx would replace the transport these tests are about.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import pytest
import trustme

from proxy.config import Settings, load_settings
from proxy.errors import UpstreamBusy, UpstreamError
from proxy.http1 import MAX_HEAD
from proxy.transport import FastTransport
from tests.conftest import ROOT, UPSTREAM_KEY, User
from tests.fault_helpers import (
    FakeUpstream,
    LiveClient,
    app_client,
    free_port,
    serve_env,
    serving,
)
from tests.net_doubles import ForwardProxy, ca_file, named, tls_upstream
from tests.turns import new_session

UNREACHABLE = UpstreamError("The upstream could not be reached").body()


def environ(tmp_path: Path, database_url: str, base_url: str, **extra: str) -> dict[str, str]:
    """What `chatproxy serve` would be started with: settings come from `load_settings`."""
    config = tmp_path / "chatproxy.toml"
    if not config.exists():
        config.write_text("")
    return {
        "CHATPROXY_CONFIG": str(config),
        "CHATPROXY_DATABASE_URL": database_url,
        "CHATPROXY_UPSTREAM_BASE_URL": base_url,
        "CHATPROXY_UPSTREAM_API_KEY": UPSTREAM_KEY,
        "CHATPROXY_MODELS_FILE": str(ROOT / "config" / "models.toml"),
        "CHATPROXY_DB_POOL_SIZE": "3",
        **extra,
    }


def u(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


async def turn(client: LiveClient, user: User, sid: str | None, text: str,
               model: str = "echo") -> httpx.Response:
    body: dict[str, Any] = {"model": model, "messages": [u(text)]}
    if sid is not None:
        body["session_id"] = sid
    return await client.post("/v1/chat/completions", json=body, headers=user.headers)


async def two_turns(client: LiveClient, user: User, upstream: FakeUpstream) -> None:
    """A session's two turns, the second sent upstream with the first as its history."""
    sid = await new_session(client, user)
    first = await turn(client, user, sid, "one")
    assert first.status_code == 200, first.text
    assert first.json()["choices"][0]["message"]["content"] == "reply to one"
    second = await turn(client, user, sid, "two")
    assert second.status_code == 200, second.text
    assert second.headers["x-history-messages"] == "2"
    sent = [(m["role"], m["content"]) for m in upstream.requests[-1][1]["messages"]]
    assert sent == [("user", "one"), ("assistant", "reply to one"), ("user", "two")]


async def stored(db: asyncpg.Connection, sid: str) -> int:
    count: int = await db.fetchval("SELECT count(*) FROM chat_messages WHERE session_id = $1", sid)
    return count


async def until(condition: Callable[[], bool], within: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        assert loop.time() < deadline, "the condition never held"
        await asyncio.sleep(0.01)


# --- proxies ----------------------------------------------------------------------------------


async def test_a_session_turn_goes_through_the_environments_http_proxy(
    tmp_path: Path, database_url: str, alice: User
) -> None:
    # `upstream.test` resolves only inside the proxy: a direct request could not reach it.
    with FakeUpstream() as upstream, ForwardProxy({"upstream.test": "127.0.0.1"}) as proxy:
        base = named(upstream, "upstream.test")
        settings = load_settings(environ(tmp_path, database_url, base, HTTP_PROXY=proxy.url))
        async with app_client(settings) as client:
            await two_turns(client, alice, upstream)
    assert proxy.seen == [f"POST {base}/chat/completions"] * 2


async def test_no_proxy_sends_a_listed_host_past_the_environments_proxy(
    tmp_path: Path, database_url: str, alice: User
) -> None:
    with FakeUpstream() as upstream, ForwardProxy() as proxy:
        for no_proxy, through_the_proxy in (("localhost, 127.0.0.1", False),
                                             ("example.com", True)):
            env = environ(tmp_path, database_url, upstream.base_url,
                          http_proxy=proxy.url, NO_PROXY=no_proxy)
            async with app_client(load_settings(env)) as client:
                await two_turns(client, alice, upstream)
            assert bool(proxy.seen) is through_the_proxy, no_proxy
            proxy.seen.clear()


async def test_https_goes_through_a_connect_tunnel_trusting_the_ca_bundle(
    tmp_path: Path, database_url: str, alice: User, db: asyncpg.Connection
) -> None:
    ca = trustme.CA()
    with tls_upstream(ca, tmp_path, "upstream.test") as upstream, \
            ForwardProxy({"upstream.test": "127.0.0.1"}) as proxy:
        base = named(upstream, "upstream.test")
        env = environ(tmp_path, database_url, base, HTTPS_PROXY=proxy.url)
        bundled = {**env, "CHATPROXY_UPSTREAM_CA_BUNDLE": ca_file(ca, tmp_path)}
        async with app_client(load_settings(bundled)) as client:
            await two_turns(client, alice, upstream)
        assert set(proxy.seen) == {f"CONNECT upstream.test:{upstream.port}"}

        async with app_client(load_settings(env)) as client:  # the system's CAs only
            sid = await new_session(client, alice)
            r = await turn(client, alice, sid, "one")
            assert (r.status_code, r.json()) == (502, UNREACHABLE)
            assert await stored(db, sid) == 0


async def test_the_proxy_settings_override_the_environment(
    tmp_path: Path, database_url: str, alice: User
) -> None:
    with FakeUpstream() as upstream, ForwardProxy({"upstream.test": "127.0.0.1"}) as proxy:
        (tmp_path / "chatproxy.toml").write_text(
            "[[upstreams]]\n"
            'name = "routed"\n'
            f'base_url = "{named(upstream, "upstream.test")}"\n'
            'models = ["via-*"]\n'
            f'proxy = "{proxy.url}"\n'
        )
        dead = f"http://127.0.0.1:{free_port()}"  # the environment's proxy: nothing listens
        env = environ(tmp_path, database_url, upstream.base_url, HTTP_PROXY=dead,
                      CHATPROXY_UPSTREAM_PROXY="")
        async with app_client(load_settings(env)) as client:
            await two_turns(client, alice, upstream)  # the default upstream: no proxy at all
            assert proxy.seen == []
            r = await turn(client, alice, None, "routed", model="via-echo")
            assert r.json()["choices"][0]["message"]["content"] == "reply to routed"
        assert proxy.seen == [f"POST {named(upstream, 'upstream.test')}/chat/completions"]


async def test_a_proxy_that_cannot_be_reached_is_a_502(
    tmp_path: Path, database_url: str, alice: User, db: asyncpg.Connection
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with FakeUpstream() as upstream:
        env = environ(tmp_path, database_url, upstream.base_url, HTTP_PROXY=dead)
        async with app_client(load_settings(env)) as client:
            sid = await new_session(client, alice)
            r = await turn(client, alice, sid, "one")
            assert (r.status_code, r.json()) == (502, UNREACHABLE)
            assert await stored(db, sid) == 0
    assert upstream.requests == []  # reachable directly, but the proxy was the way


@pytest.mark.e2e
async def test_chatproxy_serve_reads_the_proxy_from_its_environment(
    tmp_path: Path, database_url: str, alice: User
) -> None:
    with FakeUpstream() as upstream, ForwardProxy({"upstream.test": "127.0.0.1"}) as proxy:
        base = named(upstream, "upstream.test")
        # lower case, which wins over whatever HTTP_PROXY / NO_PROXY this test runs under
        env = serve_env(database_url, base, tmp_path, http_proxy=proxy.url, no_proxy="")
        with serving(env, tmp_path / "serve.log") as server:
            async with httpx.AsyncClient(base_url=server.url, headers=alice.headers) as api:
                sid = await new_session(api, alice)
            sdk = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=alice.key,
                                     max_retries=0)
            async with sdk:
                for text in ("one", "two"):
                    reply = await sdk.chat.completions.create(
                        model="echo", messages=[{"role": "user", "content": text}],
                        extra_body={"session_id": sid})
                    assert reply.choices[0].message.content == f"reply to {text}"
        log = server.log()
    sent = [(m["role"], m["content"]) for m in upstream.requests[-1][1]["messages"]]
    assert sent == [("user", "one"), ("assistant", "reply to one"), ("user", "two")]
    assert proxy.seen == [f"POST {base}/chat/completions"] * 2
    assert f"through the proxy at {proxy.url}" in log


# --- a private CA -----------------------------------------------------------------------------


async def test_a_ca_bundle_makes_a_private_upstream_trusted(
    tmp_path: Path, settings: Settings, alice: User, db: asyncpg.Connection
) -> None:
    ca = trustme.CA()
    with tls_upstream(ca, tmp_path) as upstream:
        private = replace(settings, upstream_base_url=upstream.base_url,
                          upstream_ca_bundle=ca_file(ca, tmp_path))
        async with app_client(private) as client:
            await two_turns(client, alice, upstream)
        async with app_client(replace(private, upstream_ca_bundle=None)) as client:
            sid = await new_session(client, alice)
            r = await turn(client, alice, sid, "one")
            assert (r.status_code, r.json()) == (502, UNREACHABLE)
            assert await stored(db, sid) == 0
    assert len(upstream.requests) == 2  # the untrusted handshake never got to a request


# --- the connection cap -----------------------------------------------------------------------


@pytest.mark.parametrize("proxied", [False, True])
async def test_past_the_connection_cap_a_request_waits_then_gets_503_upstream_busy(
    settings: Settings, alice: User, db: asyncpg.Connection, proxied: bool
) -> None:
    with FakeUpstream() as upstream, ForwardProxy() as proxy:
        capped = replace(settings, upstream_base_url=upstream.base_url,
                         upstream_max_connections=2, upstream_connect_timeout=0.5,
                         upstream_proxy=proxy.url if proxied else None)
        async with app_client(capped) as client:
            sid = await new_session(client, alice)
            hung = [asyncio.ensure_future(turn(client, alice, None, "x", model="hang"))
                    for _ in range(2)]
            await until(lambda: upstream.held == 2)
            r = await turn(client, alice, sid, "one")
            assert (r.status_code, r.json()) == (503, UpstreamBusy().body())
            assert r.json()["error"] == {"message": "The upstream is busy, try again shortly",
                                         "type": "server_error", "param": None,
                                         "code": "upstream_busy"}
            assert len(upstream.requests) == 2  # the third never reached the upstream
            assert await stored(db, sid) == 0

            for task in hung:  # their clients give up: the places come free
                task.cancel()
            await asyncio.gather(*hung, return_exceptions=True)
            await until(lambda: upstream.held == 0)
            r = await turn(client, alice, sid, "one")
            assert r.status_code == 200, r.text
            assert await stored(db, sid) == 2
    assert len(proxy.seen) == (3 if proxied else 0)  # the one turned away never left


# --- raw upstreams, for the transport alone -------------------------------------------------


Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawUpstream:
    """An asyncio server in the test's loop, answering every request with `answer`."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.closed = 0  # connections the client closed
        self.tasks: set[asyncio.Task[None]] = set()
        self.url = ""

    async def __aenter__(self) -> RawUpstream:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                await self.answer(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed += 1
        except asyncio.CancelledError:
            pass  # the test is over
        finally:
            writer.close()


def head_with(header_bytes: int) -> bytes:
    """A 200 whose header lines take exactly `header_bytes` bytes (name, `: `, value, CRLF)."""
    lines = [b"content-length: 2"]
    left = header_bytes - len(lines[0]) - 2
    while left > 0:
        value = min(1000, left - 17) if left - 17 - 1000 >= 17 or left - 17 <= 1000 else 500
        lines.append(b"x-filler-%04d: %b" % (len(lines), b"v" * value))
        left -= len(lines[-1]) + 2
    assert left == 0
    return b"HTTP/1.1 200 OK\r\n" + b"\r\n".join(lines) + b"\r\n\r\nok"


@pytest.fixture
async def transport() -> AsyncIterator[FastTransport]:
    made = FastTransport(max_connections=1)
    yield made
    await made.aclose()


async def test_a_head_past_the_limit_is_a_protocol_error_and_closes_the_connection(
    transport: FastTransport,
) -> None:
    answers = [head_with(MAX_HEAD), head_with(MAX_HEAD + 1), head_with(MAX_HEAD)]

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(answers.pop(0))

    async with RawUpstream(answer) as server, httpx.AsyncClient(transport=transport) as http:
        assert (await http.get(server.url + "/")).content == b"ok"  # at the limit: fine
        with pytest.raises(httpx.RemoteProtocolError, match="response head is too large"):
            await http.get(server.url + "/")
        assert (await http.get(server.url + "/")).content == b"ok"
        await until(lambda: server.closed >= 1)
        assert server.connections == 2  # the second connection, after the refused head


async def test_an_endless_header_line_is_cut_off_without_waiting_for_its_end(
    transport: FastTransport,
) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nx-endless: ")
        for _ in range(1024):  # 8 MiB of one header value, and no end to it
            writer.write(b"v" * 8192)
            await writer.drain()
        await asyncio.sleep(60)

    async with RawUpstream(answer) as server, httpx.AsyncClient(
            transport=transport, timeout=httpx.Timeout(30.0)) as http:
        with pytest.raises(httpx.RemoteProtocolError, match="response head is too large"):
            await asyncio.wait_for(http.get(server.url + "/"), 20)
        await until(lambda: server.closed == 1)


async def test_a_head_past_the_limit_is_a_502_for_the_client(
    settings: Settings, alice: User
) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(head_with(MAX_HEAD + 1))

    async with RawUpstream(answer) as server:
        async with app_client(replace(settings, upstream_base_url=server.url + "/v1")) as client:
            r = await turn(client, alice, None, "hi")
    assert (r.status_code, r.json()) == (502, UNREACHABLE)


async def test_a_waiting_request_takes_the_place_its_predecessor_frees(
    transport: FastTransport,
) -> None:
    release = asyncio.Event()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\none\r\n")
        await writer.drain()
        await release.wait()
        release.clear()
        writer.write(b"0\r\n\r\n")

    async with RawUpstream(answer) as server, httpx.AsyncClient(
            transport=transport, timeout=httpx.Timeout(5.0, pool=0.2)) as http:
        async with http.stream("GET", server.url + "/first") as first:
            with pytest.raises(httpx.PoolTimeout):  # the one place is taken
                await http.get(server.url + "/too-soon")
            second = asyncio.ensure_future(http.get(server.url + "/second",
                                                    timeout=httpx.Timeout(5.0)))
            await asyncio.sleep(0.05)
            assert not second.done()
            release.set()
            assert await first.aread() == b"one"
        release.set()
        assert (await second).content == b"one"
    assert server.connections == 1  # the second request went out on the first's connection
