"""The newer doors with a database that hangs (README, Guarantees): the Responses and
Conversations APIs, search, summaries, the MCP tools and the session browser.

A relay in front of PostgreSQL stops passing bytes (tests/test_hung_database.py does the same
for the sessions API and chat). Each request is sent the moment the database hangs, while the
key lease still vouches for the caller's key, so it passes the key check without the database
and reaches the door's own statements: it must answer 503 `database_unavailable` (an MCP tool:
a tool result with `isError`) within seconds, and the same app must serve again once the
database is back. The statement timeout is shortened to keep the module quick; the bound
itself is the one tests/test_hung_database.py checks at its default.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import pytest
import respx

from proxy import auth
from proxy.config import Settings
from tests.conftest import User, configured
from tests.fault_helpers import LiveClient, Relay, app_client, completion
from tests.test_hung_database import UNAVAILABLE, WITHIN, stream_of, timed, warm
from tests.test_write_races import contents, last_event, until
from tests.turns import new_session

pytestmark = pytest.mark.timeout(120)

SUMMARY_MODEL = "gpt-4o-mini"
SSE = {"content-type": "text/event-stream"}


@pytest.fixture
def relay(database_url: str) -> Iterator[Relay]:
    with Relay(database_url) as running:
        yield running


def quick(settings: Settings, relay: Relay, **changes: Any) -> Settings:
    """The app through the relay, its request statements bounded at half a second."""
    return configured(settings, database_url=relay.url(), db_statement_timeout=0.5,
                      db_acquire_timeout=0.5, **changes)


async def leased(client: LiveClient, user: User) -> None:
    """The database back, and the key lease vouching for `user`'s key (so that a request sent
    as the database hangs passes the key check without it)."""
    keys = client.app.state.rt.keys
    key_hash = auth.client_key_hash(user.headers["Authorization"])
    for _ in range(200):
        r = await client.get("/v1/chat/sessions?limit=1", headers=user.headers)
        if r.status_code == 200 and keys.user(key_hash) is not None:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the key lease never vouched for the key")


async def hung(client: LiveClient, relay: Relay, user: User, method: str, path: str,
               body: Any = None) -> httpx.Response:
    """`method path` sent as the database hangs; it must answer within WITHIN seconds."""
    await warm(client, relay)
    await leased(client, user)
    relay.stall()
    r, took = await timed(client, method, path, json=body, headers=user.headers)
    assert took < WITHIN, (method, path, took)
    return r


def mcp_call(tool: str, **arguments: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": tool, "arguments": arguments}}


MCP = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2025-11-25"}


async def test_responses_and_conversations_answer_503_while_the_database_hangs(
    settings: Settings, relay: Relay, alice: User
) -> None:
    upstream = respx.Router(base_url=settings.upstream_base_url, assert_all_called=False)
    route = upstream.post("/chat/completions").mock(
        return_value=httpx.Response(200, json=completion("fine")))
    async with app_client(quick(settings, relay), upstream) as client:
        cid = (await client.post("/v1/conversations", json={}, headers=alice.headers)).json()["id"]
        made = await client.post("/v1/responses", headers=alice.headers,
                                 json={"model": "gpt-4o", "input": "hi"})
        assert made.status_code == 200, made.text
        rid = made.json()["id"]
        turn = {"model": "gpt-4o", "input": "hi"}
        cases: list[tuple[str, str, Any]] = [
            ("POST", "/v1/responses", turn),
            ("POST", "/v1/responses", {**turn, "stream": True}),
            ("POST", "/v1/responses", {**turn, "conversation": cid}),
            ("POST", "/v1/responses", {**turn, "conversation": cid, "stream": True}),
            ("POST", "/v1/responses", {**turn, "previous_response_id": rid}),
            ("POST", "/v1/responses", {**turn, "previous_response_id": rid, "stream": True}),
            ("GET", f"/v1/responses/{rid}", None),
            ("GET", f"/v1/responses/{rid}/input_items", None),
            ("POST", "/v1/conversations", {}),
            ("GET", f"/v1/conversations/{cid}", None),
            ("GET", f"/v1/conversations/{cid}/items", None),
            ("POST", f"/v1/conversations/{cid}/items",
             {"items": [{"role": "user", "content": "x"}]}),
        ]
        for method, path, body in cases:
            r = await hung(client, relay, alice, method, path, body)
            assert (method, path, body, r.status_code, r.json()) == (
                method, path, body, 503, UNAVAILABLE)
        assert route.call_count == 1  # the first response only: none reached the upstream
        await warm(client, relay)  # the same app serves again
        r = await client.post("/v1/responses", headers=alice.headers,
                              json={**turn, "conversation": cid})
        assert r.status_code == 200, r.text
        r = await client.get(f"/v1/conversations/{cid}/items?order=asc", headers=alice.headers)
        assert [i["role"] for i in r.json()["data"]] == ["user", "assistant"]


async def test_search_and_summaries_answer_503_and_the_ui_page_loads_while_it_hangs(
    settings: Settings, relay: Relay, alice: User
) -> None:
    async with app_client(quick(settings, relay, summary_model=SUMMARY_MODEL)) as client:
        sid = await new_session(client, alice)
        for method, path in [
            ("GET", "/v1/chat/search?q=hello"),
            ("GET", "/v1/chat/sessions?q=hello"),
            ("GET", f"/v1/chat/sessions/{sid}/summary"),
            ("POST", f"/v1/chat/sessions/{sid}/compact"),
            # Bulk work (a long statement timeout of its own) still notices a hung database
            # within the request's timeout.
            ("GET", f"/v1/chat/sessions/{sid}/export"),
            ("POST", f"/v1/chat/sessions/{sid}/fork"),
            ("DELETE", f"/v1/chat/sessions/{sid}/messages"),
        ]:
            r = await hung(client, relay, alice, method, path, {} if method == "POST" else None)
            assert (method, path, r.status_code, r.json()) == (method, path, 503, UNAVAILABLE)
        # The page and its files need no database.
        for path in ("/ui", "/ui/app.js", "/ui/app.css"):
            r, took = await timed(client, "GET", path)
            assert (path, r.status_code, took < WITHIN) == (path, 200, True)
        await warm(client, relay)
        r = await client.get("/v1/chat/search?q=hello", headers=alice.headers)
        assert r.status_code == 200, r.text


async def test_mcp_tools_answer_a_tool_error_while_the_database_hangs(
    settings: Settings, relay: Relay, alice: User, db: asyncpg.Connection
) -> None:
    upstream = respx.Router(base_url=settings.upstream_base_url, assert_all_called=False)
    route = upstream.post("/chat/completions").mock(
        return_value=httpx.Response(200, json=completion("fine")))
    async with app_client(quick(settings, relay), upstream) as client:
        sid = await new_session(client, alice, model="gpt-4o")
        for tool, arguments in [
            ("list_sessions", {}),
            ("list_sessions", {"query": "hello"}),
            ("get_messages", {"session_id": sid}),
            ("send_message", {"session_id": sid, "content": "hi"}),
            ("send_message", {"session_id": sid, "content": "hi", "model": "gpt-4o"}),
            ("export_session", {"session_id": sid}),
        ]:
            call = mcp_call(tool, **arguments)
            await warm(client, relay)
            await leased(client, alice)
            relay.stall()
            r, took = await timed(client, "POST", "/mcp", json=call,
                                  headers={**alice.headers, **MCP})
            assert took < WITHIN, (tool, arguments, took)
            if r.status_code == 200:  # past the MCP layer: the tool says it
                result = r.json()["result"]
                assert (tool, result["isError"], result["content"][0]["text"]) == (
                    tool, True, f"Error executing tool {tool}: {UNAVAILABLE['error']['message']}")
            else:
                assert (tool, r.status_code, r.json()) == (tool, 503, UNAVAILABLE)
        assert route.call_count == 0
        await warm(client, relay)
        r = await client.post("/mcp", json=mcp_call("send_message", session_id=sid,
                                                    content="back"),
                              headers={**alice.headers, **MCP})
        assert not r.json()["result"]["isError"], r.text
    assert await contents(db, sid) == [("user", "back"), ("assistant", "fine")]


@pytest.mark.parametrize("kind", ["alone", "conversation", "chained"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_response_whose_write_hangs_is_503_or_failed_and_stores_nothing(
    settings: Settings, relay: Relay, alice: User, db: asyncpg.Connection, kind: str,
    stream: bool
) -> None:
    upstream = respx.Router(base_url=settings.upstream_base_url, assert_all_called=False)
    upstream.post("/chat/completions").mock(
        return_value=httpx.Response(200, json=completion("first")))
    async with app_client(quick(settings, relay), upstream) as client:
        first = await client.post("/v1/responses", headers=alice.headers,
                                  json={"model": "gpt-4o", "input": "one"})
        assert first.status_code == 200, first.text
        body: dict[str, Any] = {"model": "gpt-4o", "input": "two", "stream": stream}
        if kind == "conversation":
            body["conversation"] = await new_session(client, alice)
        elif kind == "chained":
            body["previous_response_id"] = first.json()["id"]

        def stall_then_answer(request: httpx.Request) -> httpx.Response:
            relay.stall()  # the database hangs between the history read and the write
            if stream:
                return httpx.Response(200, headers=SSE, content=stream_of("lost"))
            return httpx.Response(200, json=completion("lost"))

        upstream.post("/chat/completions").mock(side_effect=stall_then_answer)
        await warm(client, relay)
        await leased(client, alice)
        r, took = await timed(client, "POST", "/v1/responses", json=body,
                              headers=alice.headers)
        assert took < WITHIN, took
        if stream:
            assert r.status_code == 200
            last = json.loads(last_event(r.content).split(b"data: ", 1)[1])
            assert last["type"] == "response.failed", last
            assert last["response"]["error"]["message"] == UNAVAILABLE["error"]["message"]
        else:
            assert (r.status_code, r.json()) == (503, UNAVAILABLE)
        await warm(client, relay)
    assert await responses_of(db, alice) == 1  # the first one only
    if kind == "conversation":
        assert await contents(db, body["conversation"]) == []


async def responses_of(db: asyncpg.Connection, user: User) -> int:
    count: int = await db.fetchval("SELECT count(*) FROM responses WHERE user_id = $1", user.id)
    return count


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cut", ["before_commit", "after_commit"])
@pytest.mark.parametrize("kind", ["conversation", "chained"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_response_write_cut_mid_statement_is_stored_once_and_answered(
    settings: Settings, relay: Relay, alice: User, db: asyncpg.Connection, cut: str, kind: str,
    stream: bool
) -> None:
    """The connection through the relay is cut while the response's write is out: it never
    reached PostgreSQL (`before_commit`), or it committed and the answer was lost
    (`after_commit`). The retry stores the turn and its response exactly once, and the client
    gets the response."""
    upstream = respx.Router(base_url=settings.upstream_base_url, assert_all_called=False)
    calls = 0

    def answer(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 2:  # the second response's write goes out into the fault
            relay.stall() if cut == "before_commit" else relay.deafen()
        if stream and calls == 2:
            return httpx.Response(200, headers=SSE, content=stream_of(f"reply {calls}"))
        return httpx.Response(200, json=completion(f"reply {calls}"))

    upstream.post("/chat/completions").mock(side_effect=answer)
    # One pooled connection, so the write's statement was prepared by the first response.
    one = configured(settings, database_url=relay.url(), db_pool_size=1)
    async with app_client(one, upstream) as client:
        sid = await new_session(client, alice)
        body: dict[str, Any] = {"model": "gpt-4o", "input": "again",
                                "conversation" if kind == "conversation" else "store": (
                                    sid if kind == "conversation" else True)}
        r = await client.post("/v1/responses", json=body, headers=alice.headers)
        assert r.status_code == 200, r.text
        if kind == "chained":
            body["previous_response_id"] = r.json()["id"]
        again = asyncio.ensure_future(
            client.post("/v1/responses", json={**body, "stream": stream}, headers=alice.headers))
        if cut == "before_commit":
            async def held() -> bool:
                return relay.held > 0
            await until(held, "the write's statement held by the relay")
        else:
            async def committed() -> bool:
                return relay.dropped > 0 and await responses_of(db, alice) == 2
            await until(committed, "the write committed, its answer dropped")
        await asyncio.to_thread(relay.resume)  # cuts the connection the write waits on
        r = await asyncio.wait_for(again, 30)
        assert r.status_code == 200, r.text
        answered = json.loads(last_event(r.content).split(b"data: ", 1)[1])["response"] if (
            stream) else r.json()
        assert answered["status"] == "completed", answered
        rid = answered["id"]
        assert answered["output"][0]["content"][0]["text"] == "reply 2"
        got = await client.get(f"/v1/responses/{rid}", headers=alice.headers)
        assert got.status_code == 200 and got.json()["id"] == rid
    assert await responses_of(db, alice) == 2
    if kind == "conversation":
        assert await contents(db, sid) == [("user", "again"), ("assistant", "reply 1"),
                                           ("user", "again"), ("assistant", "reply 2")]


async def test_a_compaction_whose_save_hangs_answers_503_within_seconds(
    settings: Settings, relay: Relay, alice: User, db: asyncpg.Connection
) -> None:
    """The database hangs while the summary model writes: the summary's save is a request's
    statement like any other, not bulk work, so the client hears of it in seconds."""
    upstream = respx.Router(base_url=settings.upstream_base_url, assert_all_called=False)
    upstream.post("/chat/completions").mock(
        return_value=httpx.Response(200, json=completion("fine")))
    async with app_client(quick(settings, relay, summary_model=SUMMARY_MODEL),
                          upstream) as client:
        sid = await new_session(client, alice, max_history_messages=0)
        chat = {"model": "gpt-4o", "session_id": sid,
                "messages": [{"role": "user", "content": "hi"}]}
        r = await client.post("/v1/chat/completions", json=chat, headers=alice.headers)
        assert r.status_code == 200, r.text

        def stall_then_summarise(request: httpx.Request) -> httpx.Response:
            relay.stall()
            return httpx.Response(200, json=completion("SUMMARY"))

        upstream.post("/chat/completions").mock(side_effect=stall_then_summarise)
        await warm(client, relay)
        await leased(client, alice)
        r, took = await timed(client, "POST", f"/v1/chat/sessions/{sid}/compact", json={},
                              headers=alice.headers)
        assert (r.status_code, r.json(), took < WITHIN) == (503, UNAVAILABLE, True)
        await warm(client, relay)
        upstream.post("/chat/completions").mock(
            return_value=httpx.Response(200, json=completion("SUMMARY")))
        r = await client.post(f"/v1/chat/sessions/{sid}/compact", json={}, headers=alice.headers)
        assert (r.status_code, r.json()["text"]) == (200, "SUMMARY"), r.text
