"""Session lifecycle (contract §5): restore, clear, export/import, fork, merge, and big sessions."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import httpx
import pytest
import respx
from litestar.testing import AsyncTestClient

from proxy import codec, document, timefmt
from proxy.store import lifecycle, messages, sessions
from proxy.store.messages import NewMessage
from tests.conftest import User

PREFIXES = ["/v1/chat/sessions", "/chat/sessions"]
F = "chatproxy.session.v1"

# seq: 1 user (NUL, lone surrogate), 2 assistant opening a two-call tool exchange, 3-4 its
# answers, 5 the final answer, 6 user with content parts and a name, 7 an incomplete reply.
CONVO: list[tuple[dict[str, Any], int, str]] = [
    ({"role": "user", "content": "Weather in Paris\u0000 and \ud800?"}, 12, "complete"),
    ({"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}},
        {"id": "call_2", "type": "function",
         "function": {"name": "sky", "arguments": "{}"}}]}, 20, "complete"),
    ({"role": "tool", "tool_call_id": "call_1", "content": "18C"}, 5, "complete"),
    ({"role": "tool", "tool_call_id": "call_2", "content": "sunny \udfff"}, 6, "complete"),
    ({"role": "assistant", "content": "It is 18C and sunny.", "function_call": None}, 9,
     "complete"),
    ({"role": "user", "name": "ann", "content": [{"type": "text", "text": "thanks"}]}, 7,
     "complete"),
    ({"role": "assistant", "content": "You're welc", "refusal": None}, 4, "incomplete"),
]
CONVO_TOKENS = sum(t for _, t, _ in CONVO)


def not_found(session_id: str, param: str = "session_id") -> dict[str, Any]:
    return {"error": {"message": f"Session {session_id} not found",
                      "type": "invalid_request_error", "param": param,
                      "code": "session_not_found"}}


def bad(message: str, param: str | None, code: str = "invalid_value") -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param,
                      "code": code}}


def post_json(body: Any, user: User) -> dict[str, Any]:
    """`content=` and headers for a body httpx cannot encode (lone surrogates)."""
    return {"content": json.dumps(body).encode(),
            "headers": {**user.headers, "Content-Type": "application/json"}}


async def codec_conn(conn: asyncpg.Connection) -> asyncpg.Connection:
    """The test connection, able to read sessions (their metadata is jsonb)."""
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads,
                              schema="pg_catalog")
    return conn


async def create(client: AsyncTestClient[Any], user: User, **fields: Any) -> dict[str, Any]:
    r = await client.post("/v1/chat/sessions", **post_json(fields, user))
    assert r.status_code == 201, r.text
    session: dict[str, Any] = codec.loads(r.content)
    return session


async def seed(db: asyncpg.Connection, session_id: str,
               rows: list[tuple[dict[str, Any], int, str]]) -> None:
    turn = [NewMessage(m, tokens, status) for m, tokens, status in rows]
    assert await messages.store_turn(db, session_id, turn) == len(rows)


async def contents(client: AsyncTestClient[Any], user: User, session_id: str) -> list[Any]:
    r = await client.get(f"/v1/chat/sessions/{session_id}/messages?limit=500",
                         headers=user.headers)
    assert r.status_code == 200, r.text
    return [(m["seq"], m["content"]) for m in codec.loads(r.content)["data"]]


async def bodies(db: asyncpg.Connection, session_id: str) -> list[tuple[Any, ...]]:
    rows = await db.fetch(
        "SELECT seq, role, has_tool_calls, body, tokens, status, created_at FROM chat_messages "
        "WHERE session_id = $1 ORDER BY seq", session_id)
    # Times as the API writes them (to the second): what an export -> import keeps.
    return [(r["seq"], r["role"], r["has_tool_calls"], codec.loads(r["body"]), r["tokens"],
             r["status"], timefmt.iso(r["created_at"])) for r in rows]


async def get(client: AsyncTestClient[Any], user: User, session_id: str) -> dict[str, Any]:
    r = await client.get(f"/v1/chat/sessions/{session_id}", headers=user.headers)
    assert r.status_code == 200, r.text
    session: dict[str, Any] = codec.loads(r.content)
    return session


async def convo_session(client, db, user: User, **fields: Any) -> dict[str, Any]:
    session = await create(client, user, **fields)
    await seed(db, session["id"], CONVO)
    return await get(client, user, session["id"])


# --- ownership: another user's session is a 404 everywhere -----------------------------------


OWNED = [
    ("POST", "/restore", None),
    ("DELETE", "/messages", None),
    ("GET", "/export", None),
    ("POST", "/fork", {}),
    ("POST", "/fork", {"up_to_seq": 1}),
    ("POST", "/merge", "bob's own"),
]


@pytest.mark.parametrize("prefix", PREFIXES, ids=["v1", "bare"])
@pytest.mark.parametrize(("method", "suffix", "body"), OWNED,
                         ids=[f"{m} {s} {b is not None}" for m, s, b in OWNED])
async def test_another_users_session_is_not_found(
    client, db, alice: User, bob: User, prefix: str, method: str, suffix: str, body: Any
) -> None:
    target = await convo_session(client, db, alice)
    if body == "bob's own":
        body = {"source_session_id": (await create(client, bob))["id"]}
    r = await client.request(method, f"{prefix}/{target['id']}{suffix}", json=body,
                             headers=bob.headers)
    assert r.status_code == 404, r.text
    assert r.json() == not_found(target["id"])
    assert await get(client, alice, target["id"]) == target  # untouched


async def test_merging_another_users_session_in_is_not_found(client, db, alice, bob) -> None:
    theirs = await convo_session(client, db, alice)
    mine = await create(client, bob)
    r = await client.post(f"/v1/chat/sessions/{mine['id']}/merge",
                          json={"source_session_id": theirs["id"]}, headers=bob.headers)
    assert r.status_code == 404
    assert r.json() == not_found(theirs["id"], "source_session_id")
    assert await get(client, alice, theirs["id"]) == theirs
    assert (await get(client, bob, mine["id"]))["message_count"] == 0


async def test_lifecycle_routes_need_a_key(client, db, alice) -> None:
    session = await create(client, alice)
    for method, suffix, body in OWNED:
        r = await client.request(method, f"/v1/chat/sessions/{session['id']}{suffix}",
                                 json=body if isinstance(body, dict) else None)
        assert r.status_code == 401, (method, suffix)
    r = await client.post("/v1/chat/sessions/import", json={})
    assert r.status_code == 401


# --- list and restore -------------------------------------------------------------------------


async def test_include_inactive_lists_soft_deleted_sessions(client, alice) -> None:
    kept = await create(client, alice, session_name="kept")
    gone = await create(client, alice, session_name="gone")
    assert (await client.delete(f"/v1/chat/sessions/{gone['id']}",
                                headers=alice.headers)).status_code == 204
    active = (await client.get("/v1/chat/sessions", headers=alice.headers)).json()
    assert [s["id"] for s in active["data"]] == [kept["id"]]
    r = await client.get("/v1/chat/sessions?include_inactive=true", headers=alice.headers)
    listed = r.json()
    assert listed["total"] == 2
    assert {s["id"]: s["is_active"] for s in listed["data"]} == {kept["id"]: True,
                                                                 gone["id"]: False}


async def test_restore_brings_a_soft_deleted_session_back(client, db, alice) -> None:
    session = await convo_session(client, db, alice, session_name="old", system_prompt="sp")
    await client.delete(f"/v1/chat/sessions/{session['id']}", headers=alice.headers)
    for method, suffix in [("GET", ""), ("GET", "/export"), ("POST", "/fork"),
                           ("DELETE", "/messages")]:
        r = await client.request(method, f"/v1/chat/sessions/{session['id']}{suffix}",
                                 headers=alice.headers)
        assert r.status_code == 404, suffix
        assert r.json() == not_found(session["id"])
    r = await client.post(f"/chat/sessions/{session['id']}/restore", headers=alice.headers)
    assert r.status_code == 200, r.text
    restored = codec.loads(r.content)
    assert restored == {**session, "updated_at": restored["updated_at"]}
    assert await get(client, alice, session["id"]) == restored
    assert len(await contents(client, alice, session["id"])) == len(CONVO)
    row = await db.fetchrow("SELECT deleted_at FROM chat_sessions WHERE id = $1", session["id"])
    assert row["deleted_at"] is None


async def test_restoring_an_active_session_changes_nothing(client, alice) -> None:
    session = await create(client, alice)
    r = await client.post(f"/v1/chat/sessions/{session['id']}/restore", headers=alice.headers)
    assert r.status_code == 200
    assert r.json() == session


async def test_restore_unknown_session(client, alice) -> None:
    r = await client.post("/v1/chat/sessions/sess_nope/restore", headers=alice.headers)
    assert r.status_code == 404
    assert r.json() == not_found("sess_nope")


# --- clear ------------------------------------------------------------------------------------


async def test_clear_empties_history_and_keeps_settings(client, db, alice) -> None:
    session = await convo_session(client, db, alice, session_name="n", model="gpt-4o",
                                  system_prompt="be brief", max_history_messages=7,
                                  max_history_tokens=900, metadata={"k": "v"})
    assert session["message_count"] == len(CONVO)
    r = await client.delete(f"/chat/sessions/{session['id']}/messages", headers=alice.headers)
    assert r.status_code == 204
    assert r.content == b""
    after = await get(client, alice, session["id"])
    assert after == {**session, "message_count": 0, "total_tokens": 0, "last_message_at": None,
                     "updated_at": after["updated_at"]}
    assert await contents(client, alice, session["id"]) == []
    # The next turn is stored as usual; seqs keep counting, so a seq never names two messages.
    await seed(db, session["id"], [({"role": "user", "content": "again"}, 3, "complete")])
    assert await contents(client, alice, session["id"]) == [(8, "again")]
    assert (await get(client, alice, session["id"]))["message_count"] == 1


async def test_clear_a_deleted_session_is_not_found(client, alice) -> None:
    session = await create(client, alice)
    await client.delete(f"/v1/chat/sessions/{session['id']}", headers=alice.headers)
    r = await client.delete(f"/v1/chat/sessions/{session['id']}/messages",
                            headers=alice.headers)
    assert r.status_code == 404
    assert r.json() == not_found(session["id"])


# --- export and import ------------------------------------------------------------------------


def expected_document(session: dict[str, Any], rows: list[asyncpg.Record]) -> dict[str, Any]:
    data = []
    for (message, tokens, status), row in zip(CONVO, rows, strict=True):
        item: dict[str, Any] = {"id": f"msg_{row['id']}", "object": "chat.message",
                                "session_id": session["id"], "seq": row["seq"],
                                "role": message["role"], "content": message["content"]}
        item.update((k, v) for k, v in message.items() if k not in item)
        item.update(tokens=tokens, status=status, created_at=timefmt.iso(row["created_at"]))
        data.append(item)
    return {"format": F, "session": session, "summary": None, "messages": data}


async def test_export_is_the_whole_session_in_order(client, db, alice) -> None:
    session = await convo_session(client, db, alice, session_name="trip \u0000",
                                  metadata={"k": "\ud800"})
    r = await client.get(f"/v1/chat/sessions/{session['id']}/export", headers=alice.headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    assert "content-length" not in r.headers  # streamed
    rows = await db.fetch("SELECT id, seq, created_at FROM chat_messages WHERE session_id = $1 "
                          "ORDER BY seq", session["id"])
    assert codec.loads(r.content) == expected_document(session, rows)


async def test_export_import_round_trip(client, db, upstream: respx.Router, alice, bob) -> None:
    # Made in the store: the sessions API refuses a lone surrogate in session_name.
    made = await sessions.create_session(await codec_conn(db), alice.id, {
        "session_name": "trip \u0000\ud800", "model": "gpt-4o", "system_prompt": "sys \udc00",
        "max_history_messages": 50, "max_history_tokens": 5000,
        "metadata": {"a\u0000": "b\ud800"}})
    await seed(db, made["id"], CONVO)
    original = await get(client, alice, made["id"])
    exported = (await client.get(f"/v1/chat/sessions/{original['id']}/export",
                                 headers=alice.headers)).content
    r = await client.post("/v1/chat/sessions/import", content=exported,
                          headers={**bob.headers, "Content-Type": "application/json"})
    assert r.status_code == 201, r.text
    imported = codec.loads(r.content)
    assert imported["id"] != original["id"]
    assert imported == {**original, "id": imported["id"], "session_id": imported["id"],
                        "created_at": imported["created_at"],
                        "updated_at": imported["updated_at"]}
    owner = await db.fetchval("SELECT user_id FROM chat_sessions WHERE id = $1", imported["id"])
    assert owner == bob.id
    # Same messages, stored the same way: roles, bodies, tool calls, tokens, statuses, times.
    assert await bodies(db, imported["id"]) == await bodies(db, original["id"])
    again = codec.loads((await client.get(f"/v1/chat/sessions/{imported['id']}/export",
                                          headers=bob.headers)).content)
    first = codec.loads(exported)
    for message in first["messages"] + again["messages"]:
        message.pop("id")
        message.pop("session_id")
    assert again["messages"] == first["messages"]
    # The imported history goes upstream character for character.
    route = upstream.post("/chat/completions").mock(return_value=httpx.Response(200, json={
        "id": "c", "object": "chat.completion", "created": 1, "model": "gpt-4o",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                     "finish_reason": "stop"}]}))
    r = await client.post("/v1/chat/completions", headers=bob.headers, json={
        "model": "gpt-4o", "session_id": imported["id"],
        "messages": [{"role": "user", "content": "next"}]})
    assert r.status_code == 200, r.text
    sent = json.loads(route.calls[0].request.content)["messages"]
    assert sent == [{"role": "system", "content": "sys \udc00"},
                    *[m for m, _, _ in CONVO], {"role": "user", "content": "next"}]


async def test_import_minimal_document_counts_tokens(client, db, alice) -> None:
    doc = {"format": F, "session": {},
           "messages": [{"role": "user", "content": "hello"},
                        {"role": "assistant", "content": "hi", "status": "incomplete"}]}
    r = await client.post("/chat/sessions/import", json=doc, headers=alice.headers)
    assert r.status_code == 201, r.text
    session = r.json()
    assert session["max_history_messages"] == 20
    assert session["message_count"] == 2
    stored = await bodies(db, session["id"])
    assert [(s[0], s[1], s[3], s[5]) for s in stored] == [
        (1, "user", {"role": "user", "content": "hello"}, "complete"),
        (2, "assistant", {"role": "assistant", "content": "hi"}, "incomplete")]
    assert all(s[4] > 0 for s in stored)
    assert session["total_tokens"] == sum(s[4] for s in stored)


async def test_import_of_an_empty_session(client, alice) -> None:
    r = await client.post("/v1/chat/sessions/import", headers=alice.headers,
                          json={"format": F, "session": {"session_name": "e"}, "messages": []})
    assert r.status_code == 201
    session = r.json()
    assert (session["session_name"], session["message_count"], session["last_message_at"]) == (
        "e", 0, None)


MISSING = "missing_required_parameter"
TIMESTAMP = "expected an ISO 8601 timestamp (in UTC, from year 1 to 9999)"
GOOD_MESSAGE = {"role": "user", "content": "x"}
BAD_DOCUMENTS: list[tuple[Any, str, str | None, str]] = [
    ([], "The export document must be a JSON object", None, "invalid_value"),
    ({}, "Missing required parameter: format", "format", MISSING),
    ({"format": "chatproxy.session.v2"},
     "Invalid value for format: expected 'chatproxy.session.v1'", "format", "invalid_value"),
    ({"format": F, "messages": []}, "Missing required parameter: session", "session", MISSING),
    ({"format": F, "session": [], "messages": []},
     "Invalid value for session: expected an object", "session", "invalid_value"),
    ({"format": F, "session": {"max_history_messages": 5000}, "messages": []},
     "Invalid value for session.max_history_messages: expected an integer between 0 and 1000",
     "session.max_history_messages", "invalid_value"),
    ({"format": F, "session": {"metadata": {"a": 1}}, "messages": []},
     "Invalid value for session.metadata: expected an object of strings", "session.metadata",
     "invalid_value"),
    ({"format": F, "session": {"session_name": 3}, "messages": []},
     "Invalid value for session.session_name: expected a string or null",
     "session.session_name", "invalid_value"),
    ({"format": F, "session": {}}, "Missing required parameter: messages", "messages", MISSING),
    ({"format": F, "session": {}, "messages": {}},
     "Invalid value for messages: expected an array", "messages", "invalid_value"),
    ({"format": F, "session": {}, "messages": [GOOD_MESSAGE, "x"]},
     "Invalid value for messages[1]: expected an object", "messages[1]", "invalid_value"),
    ({"format": F, "session": {}, "messages": [{"content": "x"}]},
     "Missing required parameter: messages[0].role", "messages[0].role", MISSING),
    ({"format": F, "session": {}, "messages": [GOOD_MESSAGE, {"role": "robot", "content": ""}]},
     "Invalid value for messages[1].role: expected one of assistant, developer, function, "
     "system, tool, user", "messages[1].role", "invalid_value"),
    ({"format": F, "session": {}, "messages": [{"role": "user"}]},
     "Missing required parameter: messages[0].content", "messages[0].content", MISSING),
    ({"format": F, "session": {}, "messages": [{"role": "user", "content": 5}]},
     "Invalid value for messages[0].content: expected a string, an array or null",
     "messages[0].content", "invalid_value"),
    ({"format": F, "session": {},
      "messages": [{"role": "assistant", "content": None, "tool_calls": "x"}]},
     "Invalid value for messages[0].tool_calls: expected an array of objects",
     "messages[0].tool_calls", "invalid_value"),
    ({"format": F, "session": {}, "messages": [{**GOOD_MESSAGE, "tokens": -1}]},
     "Invalid value for messages[0].tokens: expected an integer between 0 and 2147483647",
     "messages[0].tokens", "invalid_value"),
    ({"format": F, "session": {}, "messages": [{**GOOD_MESSAGE, "status": "done"}]},
     "Invalid value for messages[0].status: expected complete or incomplete",
     "messages[0].status", "invalid_value"),
    ({"format": F, "session": {}, "messages": [{**GOOD_MESSAGE, "seq": 2},
                                              {**GOOD_MESSAGE, "seq": 2}]},
     "Invalid value for messages[1].seq: messages must be in increasing seq order",
     "messages[1].seq", "invalid_value"),
    ({"format": F, "session": {}, "messages": [{**GOOD_MESSAGE, "created_at": "yesterday"}]},
     "Invalid value for messages[0].created_at: " + TIMESTAMP,
     "messages[0].created_at", "invalid_value"),
    # Issue 13, item 13: a moment beyond years 1-9999 once in UTC, and a status that is not
    # even a string, were 500s.
    ({"format": F, "session": {}, "messages": [
        GOOD_MESSAGE, {**GOOD_MESSAGE, "created_at": "9999-12-31T23:59:59-14:00"}]},
     "Invalid value for messages[1].created_at: " + TIMESTAMP,
     "messages[1].created_at", "invalid_value"),
    ({"format": F, "session": {}, "messages": [
        {**GOOD_MESSAGE, "created_at": "0001-01-01T00:00:00+14:00"}]},
     "Invalid value for messages[0].created_at: " + TIMESTAMP,
     "messages[0].created_at", "invalid_value"),
    ({"format": F, "session": {}, "messages": [{**GOOD_MESSAGE, "status": {"a": 1}}]},
     "Invalid value for messages[0].status: expected complete or incomplete",
     "messages[0].status", "invalid_value"),
    ({"format": F, "session": {}, "messages": [{**GOOD_MESSAGE, "status": ["complete"]}]},
     "Invalid value for messages[0].status: expected complete or incomplete",
     "messages[0].status", "invalid_value"),
]


@pytest.mark.parametrize(("doc", "message", "param", "code"), BAD_DOCUMENTS,
                         ids=[str(p) for _, _, p, _ in BAD_DOCUMENTS])
async def test_malformed_import_is_400_and_creates_nothing(
    client, db, alice, doc: Any, message: str, param: str | None, code: str
) -> None:
    before = await db.fetchval("SELECT count(*) FROM chat_sessions WHERE user_id = $1", alice.id)
    r = await client.post("/v1/chat/sessions/import", json=doc, headers=alice.headers)
    assert r.status_code == 400, r.text
    assert r.json() == bad(message, param, code)
    after = await db.fetchval("SELECT count(*) FROM chat_sessions WHERE user_id = $1", alice.id)
    assert after == before


async def test_import_that_fails_in_the_database_leaves_nothing(db, alice) -> None:
    # The last message breaks a CHECK only PostgreSQL enforces: the whole import rolls back.
    conn = await codec_conn(db)
    doc = document.parse({"format": F, "session": {}, "messages": [GOOD_MESSAGE]}, 20,
                         lambda model, m: 1)
    broken = document.Document(doc.fields, [*doc.messages, document.Message(
        {"role": "user", "content": "y"}, 1, "bogus", None)])
    before = await db.fetchval("SELECT count(*) FROM chat_sessions WHERE user_id = $1", alice.id)
    with pytest.raises(asyncpg.CheckViolationError):
        await lifecycle.import_session(conn, alice.id, broken)
    after = await db.fetchval("SELECT count(*) FROM chat_sessions WHERE user_id = $1", alice.id)
    assert after == before


async def test_import_body_that_is_not_json(client, alice) -> None:
    r = await client.post("/v1/chat/sessions/import", content=b"{nope",
                          headers={**alice.headers, "Content-Type": "application/json"})
    assert r.status_code == 400
    assert r.json() == bad("The request body is not valid JSON", None, "invalid_json")


# --- fork -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("up_to_seq", "kept"), [
    (1, 1),  # after a user message
    (4, 4),  # after a whole tool exchange (its last tool answer)
    (5, 5),  # after the assistant's answer to the tool results
    (7, 7),  # the very end
    (None, 7),  # omitted: everything
])
async def test_fork_at_a_boundary(client, db, alice, up_to_seq: int | None, kept: int) -> None:
    source = await convo_session(client, db, alice, session_name="src", model="gpt-4o",
                                 system_prompt="sp", max_history_messages=9,
                                 max_history_tokens=1234, metadata={"k": "v"})
    body = {} if up_to_seq is None else {"up_to_seq": up_to_seq}
    r = await client.post(f"/v1/chat/sessions/{source['id']}/fork", json=body,
                          headers=alice.headers)
    assert r.status_code == 201, r.text
    fork = codec.loads(r.content)
    copied = (await bodies(db, source["id"]))[:kept]
    assert fork == {**source, "id": fork["id"], "session_id": fork["id"],
                    "message_count": kept, "total_tokens": sum(t for _, t, _ in CONVO[:kept]),
                    "last_message_at": copied[-1][6],
                    "created_at": fork["created_at"], "updated_at": fork["updated_at"]}
    assert await bodies(db, fork["id"]) == copied
    assert await get(client, alice, source["id"]) == source  # the source is untouched
    # The fork continues after its last message.
    await seed(db, fork["id"], [({"role": "user", "content": "branch"}, 2, "complete")])
    assert (await contents(client, alice, fork["id"]))[-1] == (kept + 1, "branch")


@pytest.mark.parametrize("up_to_seq", [2, 3])
async def test_fork_inside_a_tool_exchange_is_400(client, db, alice, up_to_seq: int) -> None:
    source = await convo_session(client, db, alice)
    r = await client.post(f"/v1/chat/sessions/{source['id']}/fork",
                          json={"up_to_seq": up_to_seq}, headers=alice.headers)
    assert r.status_code == 400
    assert r.json() == bad(f"up_to_seq {up_to_seq} is inside a tool exchange; fork before its "
                           "assistant message or after its last tool message", "up_to_seq")
    assert await db.fetchval("SELECT count(*) FROM chat_sessions WHERE user_id = $1",
                             alice.id) == 1


async def test_fork_with_a_new_name_and_bad_points(client, db, alice) -> None:
    source = await convo_session(client, db, alice, session_name="src")
    url = f"/chat/sessions/{source['id']}/fork"
    r = await client.post(url, json={"up_to_seq": 1, "session_name": "branch"},
                          headers=alice.headers)
    assert r.status_code == 201
    assert r.json()["session_name"] == "branch"
    for value in (0, -1, 8, 10**12):
        r = await client.post(url, json={"up_to_seq": value}, headers=alice.headers)
        assert r.status_code == 400, value
        assert r.json() == bad("up_to_seq must be between 1 and 7", "up_to_seq")
    r = await client.post(url, json={"up_to_seq": "3"}, headers=alice.headers)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "up_to_seq"
    r = await client.post(url, json={"upto": 3}, headers=alice.headers)
    assert r.json() == bad("Unknown parameter: upto", "upto", "unknown_parameter")


async def test_fork_of_an_empty_session(client, alice) -> None:
    source = await create(client, alice, session_name="empty")
    url = f"/v1/chat/sessions/{source['id']}/fork"
    r = await client.post(url, headers=alice.headers)
    assert r.status_code == 201
    assert (r.json()["session_name"], r.json()["message_count"]) == ("empty", 0)
    r = await client.post(url, json={"up_to_seq": 1}, headers=alice.headers)
    assert r.json() == bad("The session has no messages to fork at", "up_to_seq")


async def test_fork_at_a_pruned_seq_is_400(client, db, alice) -> None:
    source = await convo_session(client, db, alice)
    await db.execute("DELETE FROM chat_messages WHERE session_id = $1 AND seq = 1", source["id"])
    r = await client.post(f"/v1/chat/sessions/{source['id']}/fork", json={"up_to_seq": 1},
                          headers=alice.headers)
    assert r.json() == bad("up_to_seq 1 is not the seq of a stored message", "up_to_seq")


# --- merge ------------------------------------------------------------------------------------


def said(*texts: str) -> list[tuple[dict[str, Any], int, str]]:
    roles = ("user", "assistant")
    return [({"role": roles[i % 2], "content": t}, 10 + i, "complete")
            for i, t in enumerate(texts)]


async def test_merge_appends_the_source_in_order(client, db, alice) -> None:
    target = await create(client, alice, session_name="target")
    source = await create(client, alice, session_name="source")
    await seed(db, target["id"], said("t1", "t2"))
    await seed(db, source["id"], said("old"))
    await client.delete(f"/v1/chat/sessions/{source['id']}/messages", headers=alice.headers)
    await seed(db, source["id"], said("s1", "s2", "s3"))  # the source's seqs are now 2..4
    source_before = await bodies(db, source["id"])
    r = await client.post(f"/chat/sessions/{target['id']}/merge",
                          json={"source_session_id": source["id"]}, headers=alice.headers)
    assert r.status_code == 200, r.text
    merged = r.json()
    assert merged == {**target, "message_count": 5, "total_tokens": 10 + 11 + 10 + 11 + 12,
                      "last_message_at": merged["last_message_at"],
                      "updated_at": merged["updated_at"]}
    assert merged["last_message_at"] is not None
    assert await contents(client, alice, target["id"]) == [
        (1, "t1"), (2, "t2"), (3, "s1"), (4, "s2"), (5, "s3")]
    merged_rows = await bodies(db, target["id"])
    assert [r[1:] for r in merged_rows[2:]] == [r[1:] for r in source_before]
    # The source is soft-deleted, whole: restoring it brings its messages back.
    r = await client.get(f"/v1/chat/sessions/{source['id']}", headers=alice.headers)
    assert r.status_code == 404
    listed = (await client.get("/v1/chat/sessions?include_inactive=true",
                               headers=alice.headers)).json()["data"]
    assert {s["id"]: s["is_active"] for s in listed} == {target["id"]: True,
                                                        source["id"]: False}
    await client.post(f"/v1/chat/sessions/{source['id']}/restore", headers=alice.headers)
    assert await contents(client, alice, source["id"]) == [(2, "s1"), (3, "s2"), (4, "s3")]
    # The target's next turn continues the renumbered seqs.
    await seed(db, target["id"], said("next"))
    assert (await contents(client, alice, target["id"]))[-1] == (6, "next")


async def test_merge_refusals(client, db, alice) -> None:
    target = await create(client, alice)
    url = f"/v1/chat/sessions/{target['id']}/merge"
    r = await client.post(url, json={"source_session_id": target["id"]}, headers=alice.headers)
    assert r.status_code == 400
    assert r.json() == bad("A session cannot be merged into itself", "source_session_id")
    r = await client.post(url, json={}, headers=alice.headers)
    assert r.json() == bad("Missing required parameter: source_session_id",
                           "source_session_id", "missing_required_parameter")
    r = await client.post(url, json={"source_session_id": "sess_gone"}, headers=alice.headers)
    assert r.status_code == 404
    assert r.json() == not_found("sess_gone", "source_session_id")
    deleted = await create(client, alice)
    await client.delete(f"/v1/chat/sessions/{deleted['id']}", headers=alice.headers)
    r = await client.post(url, json={"source_session_id": deleted["id"]},
                          headers=alice.headers)
    assert r.json() == not_found(deleted["id"], "source_session_id")
    r = await client.post(f"/v1/chat/sessions/{deleted['id']}/merge",
                          json={"source_session_id": target["id"]}, headers=alice.headers)
    assert r.json() == not_found(deleted["id"])
    assert (await get(client, alice, target["id"]))["is_active"] is True


async def test_import_route_is_not_a_session_id(client, alice) -> None:
    r = await client.get("/v1/chat/sessions/import", headers=alice.headers)
    assert r.status_code == 405
    assert r.json() == bad("Method GET not allowed on /v1/chat/sessions/import", None,
                           "method_not_allowed")


# --- big sessions: set-based statements, streamed export --------------------------------------

BIG = 100_000


async def seed_big(db: asyncpg.Connection, session_id: str, count: int) -> None:
    await db.execute(
        """
        WITH ins AS (
            INSERT INTO chat_messages (session_id, seq, role, has_tool_calls, tokens, body,
                                       search)
            SELECT $1, g, CASE WHEN g % 2 = 1 THEN 'user' ELSE 'assistant' END, false, 3,
                   json_build_object('role', CASE WHEN g % 2 = 1 THEN 'user'
                                                  ELSE 'assistant' END,
                                     'content', 'm' || g)::text,
                   array_to_tsvector(ARRAY['m' || g])  -- the words proxy.searchtext gives
            FROM generate_series(1, $2::int) g
            RETURNING 1
        )
        UPDATE chat_sessions SET message_count = (SELECT count(*) FROM ins),
               total_tokens = 3 * $2::int, next_seq = $2::int + 1, last_message_at = now()
        WHERE id = $1
        """, session_id, count)


class Statements:
    """Counts the statements a connection runs."""

    def __init__(self, conn: asyncpg.Connection):
        self.count = 0
        conn.add_query_logger(self)

    def __call__(self, record: Any) -> None:
        self.count += 1


async def seqs(db: asyncpg.Connection, session_id: str) -> tuple[int, int, int, int]:
    row = await db.fetchrow("SELECT count(*), count(DISTINCT seq), min(seq), max(seq) "
                            "FROM chat_messages WHERE session_id = $1", session_id)
    return tuple(row)  # type: ignore[return-value]


async def test_big_session_operations_are_set_based(db, database_url, alice) -> None:
    conn = await codec_conn(await asyncpg.connect(database_url))
    try:
        big = await sessions.create_session(conn, alice.id, {"max_history_messages": 20})
        await seed_big(conn, big["id"], BIG)
        small = await sessions.create_session(conn, alice.id, {"max_history_messages": 20})
        await seed(conn, small["id"], said("a", "b"))
        counter = Statements(conn)

        fork = await lifecycle.fork_session(conn, alice.id, big["id"], None)
        assert (fork["message_count"], fork["total_tokens"]) == (BIG, 3 * BIG)
        assert await seqs(conn, fork["id"]) == (BIG, BIG, 1, BIG)
        forked_at = await lifecycle.fork_session(conn, alice.id, big["id"], BIG // 2)
        assert await seqs(conn, forked_at["id"]) == (BIG // 2, BIG // 2, 1, BIG // 2)

        merged = await lifecycle.merge_sessions(conn, alice.id, small["id"], fork["id"])
        assert merged["message_count"] == BIG + 2
        assert await seqs(conn, small["id"]) == (BIG + 2, BIG + 2, 1, BIG + 2)
        last = await conn.fetchval("SELECT body FROM chat_messages WHERE session_id = $1 "
                                   "AND seq = $2", small["id"], BIG + 2)
        assert codec.loads(last) == {"role": "assistant", "content": f"m{BIG}"}

        assert await lifecycle.clear_messages(conn, alice.id, small["id"]) is True
        assert await seqs(conn, small["id"]) == (0, 0, None, None)
        assert await sessions.soft_delete_session(conn, alice.id, big["id"]) is True
        # A handful of statements each, whatever the size: nothing loops over rows.
        assert counter.count <= 30
    finally:
        await conn.execute("DELETE FROM chat_sessions WHERE user_id = $1", alice.id)
        await conn.close()


async def test_export_streams_in_chunks(db, database_url, alice) -> None:
    conn = await codec_conn(await asyncpg.connect(database_url))
    try:
        session = await sessions.create_session(conn, alice.id, {"max_history_messages": 20})
        count = 20_000
        await seed_big(conn, session["id"], count)
        sizes = []
        parts = []
        async for chunk in lifecycle.export_document(conn, session["id"], user_id=alice.id):
            sizes.append(len(chunk))
            parts.append(chunk)
        assert len(sizes) > 10
        assert max(sizes) < lifecycle.EXPORT_CHUNK + 1000
        doc = codec.loads(b"".join(parts))
        assert doc["format"] == F
        assert [m["seq"] for m in doc["messages"]] == list(range(1, count + 1))
        assert doc["messages"][-1]["content"] == f"m{count}"
        assert conn.is_in_transaction() is False
    finally:
        await conn.execute("DELETE FROM chat_sessions WHERE user_id = $1", alice.id)
        await conn.close()


async def test_a_fork_name_with_a_lone_surrogate_comes_back_exactly(client, alice) -> None:
    sid = (await client.post("/v1/chat/sessions", json={}, headers=alice.headers)).json()["id"]
    name = "branch \ud800 \x00 end"
    r = await client.post(
        f"/v1/chat/sessions/{sid}/fork",
        content=json.dumps({"session_name": name}),
        headers={**alice.headers, "content-type": "application/json"},
    )
    assert r.status_code == 201, r.text
    assert json.loads(r.content)["session_name"] == name
