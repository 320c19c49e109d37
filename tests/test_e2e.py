"""End to end: a live `chatproxy serve`, the official `openai` SDK as the client, a fake upstream.

The proxy runs as a subprocess (once per module) on the test database; the fake upstream
(tests/fake_upstream.py) records every body it receives, which is how these tests see the
history the proxy injected.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import httpx
import openai
import pytest

from tests.conftest import ROOT, UPSTREAM_KEY, User
from tests.fake_upstream import FakeUpstream
from tests.fault_helpers import Serve

pytestmark = pytest.mark.e2e

@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    upstream = FakeUpstream()
    upstream.start()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def proxy(
    database_url: str, fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Serve]:
    workdir = tmp_path_factory.mktemp("chatproxy-e2e")
    (workdir / "empty.toml").write_text("")
    env = {
        "CHATPROXY_CONFIG": str(workdir / "empty.toml"),
        "CHATPROXY_DATABASE_URL": database_url,
        "CHATPROXY_UPSTREAM_BASE_URL": fake.url + "/v1",
        "CHATPROXY_UPSTREAM_API_KEY": UPSTREAM_KEY,
        "CHATPROXY_MODELS_FILE": str(ROOT / "config" / "models.toml"),
        "CHATPROXY_LOG_LEVEL": "warning",
        "CHATPROXY_SHUTDOWN_GRACE": "5",
    }
    server = Serve(env, workdir / "chatproxy.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def sdk(proxy: Serve, alice: User) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=alice.key, max_retries=0,
                                timeout=60)
    yield client
    await client.close()


@pytest.fixture
async def api(proxy: Serve, alice: User) -> AsyncIterator[httpx.AsyncClient]:
    """Plain HTTP to the proxy, for the sessions API."""
    async with httpx.AsyncClient(base_url=proxy.url, headers=alice.headers,
                                 timeout=30) as client:
        yield client


async def new_session(api: httpx.AsyncClient, **fields: Any) -> str:
    r = await api.post("/v1/chat/sessions", json=fields)
    assert r.status_code == 201, r.text
    sid: str = r.json()["id"]
    return sid


async def messages_of(api: httpx.AsyncClient, sid: str) -> list[dict[str, Any]]:
    r = await api.get(f"/v1/chat/sessions/{sid}/messages", params={"limit": 500})
    assert r.status_code == 200, r.text
    found: list[dict[str, Any]] = r.json()["data"]
    return found


def last_body(fake: FakeUpstream) -> Any:
    return fake.requests[-1].body


def u(text: str) -> Any:  # Any: the SDK types its messages as TypedDicts
    return {"role": "user", "content": text}


def a(text: str) -> Any:
    return {"role": "assistant", "content": text}


async def eventually(check: Any, within: float = 10.0) -> Any:
    """Poll `check()` until it returns something truthy (for effects that follow a disconnect)."""
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.05)


async def streamed(sdk: openai.AsyncOpenAI, sid: str | None, text: str,
                   model: str = "fake-echo", **extra: Any) -> str:
    session = {"session_id": sid} if sid else {}
    stream = await sdk.chat.completions.create(
        model=model, messages=[u(text)], stream=True, extra_body=session, **extra)
    parts = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    return "".join(parts)


# --- conversations ------------------------------------------------------------------------------


async def test_a_multi_turn_conversation_lives_on_the_server(
    sdk: openai.AsyncOpenAI, api: httpx.AsyncClient, fake: FakeUpstream
) -> None:
    sid = await new_session(api, system_prompt="You are terse.")
    for text in ("my name is Ada", "what is my name?"):
        reply = await sdk.chat.completions.create(
            model="fake-echo", messages=[u(text)], extra_body={"session_id": sid})
        assert reply.choices[0].message.content == f"echo: {text}"
    # the header works as well as the body field
    raw = await sdk.chat.completions.with_raw_response.create(
        model="fake-echo", messages=[u("and again")], temperature=0.5,
        extra_headers={"X-Session-Id": sid})
    assert raw.headers["x-session-id"] == sid
    assert (raw.headers["x-history-messages"], raw.headers["x-history-dropped"]) == ("4", "0")
    assert raw.parse().choices[0].message.content == "echo: and again"
    assert last_body(fake) == {
        "model": "fake-echo", "temperature": 0.5,
        "messages": [{"role": "system", "content": "You are terse."},
                     u("my name is Ada"), a("echo: my name is Ada"),
                     u("what is my name?"), a("echo: what is my name?"),
                     u("and again")],
    }
    assert fake.requests[-1].headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    listed = await messages_of(api, sid)
    assert [(m["seq"], m["role"], m["content"], m["status"]) for m in listed] == [
        (1, "user", "my name is Ada", "complete"),
        (2, "assistant", "echo: my name is Ada", "complete"),
        (3, "user", "what is my name?", "complete"),
        (4, "assistant", "echo: what is my name?", "complete"),
        (5, "user", "and again", "complete"),
        (6, "assistant", "echo: and again", "complete"),
    ]


async def test_a_streamed_multi_turn_conversation(
    sdk: openai.AsyncOpenAI, api: httpx.AsyncClient, fake: FakeUpstream
) -> None:
    sid = await new_session(api)
    assert await streamed(sdk, sid, "one two three") == "echo: one two three"
    assert await streamed(sdk, sid, "four", stream_options={"include_usage": True}) == \
        "echo: four"
    assert last_body(fake)["messages"] == [u("one two three"), a("echo: one two three"),
                                           u("four")]
    # plain and streamed turns share one history
    reply = await sdk.chat.completions.create(
        model="fake-echo", messages=[u("five")], extra_body={"session_id": sid})
    assert reply.choices[0].message.content == "echo: five"
    assert last_body(fake)["messages"][-3:] == [u("four"), a("echo: four"), u("five")]
    listed = await messages_of(api, sid)
    assert [m["content"] for m in listed] == [
        "one two three", "echo: one two three", "four", "echo: four", "five", "echo: five"]
    assert listed[3]["tokens"] == 8  # usage.completion_tokens (5) + 3, from the usage chunk


async def test_read_your_writes(
    sdk: openai.AsyncOpenAI, api: httpx.AsyncClient, fake: FakeUpstream
) -> None:
    """Each request, sent the moment the previous answer was read, sees that turn."""
    sid = await new_session(api, max_history_messages=100)
    expected: list[dict[str, Any]] = []
    for i in range(8):
        text = f"turn {i}"
        if i % 2:
            assert await streamed(sdk, sid, text) == f"echo: {text}"
        else:
            await sdk.chat.completions.create(
                model="fake-echo", messages=[u(text)], extra_body={"session_id": sid})
        assert last_body(fake)["messages"] == [*expected, u(text)]
        expected += [u(text), a(f"echo: {text}")]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_full_tool_round_trip(
    sdk: openai.AsyncOpenAI, api: httpx.AsyncClient, fake: FakeUpstream, stream: bool
) -> None:
    sid = await new_session(api)
    tools: Any = [{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object",
                                              "properties": {"city": {"type": "string"}}}}}]
    session = {"session_id": sid}

    async def ask(messages: Any) -> tuple[str | None, list[dict[str, Any]]]:
        if not stream:
            reply = await sdk.chat.completions.create(
                model="fake-tools", messages=messages, tools=tools, extra_body=session)
            message = reply.choices[0].message
            calls = [c.model_dump() for c in message.tool_calls or []]
            return message.content, calls
        content: list[str] = []
        calls_by_index: dict[int, dict[str, Any]] = {}
        async for chunk in await sdk.chat.completions.create(
            model="fake-tools", messages=messages, tools=tools, extra_body=session, stream=True
        ):
            delta = chunk.choices[0].delta
            content.append(delta.content or "")
            for call in delta.tool_calls or []:
                assert call.function is not None
                entry = calls_by_index.setdefault(call.index, {
                    "id": call.id, "type": "function",
                    "function": {"name": call.function.name, "arguments": ""}})
                entry["function"]["arguments"] += call.function.arguments or ""
        return "".join(content) or None, [calls_by_index[i] for i in sorted(calls_by_index)]

    content, calls = await ask([u("Paris")])
    assert content is None
    assert [c["function"] for c in calls] == [
        {"name": "get_weather", "arguments": '{"city": "Paris"}'}]
    call_id = calls[0]["id"]
    # the client runs the tool and sends only its result
    result: Any = {"role": "tool", "tool_call_id": call_id, "content": "sunny"}
    content, calls = await ask([result])
    assert (content, calls) == ("The weather is sunny.", [])
    assistant_call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id, "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
    assert last_body(fake)["messages"] == [u("Paris"), assistant_call, result]
    # and the conversation goes on with the whole exchange in its history
    content, calls = await ask([u("Rome")])
    assert last_body(fake)["messages"] == [
        u("Paris"), assistant_call, result, a("The weather is sunny."), u("Rome")]
    listed = await messages_of(api, sid)
    assert [m["role"] for m in listed] == [
        "user", "assistant", "tool", "assistant", "user", "assistant"]
    assert listed[1]["tool_calls"] == assistant_call["tool_calls"]
    assert listed[2]["tool_call_id"] == call_id


async def test_a_restart_in_the_middle_of_a_conversation(
    sdk: openai.AsyncOpenAI, api: httpx.AsyncClient, fake: FakeUpstream, proxy: Serve
) -> None:
    sid = await new_session(api)
    await sdk.chat.completions.create(
        model="fake-echo", messages=[u("before")], extra_body={"session_id": sid})
    await asyncio.to_thread(proxy.restart)
    reply = await sdk.chat.completions.create(
        model="fake-echo", messages=[u("after")], extra_body={"session_id": sid})
    assert reply.choices[0].message.content == "echo: after"
    assert last_body(fake)["messages"] == [u("before"), a("echo: before"), u("after")]
    assert await streamed(sdk, sid, "streamed after") == "echo: streamed after"
    assert len(await messages_of(api, sid)) == 6


async def test_twenty_concurrent_turns_on_one_session(
    sdk: openai.AsyncOpenAI, api: httpx.AsyncClient
) -> None:
    sid = await new_session(api)

    async def turn(i: int) -> str | None:
        if i % 4 == 0:
            return await streamed(sdk, sid, f"c{i}")
        reply = await sdk.chat.completions.create(
            model="fake-echo", messages=[u(f"c{i}")], extra_body={"session_id": sid})
        return reply.choices[0].message.content

    replies = await asyncio.gather(*(turn(i) for i in range(20)))
    assert replies == [f"echo: c{i}" for i in range(20)]
    listed = await messages_of(api, sid)
    assert [m["seq"] for m in listed] == list(range(1, 41))
    pairs = [(listed[k]["content"], listed[k + 1]["content"]) for k in range(0, 40, 2)]
    assert sorted(pairs) == sorted((f"c{i}", f"echo: c{i}") for i in range(20))
    assert [m["role"] for m in listed] == ["user", "assistant"] * 20
    session = (await api.get(f"/v1/chat/sessions/{sid}")).json()
    assert session["message_count"] == 40
    assert session["total_tokens"] == sum(m["tokens"] for m in listed)


# --- streams that end early ---------------------------------------------------------------------


async def test_a_client_that_closes_a_stream_early(
    sdk: openai.AsyncOpenAI, api: httpx.AsyncClient, fake: FakeUpstream
) -> None:
    sid = await new_session(api)
    stream = await sdk.chat.completions.create(
        model="fake-slow", messages=[u("count")], stream=True, extra_body={"session_id": sid})
    seen = ""
    async for chunk in stream:
        seen += chunk.choices[0].delta.content or ""
        if seen.count("tick") == 3:
            break
    number = fake.requests[-1].number
    await stream.close()

    async def stored_reply() -> list[dict[str, Any]]:
        listed = await messages_of(api, sid)
        return listed if len(listed) == 2 else []

    listed = await eventually(stored_reply)
    assert [(m["role"], m["status"]) for m in listed] == [
        ("user", "complete"), ("assistant", "incomplete")]
    kept = listed[1]["content"]
    assert kept.startswith(seen) and set(kept.split()) == {"tick"}

    # the proxy stopped reading and closed its upstream request (the fake would tick for a
    # minute otherwise)
    async def upstream_closed() -> bool:
        return number in fake.disconnected

    assert await eventually(upstream_closed, within=5)
    # the incomplete reply is in the next turn's history
    await sdk.chat.completions.create(
        model="fake-echo", messages=[u("next")], extra_body={"session_id": sid})
    assert last_body(fake)["messages"] == [u("count"), a(kept), u("next")]


async def test_an_upstream_that_breaks_a_stream(
    sdk: openai.AsyncOpenAI, api: httpx.AsyncClient, fake: FakeUpstream
) -> None:
    sid = await new_session(api)
    stream = await sdk.chat.completions.create(
        model="fake-break", messages=[u("hi")], stream=True, extra_body={"session_id": sid})
    seen = ""
    with pytest.raises(openai.APIError) as caught:
        async for chunk in stream:
            seen += chunk.choices[0].delta.content or ""
    assert seen == "Hello, wor"
    assert caught.value.body == {"message": "The upstream broke off the stream",
                                 "type": "server_error", "param": None,
                                 "code": "upstream_error"}
    listed = await messages_of(api, sid)
    assert [(m["role"], m["content"], m["status"]) for m in listed] == [
        ("user", "hi", "complete"), ("assistant", "Hello, wor", "incomplete")]


async def test_chunks_reach_the_client_while_the_upstream_is_still_answering(
    sdk: openai.AsyncOpenAI, api: httpx.AsyncClient, fake: FakeUpstream
) -> None:
    """The upstream holds back its second chunk until the client has seen the first: a proxy
    that buffered the stream would never deliver it."""
    sid = await new_session(api)
    fake.gate.clear()

    async def first_then_rest() -> str:
        stream = await sdk.chat.completions.create(
            model="fake-gated", messages=[u("go")], stream=True, extra_body={"session_id": sid})
        text = ""
        async for chunk in stream:
            text += chunk.choices[0].delta.content or ""
            if text == "first":
                fake.gate.set()
        return text

    assert await asyncio.wait_for(first_then_rest(), 20) == "first second"
    listed = await messages_of(api, sid)
    assert listed[1]["content"] == "first second" and listed[1]["status"] == "complete"


async def test_models_pass_through_with_the_upstream_key(
    sdk: openai.AsyncOpenAI, fake: FakeUpstream
) -> None:
    models = await sdk.models.list()
    assert [m.id for m in models.data] == ["fake-echo"]
    assert fake.requests[-1].path == "/v1/models"
    assert fake.requests[-1].headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


async def test_without_a_session_nothing_is_stored(
    sdk: openai.AsyncOpenAI, fake: FakeUpstream, db: asyncpg.Connection
) -> None:
    before = await db.fetchval("SELECT count(*) FROM chat_messages")
    reply = await sdk.chat.completions.create(model="fake-echo", messages=[u("alone")])
    assert reply.choices[0].message.content == "echo: alone"
    assert last_body(fake) == {"model": "fake-echo", "messages": [u("alone")]}
    assert await streamed(sdk, None, "alone too") == "echo: alone too"
    assert await db.fetchval("SELECT count(*) FROM chat_messages") == before
