"""`send_message` (contract §9): a turn run from an assistant, over `/mcp` and over stdio, with the
official `mcp` client against a live server and a fake upstream. The turn is the one
`/v1/chat/completions` with the session runs: the same upstream body, the same stored rows."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import httpx
import pytest

from proxy import codec
from proxy.mcp.tools import refusal
from proxy.turns import Passthrough
from tests.conftest import User
from tests.fault_helpers import GARBAGE, FakeUpstream, Serve
from tests.mcp_helpers import (
    CONVO,
    conversation,
    fingerprint,
    live_server,
    ok,
    over_http,
    over_http_modern,
    over_stdio,
    refused,
    rest_as,
)

HISTORY = [message for message, _, _ in CONVO]  # what a turn on a CONVO session injects
STRIP = ("id", "session_id", "created_at")


@pytest.mark.parametrize(("status", "raw", "message"), [
    (400, b'{"error": {"message": "too long", "type": "invalid_request_error"}}',
     "The upstream refused the turn (HTTP 400): too long; nothing was stored"),
    (429, b'{"error": {"message": "' + b"x" * 1200 + b'"}}',
     "The upstream refused the turn (HTTP 429): " + "x" * 1000 + "…; nothing was stored"),
    (500, b'{"error": {"message": "bad \\ud800 text"}}',
     "The upstream refused the turn (HTTP 500): bad ? text; nothing was stored"),
    (502, b'{"error": "a string, not an envelope"}',
     "The upstream refused the turn (HTTP 502); nothing was stored"),
    (503, b'{"error": {"message": 42}}',
     "The upstream refused the turn (HTTP 503); nothing was stored"),
    (500, GARBAGE, "The upstream refused the turn (HTTP 500); nothing was stored"),
    (500, b"\xff\xfe not even text",
     "The upstream refused the turn (HTTP 500); nothing was stored"),
    (200, b'{"object": "list"}', "The upstream answered with something that is not a chat "
                                 "completion; nothing was stored"),
])
def test_an_upstream_refusal_is_told_by_its_envelopes_message_only(
    status: int, raw: bytes, message: str
) -> None:
    error = refusal(Passthrough(status, {}, raw))
    assert error.message == message
    error.message.encode()  # sendable as UTF-8


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture(scope="module")
def live(database_url: str, upstream: FakeUpstream,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    tmp = tmp_path_factory.mktemp("mcp-send")
    with live_server(database_url, upstream.base_url, tmp) as server:
        yield server


@pytest.fixture
async def rest(live: Serve, alice: User) -> AsyncIterator[httpx.AsyncClient]:
    async with rest_as(live, alice) as client:
        yield client


async def stored(db: asyncpg.Connection, session_id: str) -> list[dict[str, Any]]:
    """The session's messages as the REST API lists them, less what differs between sessions."""
    rows = await db.fetch("SELECT body, status FROM chat_messages WHERE session_id = $1 "
                          "ORDER BY seq", session_id)
    return [{**codec.loads(r["body"]), "status": r["status"]} for r in rows]


@pytest.mark.e2e
async def test_a_turn_is_the_one_a_chat_completion_on_the_session_runs(
    live: Serve, upstream: FakeUpstream, alice: User, db: asyncpg.Connection,
    rest: httpx.AsyncClient,
) -> None:
    sid = await conversation(db, alice, model="echo", system_prompt="Be brief.")
    twin = await conversation(db, alice, model="echo", system_prompt="Be brief.")
    before = len(upstream.requests)
    async with over_http(live.url, alice.key) as mcp:
        result = await mcp.call_tool("send_message", {"session_id": sid, "content": "And Rome?"})
    assert not result.is_error, result.content
    r = await rest.post("/v1/chat/completions", json={
        "model": "echo", "session_id": twin,
        "messages": [{"role": "user", "content": "And Rome?"}]})
    assert r.status_code == 200, r.text

    (_, by_tool), (_, by_rest) = upstream.requests[before:]
    assert by_tool == by_rest == {"model": "echo", "messages": [
        {"role": "system", "content": "Be brief."}, *HISTORY,
        {"role": "user", "content": "And Rome?"}]}
    # Stored once: the user's message and the reply, after the history, as REST stores them.
    turn = [{"role": "user", "content": "And Rome?", "status": "complete"},
            {"role": "assistant", "content": "reply to And Rome?", "status": "complete"}]
    assert (await stored(db, sid))[len(CONVO):] == turn
    assert await stored(db, sid) == await stored(db, twin)
    assert len(await stored(db, sid)) == len(CONVO) + 2

    session = codec.loads((await rest.get(f"/v1/chat/sessions/{sid}")).content)
    assert session["message_count"] == len(CONVO) + 2
    assert result.structured_content == {
        "reply": {"role": "assistant", "content": "reply to And Rome?"}, "session": session}
    text = result.content[0].text  # type: ignore[union-attr]
    assert text.startswith("assistant: reply to And Rome?\nStored in session " + sid)


@pytest.mark.e2e
async def test_the_model_is_the_sessions_unless_given(
    live: Serve, upstream: FakeUpstream, alice: User, db: asyncpg.Connection
) -> None:
    before = len(upstream.requests)
    async with over_http(live.url, alice.key) as mcp:
        other = (await ok(mcp, "create_session", model="gpt-4o"))["session"]
        none = (await ok(mcp, "create_session"))["session"]["id"]
        sent = await ok(mcp, "send_message", session_id=other["id"], content="hi", model="echo")
        assert sent["reply"]["content"] == "reply to hi"
        assert [body["model"] for _, body in upstream.requests[before:]] == ["echo"]
        assert sent["session"]["model"] == "gpt-4o"  # the argument does not change the session

        untouched = await fingerprint(db, alice)
        asked = len(upstream.requests)
        assert await refused(mcp, "send_message", session_id=none, content="hi") == (
            f"Error executing tool send_message: Session {none} has no model: give the model "
            "to send to")
        assert await fingerprint(db, alice) == untouched and len(upstream.requests) == asked
        assert (await ok(mcp, "send_message", session_id=none, content="hi", model="echo"))[
            "session"]["message_count"] == 2


@pytest.mark.e2e
async def test_another_users_session_is_not_found_and_nothing_is_sent_or_stored(
    live: Serve, upstream: FakeUpstream, alice: User, bob: User, db: asyncpg.Connection
) -> None:
    theirs = await conversation(db, alice, model="echo")
    before, asked = await fingerprint(db, alice), len(upstream.requests)
    async with over_http(live.url, bob.key) as mcp:
        for model in ({}, {"model": "echo"}):  # the session's model is looked up, or not
            assert await refused(mcp, "send_message", session_id=theirs, content="hi",
                                 **model) == (
                f"Error executing tool send_message: Session {theirs} not found")
    assert await fingerprint(db, alice) == before
    assert len(upstream.requests) == asked


BAD: list[tuple[dict[str, Any], str]] = [
    ({"content": ""}, "String should have at least 1 character"),
    ({"content": 42}, "Input should be a valid string"),
    ({"content": [{"type": "text", "text": "hi"}]}, "Input should be a valid string"),
    ({"content": None}, "Input should be a valid string"),
    ({"content": "hi", "session_id": 42}, "Input should be a valid string"),
    ({"content": "hi", "session_id": "sess_\u0000"}, "Session (malformed id) not found"),
    ({"content": "hi", "session_id": "nope"}, "Session nope not found"),
    ({"content": "hi", "model": ""}, "String should have at least 1 character"),
    ({"content": "hi", "model": 7}, "Input should be a valid string"),
    ({"content": "hi", "model": "m" * 201}, "at most 200 characters"),
    ({}, "content\n  Field required"),
]


@pytest.mark.e2e
async def test_bad_arguments_are_tool_errors_that_send_and_store_nothing(
    live: Serve, upstream: FakeUpstream, alice: User, db: asyncpg.Connection
) -> None:
    sid = await conversation(db, alice, model="echo")
    before, asked = await fingerprint(db, alice), len(upstream.requests)
    async with over_http(live.url, alice.key) as mcp:
        for arguments, message in BAD:
            text = await refused(mcp, "send_message", **{"session_id": sid, **arguments})
            assert message in text, (arguments, text)
    assert await fingerprint(db, alice) == before
    assert len(upstream.requests) == asked


@pytest.mark.e2e
async def test_an_upstream_error_is_a_tool_error_and_nothing_is_stored(
    live: Serve, upstream: FakeUpstream, alice: User, db: asyncpg.Connection
) -> None:
    sid = await conversation(db, alice)
    before = await fingerprint(db, alice)
    said = "Error executing tool send_message: The upstream"
    async with over_http(live.url, alice.key) as mcp:
        for model, message in [
            ("status:400", f"{said} refused the turn (HTTP 400): upstream says no; nothing "
                           "was stored"),
            ("status:503", f"{said} refused the turn (HTTP 503): upstream says no; nothing "
                           "was stored"),
            # Not OpenAI's envelope: the status, never the body.
            ("garbage:500", f"{said} refused the turn (HTTP 500); nothing was stored"),
            ("garbage:200", f"{said} answered with a body that is not JSON"),
            ("notchat", f"{said} answered with something that is not a chat completion; "
                        "nothing was stored"),
        ]:
            assert await refused(mcp, "send_message", session_id=sid, content="hi",
                                 model=model) == message
    assert await fingerprint(db, alice) == before
    assert GARBAGE.decode() not in live.log()


@pytest.mark.e2e
async def test_the_access_log_line_has_the_turns_fields_and_no_message_text(
    live: Serve, alice: User, db: asyncpg.Connection
) -> None:
    sid = await conversation(db, alice, model="echo")
    marker = "secret-marker-" + alice.id
    async with over_http(live.url, alice.key) as mcp:
        await ok(mcp, "send_message", session_id=sid, content=marker)
        await refused(mcp, "send_message", session_id=sid, content=marker, model="status:400")
    log = live.log()
    assert marker not in log and alice.key not in log
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    turns = [(line["status"], line["session_id"], line["upstream_status"]) for line in lines
             if line["logger"] == "chatproxy.access" and line.get("session_id") == sid]
    assert turns == [(200, sid, 200), (200, sid, 400)]


@pytest.mark.e2e
async def test_the_per_request_protocol_the_official_client_prefers(
    live: Serve, upstream: FakeUpstream, alice: User, bob: User, db: asyncpg.Connection
) -> None:
    """The SDK serves 2026-07-28 (no handshake; each request in its own task, no per-request
    transport) on the same mount: the same key check, tools and isolation."""
    sid = await conversation(db, alice, model="echo")
    theirs = await conversation(db, bob, model="echo")
    bobs = await fingerprint(db, bob)
    async with over_http_modern(live.url, alice.key) as mcp:
        assert mcp.protocol_version == "2026-07-28"
        before = len(upstream.requests)
        sent = await ok(mcp, "send_message", session_id=sid, content="And Rome?")
        (_, body), = upstream.requests[before:]
        assert body["messages"] == [*HISTORY, {"role": "user", "content": "And Rome?"}]
        assert sent["reply"] == {"role": "assistant", "content": "reply to And Rome?"}
        assert len(await stored(db, sid)) == len(CONVO) + 2
        assert [s["id"] for s in (await ok(mcp, "list_sessions"))["sessions"]] == [sid]
        assert await refused(mcp, "send_message", session_id=theirs, content="hi") == (
            f"Error executing tool send_message: Session {theirs} not found")
        assert "at least 1 character" in await refused(mcp, "send_message", session_id=sid,
                                                       content="")
    assert await fingerprint(db, bob) == bobs
    assert len(upstream.requests) == before + 1


@pytest.mark.e2e
async def test_over_stdio(
    database_url: str, upstream: FakeUpstream, alice: User, bob: User, db: asyncpg.Connection
) -> None:
    sid = await conversation(db, alice, model="echo")
    theirs = await conversation(db, bob, model="echo")
    bobs = await fingerprint(db, bob)
    async with over_stdio(database_url, alice.name,
                          CHATPROXY_UPSTREAM_BASE_URL=upstream.base_url) as mcp:
        before = len(upstream.requests)
        sent = await ok(mcp, "send_message", session_id=sid, content="And Rome?")
        (_, body), = upstream.requests[before:]
        assert body["messages"] == [*HISTORY, {"role": "user", "content": "And Rome?"}]
        assert sent["reply"] == {"role": "assistant", "content": "reply to And Rome?"}
        assert sent["session"]["message_count"] == len(CONVO) + 2
        assert (await stored(db, sid))[len(CONVO):] == [
            {"role": "user", "content": "And Rome?", "status": "complete"},
            {"role": "assistant", "content": "reply to And Rome?", "status": "complete"}]

        mine = await fingerprint(db, alice)
        assert await refused(mcp, "send_message", session_id=theirs, content="hi") == (
            f"Error executing tool send_message: Session {theirs} not found")
        assert await refused(mcp, "send_message", session_id=sid, content="") != ""
        assert await refused(mcp, "send_message", session_id=sid, content="hi",
                             model="status:400") == (
            "Error executing tool send_message: The upstream refused the turn (HTTP 400): "
            "upstream says no; nothing was stored")
        assert len(upstream.requests) == before + 2  # the turn, and the refused one
    assert await fingerprint(db, alice) == mine
    assert await fingerprint(db, bob) == bobs
