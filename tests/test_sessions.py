"""The sessions API (contract §5, first table) under both prefixes, with isolation between users."""

from __future__ import annotations

import json
import re
from typing import Any

import asyncpg
import pytest
from litestar.testing import AsyncTestClient

from proxy.app import create_app
from proxy.store import messages
from proxy.store.messages import NewMessage
from tests.conftest import User, configured

PREFIXES = ["/v1/chat/sessions", "/chat/sessions"]
ISO_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
SESSION_KEYS = {
    "id", "object", "session_id", "session_name", "model", "system_prompt",
    "max_history_messages", "max_history_tokens", "metadata", "message_count", "total_tokens",
    "is_active", "created_at", "updated_at", "last_message_at", "summary",
}


@pytest.fixture(params=PREFIXES, ids=["v1", "bare"])
def prefix(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def bad(message: str, param: str | None, code: str = "invalid_value") -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param,
                      "code": code}}


def not_found(session_id: str) -> dict[str, Any]:
    return {"error": {"message": f"Session {session_id} not found",
                      "type": "invalid_request_error", "param": "session_id",
                      "code": "session_not_found"}}


def raw_json(body: Any, user: User) -> dict[str, Any]:
    """`content=` and headers for a body httpx could not encode (lone surrogates)."""
    return {"content": json.dumps(body).encode(),
            "headers": {**user.headers, "Content-Type": "application/json"}}


async def create(client: AsyncTestClient[Any], user: User, prefix: str = PREFIXES[0],
                 **fields: Any) -> dict[str, Any]:
    r = await client.post(prefix, json=fields, headers=user.headers)
    assert r.status_code == 201, r.text
    session: dict[str, Any] = r.json()
    return session


async def add_messages(db: asyncpg.Connection, session_id: str, count: int, start: int = 0):
    turn = [NewMessage({"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"},
                       tokens=i + 1) for i in range(start, start + count)]
    assert await messages.store_turn(db, session_id, turn) == count


# --- create and get ----------------------------------------------------------------------------


async def test_create_with_defaults(client, alice: User, prefix: str) -> None:
    r = await client.post(prefix, headers=alice.headers)  # no body at all
    assert r.status_code == 201, r.text
    session = r.json()
    assert set(session) == SESSION_KEYS
    assert re.fullmatch(r"sess_[A-Za-z0-9]{24}", session["id"])
    assert session == {
        "id": session["id"], "object": "chat.session", "session_id": session["id"],
        "session_name": None, "model": None, "system_prompt": None,
        "max_history_messages": 20, "max_history_tokens": None, "metadata": {},
        "message_count": 0, "total_tokens": 0, "is_active": True,
        "created_at": session["created_at"], "updated_at": session["updated_at"],
        "last_message_at": None, "summary": None,
    }
    assert ISO_RE.match(session["created_at"])
    assert ISO_RE.match(session["updated_at"])
    got = await client.get(f"{prefix}/{session['id']}", headers=alice.headers)
    assert (got.status_code, got.json()) == (200, session)


async def test_create_with_every_field(client, alice: User, prefix: str) -> None:
    fields = {"session_name": "Project Discussion", "model": "gpt-4o",
              "system_prompt": "You are terse.", "max_history_messages": 0,
              "max_history_tokens": 5000, "metadata": {"team": "infra", "ticket": "42"}}
    session = await create(client, alice, prefix, **fields)
    assert {k: session[k] for k in fields} == fields
    got = (await client.get(f"{prefix}/{session['id']}", headers=alice.headers)).json()
    assert got == session


async def test_the_default_history_length_comes_from_settings(settings, alice: User) -> None:
    app = create_app(configured(settings, default_max_history_messages=7))
    async with AsyncTestClient(app=app) as client:
        assert (await create(client, alice))["max_history_messages"] == 7
        assert (await create(client, alice, max_history_messages=3))["max_history_messages"] == 3


async def test_text_postgresql_cannot_keep_comes_back_exactly(client, alice: User, prefix):
    fields = {"session_name": "nul\u0000name", "system_prompt": "lone \ud800 surrogate",
              "model": "\u0001starts-with-the-marker",
              "metadata": {"k\u0000": "v\udfff", "plain": "\u0001x"}}
    r = await client.post(prefix, **raw_json(fields, alice))
    assert r.status_code == 201, r.text
    session = json.loads(r.content)
    assert {k: session[k] for k in fields} == fields
    got = await client.get(f"{prefix}/{session['id']}", headers=alice.headers)
    assert json.loads(got.content) == session
    listed = await client.get(prefix, headers=alice.headers, params={"limit": 100})
    assert session in json.loads(listed.content)["data"]


# --- validation --------------------------------------------------------------------------------

BAD_FIELDS = [
    ({"user_id": "user_x"}, bad("Unknown parameter: user_id", "user_id", "unknown_parameter")),
    ({"id": "sess_x"}, bad("Unknown parameter: id", "id", "unknown_parameter")),
    ({"message_count": 3}, bad("Unknown parameter: message_count", "message_count",
                               "unknown_parameter")),
    ({"is_active": False}, bad("Unknown parameter: is_active", "is_active", "unknown_parameter")),
    ({"max_history_messages": -1}, bad(
        "Invalid value for max_history_messages: Input should be greater than or equal to 0",
        "max_history_messages")),
    ({"max_history_messages": 1001}, bad(
        "Invalid value for max_history_messages: Input should be less than or equal to 1000",
        "max_history_messages")),
    ({"max_history_messages": "5"}, bad(
        "Invalid value for max_history_messages: Input should be a valid integer",
        "max_history_messages")),
    ({"max_history_messages": 2.5}, bad(
        "Invalid value for max_history_messages: Input should be a valid integer",
        "max_history_messages")),
    ({"max_history_messages": True}, bad(
        "Invalid value for max_history_messages: Input should be a valid integer",
        "max_history_messages")),
    ({"max_history_messages": None}, bad(
        "Invalid value for max_history_messages: Input should be a valid integer",
        "max_history_messages")),
    ({"max_history_tokens": -5}, bad(
        "Invalid value for max_history_tokens: Input should be greater than or equal to 0",
        "max_history_tokens")),
    ({"session_name": 7}, bad("Invalid value for session_name: Input should be a valid string",
                              "session_name")),
    ({"session_name": "x" * 1001}, bad(
        "Invalid value for session_name: String should have at most 1000 characters",
        "session_name")),
    ({"model": "m" * 201}, bad("Invalid value for model: String should have at most 200 "
                               "characters", "model")),
    ({"model": ["gpt-4o"]}, bad("Invalid value for model: Input should be a valid string",
                                "model")),
    ({"metadata": {"a": 1}}, bad("Invalid value for metadata.a: Input should be a valid string",
                                 "metadata.a")),
    ({"metadata": {"a": None}}, bad(
        "Invalid value for metadata.a: Input should be a valid string", "metadata.a")),
    ({"metadata": ["a"]}, bad("Invalid value for metadata: Input should be a valid dictionary",
                              "metadata")),
    ({"metadata": None}, bad("Invalid value for metadata: Input should be a valid dictionary",
                             "metadata")),
    ({"metadata": {str(i): "v" for i in range(65)}}, bad(
        "Invalid value for metadata: Dictionary should have at most 64 items after validation, "
        "not more", "metadata")),
]


async def test_create_refuses_bad_fields(client, alice: User, prefix: str) -> None:
    for body, expected in BAD_FIELDS:
        r = await client.post(prefix, json=body, headers=alice.headers)
        assert (r.status_code, r.json()) == (400, expected), body
    assert (await client.get(prefix, headers=alice.headers)).json()["total"] == 0


async def test_update_refuses_bad_fields(client, alice: User, prefix: str) -> None:
    session = await create(client, alice, prefix, session_name="keep")
    for method in ("PUT", "PATCH"):
        for body, expected in BAD_FIELDS:
            r = await client.request(method, f"{prefix}/{session['id']}", json=body,
                                     headers=alice.headers)
            assert (r.status_code, r.json()) == (400, expected), (method, body)
    got = (await client.get(f"{prefix}/{session['id']}", headers=alice.headers)).json()
    assert got == session


NOT_OBJECTS = [
    (b"{", bad("The request body is not valid JSON", None, "invalid_json")),
    (b'{"session_name": "x",}', bad("The request body is not valid JSON", None, "invalid_json")),
    (b"[]", bad("The request body must be a JSON object", None)),
    (b"null", bad("The request body must be a JSON object", None)),
    (b'"text"', bad("The request body must be a JSON object", None)),
]


async def test_bodies_that_are_not_objects(client, alice: User, prefix: str) -> None:
    headers = {**alice.headers, "Content-Type": "application/json"}
    session = await create(client, alice, prefix)
    for content, expected in NOT_OBJECTS:
        for method, path in (("POST", prefix), ("PUT", f"{prefix}/{session['id']}"),
                             ("PATCH", f"{prefix}/{session['id']}")):
            r = await client.request(method, path, content=content, headers=headers)
            assert (r.status_code, r.json()) == (400, expected), (method, content)


# --- list ---------------------------------------------------------------------------------------


async def test_list_most_recent_activity_first_with_pages(
    client, db: asyncpg.Connection, alice: User, bob: User, prefix: str
) -> None:
    made = [await create(client, alice, prefix, session_name=f"s{i}") for i in range(5)]
    await create(client, bob, prefix)  # never in alice's list
    # A turn on the oldest session makes it the most recently active.
    await add_messages(db, made[0]["id"], 2)
    expected_order = [made[0]["id"], made[4]["id"], made[3]["id"], made[2]["id"], made[1]["id"]]

    r = await client.get(prefix, headers=alice.headers)
    assert r.status_code == 200
    page = r.json()
    assert [s["id"] for s in page["data"]] == expected_order
    assert {k: v for k, v in page.items() if k != "data"} == {
        "object": "list", "total": 5, "limit": 20, "offset": 0, "has_more": False,
        "next_cursor": None}
    first = page["data"][0]
    assert (first["message_count"], first["total_tokens"]) == (2, 3)
    assert ISO_RE.match(first["last_message_at"])

    pages = []
    for offset in (0, 2, 4, 5, 9):
        r = await client.get(prefix, headers=alice.headers, params={"limit": 2, "offset": offset})
        body = r.json()
        pages.append(([s["id"] for s in body["data"]], body["has_more"], body["total"],
                      body["limit"], body["offset"]))
    assert pages == [
        (expected_order[0:2], True, 5, 2, 0),
        (expected_order[2:4], True, 5, 2, 2),
        (expected_order[4:5], False, 5, 2, 4),
        ([], False, 5, 2, 5),
        ([], False, 5, 2, 9),
    ]
    exact = (await client.get(prefix, headers=alice.headers, params={"limit": 5})).json()
    assert (len(exact["data"]), exact["has_more"]) == (5, False)
    short = (await client.get(prefix, headers=alice.headers, params={"limit": 4})).json()
    assert (len(short["data"]), short["has_more"]) == (4, True)
    assert (await client.get(prefix, headers=alice.headers,
                             params={"limit": 100})).json()["limit"] == 100


async def test_list_is_empty_for_a_new_user(client, bob: User, prefix: str) -> None:
    r = await client.get(prefix, headers=bob.headers)
    assert r.json() == {"object": "list", "data": [], "total": 0, "limit": 20, "offset": 0,
                        "has_more": False, "next_cursor": None}


LIST_PAGING = [
        ({"limit": "0"}, bad("limit must be between 1 and 100", "limit")),
        ({"limit": "101"}, bad("limit must be between 1 and 100", "limit")),
        ({"limit": "-1"}, bad("limit must be between 1 and 100", "limit")),
        ({"limit": "abc"}, bad("limit must be an integer", "limit")),
        ({"limit": ""}, bad("limit must be an integer", "limit")),
        ({"limit": "2.0"}, bad("limit must be an integer", "limit")),
        ({"offset": "-1"}, bad("offset must be between 0 and 2147483647", "offset")),
        ({"offset": "x"}, bad("offset must be an integer", "offset")),
        ({"offset": str(10**30)}, bad("offset must be between 0 and 2147483647", "offset")),
]


async def test_list_refuses_bad_paging(client, alice: User, prefix: str) -> None:
    for query, expected in LIST_PAGING:
        r = await client.get(prefix, headers=alice.headers, params=query)
        assert (r.status_code, r.json()) == (400, expected), query


# --- update -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
async def test_update_sets_only_the_given_fields(client, alice: User, prefix, method) -> None:
    session = await create(client, alice, prefix, session_name="old", model="gpt-4o",
                           metadata={"a": "1"})
    path = f"{prefix}/{session['id']}"
    r = await client.request(method, path, headers=alice.headers, json={
        "session_name": "new", "system_prompt": "be kind", "max_history_messages": 5,
        "metadata": {"b": "2"}})
    assert r.status_code == 200, r.text
    updated = r.json()
    assert updated == {**session, "session_name": "new", "system_prompt": "be kind",
                       "max_history_messages": 5, "metadata": {"b": "2"},
                       "updated_at": updated["updated_at"]}
    assert updated["updated_at"] >= session["updated_at"]
    # null clears a nullable field; an empty object leaves everything alone.
    cleared = await client.request(method, path, headers=alice.headers,
                                   json={"session_name": None, "max_history_tokens": None})
    assert cleared.json() == {**updated, "session_name": None,
                              "updated_at": cleared.json()["updated_at"]}
    for kwargs in ({"json": {}}, {}):
        same = await client.request(method, path, headers=alice.headers, **kwargs)
        assert same.status_code == 200, same.text
        assert same.json() == {**cleared.json(), "updated_at": same.json()["updated_at"]}
    got = (await client.get(path, headers=alice.headers)).json()
    assert got["session_name"] is None and got["model"] == "gpt-4o"


async def test_a_user_id_in_the_body_never_moves_a_session(
    client, db: asyncpg.Connection, alice: User, bob: User, prefix: str
) -> None:
    session = await create(client, alice, prefix)
    path = f"{prefix}/{session['id']}"
    for method in ("PUT", "PATCH"):
        for field in ("user_id", "owner", "owner_id"):
            r = await client.request(method, path, headers=alice.headers,
                                     json={field: bob.id, "session_name": "moved?"})
            assert (r.status_code, r.json()) == (400, bad(
                f"Unknown parameter: {field}", field, "unknown_parameter"))
    r = await client.post(prefix, headers=alice.headers, json={"user_id": bob.id})
    assert r.status_code == 400
    owner = await db.fetchval("SELECT user_id FROM chat_sessions WHERE id = $1", session["id"])
    assert owner == alice.id
    assert (await client.get(path, headers=bob.headers)).status_code == 404
    assert (await client.get(path, headers=alice.headers)).json()["session_name"] is None
    assert (await client.get(prefix, headers=bob.headers)).json()["total"] == 0


# --- delete -------------------------------------------------------------------------------------


async def test_soft_delete_then_404_everywhere(
    client, db: asyncpg.Connection, alice: User, prefix: str
) -> None:
    keep = await create(client, alice, prefix)
    session = await create(client, alice, prefix)
    sid = session["id"]
    path = f"{prefix}/{sid}"
    r = await client.delete(path, headers=alice.headers)
    assert (r.status_code, r.content) == (204, b"")
    row = await db.fetchrow("SELECT is_active, deleted_at FROM chat_sessions WHERE id = $1", sid)
    assert row["is_active"] is False and row["deleted_at"] is not None
    for method, url in (("GET", path), ("PUT", path), ("PATCH", path), ("DELETE", path),
                        ("GET", f"{path}/messages")):
        r = await client.request(method, url, headers=alice.headers,
                                 json={} if method in ("PUT", "PATCH") else None)
        assert (r.status_code, r.json()) == (404, not_found(sid)), method
    listed = (await client.get(prefix, headers=alice.headers, params={"limit": 100})).json()
    ids = [s["id"] for s in listed["data"]]
    assert sid not in ids and keep["id"] in ids


# --- messages -----------------------------------------------------------------------------------


async def test_messages_pages_in_both_orders(
    client, db: asyncpg.Connection, alice: User, prefix: str
) -> None:
    session = await create(client, alice, prefix)
    sid = session["id"]
    path = f"{prefix}/{sid}/messages"
    empty = await client.get(path, headers=alice.headers)
    assert empty.json() == {"object": "list", "data": [], "total": 0, "limit": 50, "offset": 0,
                            "has_more": False}
    await add_messages(db, sid, 3)
    await add_messages(db, sid, 4, start=3)

    page = (await client.get(path, headers=alice.headers)).json()
    assert [m["content"] for m in page["data"]] == [f"m{i}" for i in range(7)]
    assert {k: v for k, v in page.items() if k != "data"} == {
        "object": "list", "total": 7, "limit": 50, "offset": 0, "has_more": False}
    first = page["data"][0]
    assert first == {"id": first["id"], "object": "chat.message", "session_id": sid, "seq": 1,
                     "role": "user", "content": "m0", "tokens": 1, "status": "complete",
                     "created_at": first["created_at"]}
    assert re.fullmatch(r"msg_\d+", first["id"]) and ISO_RE.match(first["created_at"])
    assert [m["seq"] for m in page["data"]] == [1, 2, 3, 4, 5, 6, 7]

    async def seqs(**query: Any) -> tuple[list[int], bool, int]:
        body = (await client.get(path, headers=alice.headers, params=query)).json()
        return [m["seq"] for m in body["data"]], body["has_more"], body["total"]

    assert await seqs(limit=3) == ([1, 2, 3], True, 7)
    assert await seqs(limit=3, offset=3) == ([4, 5, 6], True, 7)
    assert await seqs(limit=3, offset=6) == ([7], False, 7)
    assert await seqs(limit=3, offset=4) == ([5, 6, 7], False, 7)
    assert await seqs(limit=7) == ([1, 2, 3, 4, 5, 6, 7], False, 7)
    assert await seqs(offset=7) == ([], False, 7)
    assert await seqs(offset=100) == ([], False, 7)
    assert await seqs(order="desc", limit=3) == ([7, 6, 5], True, 7)
    assert await seqs(order="desc", limit=3, offset=6) == ([1], False, 7)
    assert await seqs(order="asc", limit=500) == ([1, 2, 3, 4, 5, 6, 7], False, 7)
    got = (await client.get(f"{prefix}/{sid}", headers=alice.headers)).json()
    assert (got["message_count"], got["total_tokens"]) == (7, sum(range(1, 8)))
    assert ISO_RE.match(got["last_message_at"])


async def test_message_content_comes_back_exactly(
    client, db: asyncpg.Connection, alice: User, prefix: str
) -> None:
    sid = (await create(client, alice, prefix))["id"]
    parts = [{"type": "text", "text": "a\u0000b"}, {"type": "text", "text": "\ud83d"}]
    calls = [{"id": "c1", "type": "function",
              "function": {"name": "f", "arguments": "{\"x\": \"\\u0000\"}"}}]
    turn = [NewMessage({"role": "user", "content": parts, "name": "me"}, tokens=3),
            NewMessage({"role": "assistant", "content": None, "tool_calls": calls}, tokens=4),
            NewMessage({"role": "tool", "content": "r\udc00", "tool_call_id": "c1"}, tokens=5,
                       status="incomplete")]
    await messages.store_turn(db, sid, turn)
    r = await client.get(f"{prefix}/{sid}/messages", headers=alice.headers)
    data = json.loads(r.content)["data"]
    assert [{k: v for k, v in m.items() if k not in ("id", "created_at")} for m in data] == [
        {"object": "chat.message", "session_id": sid, "seq": 1, "role": "user", "content": parts,
         "name": "me", "tokens": 3, "status": "complete"},
        {"object": "chat.message", "session_id": sid, "seq": 2, "role": "assistant",
         "content": None, "tool_calls": calls, "tokens": 4, "status": "complete"},
        {"object": "chat.message", "session_id": sid, "seq": 3, "role": "tool",
         "content": "r\udc00", "tool_call_id": "c1", "tokens": 5, "status": "incomplete"},
    ]


MESSAGE_PAGING = [
        ({"limit": "0"}, bad("limit must be between 1 and 500", "limit")),
        ({"limit": "501"}, bad("limit must be between 1 and 500", "limit")),
        ({"limit": "abc"}, bad("limit must be an integer", "limit")),
        ({"offset": "-1"}, bad("offset must be between 0 and 2147483647", "offset")),
        ({"offset": "1e3"}, bad("offset must be an integer", "offset")),
        ({"order": "up"}, bad("order must be asc or desc", "order")),
        ({"order": ""}, bad("order must be asc or desc", "order")),
        ({"order": "DESC"}, bad("order must be asc or desc", "order")),
]


async def test_messages_refuse_bad_paging(client, alice: User, prefix: str) -> None:
    sid = (await create(client, alice, prefix))["id"]
    for query, expected in MESSAGE_PAGING:
        r = await client.get(f"{prefix}/{sid}/messages", headers=alice.headers, params=query)
        assert (r.status_code, r.json()) == (400, expected), query


# --- isolation ----------------------------------------------------------------------------------


async def test_another_users_session_is_exactly_a_missing_one(
    client, db: asyncpg.Connection, alice: User, bob: User, prefix: str
) -> None:
    session = await create(client, alice, prefix, session_name="private")
    sid = session["id"]
    await add_messages(db, sid, 2)
    missing = "sess_" + "Z" * 24

    async def answers(session_id: str) -> list[tuple[int, Any]]:
        path = f"{prefix}/{session_id}"
        result = []
        for method, url, body in (("GET", path, None), ("PUT", path, {"session_name": "x"}),
                                  ("PATCH", path, {"session_name": "x"}),
                                  ("GET", f"{path}/messages", None), ("DELETE", path, None)):
            r = await client.request(method, url, headers=bob.headers, json=body)
            result.append((r.status_code, r.headers.get("content-type"), r.json()))
        return result

    foreign, absent = await answers(sid), await answers(missing)
    assert foreign == [(404, "application/json", not_found(sid))] * 5
    assert absent == [(404, "application/json", not_found(missing))] * 5
    # Nothing bob did touched alice's session.
    got = (await client.get(f"{prefix}/{sid}", headers=alice.headers)).json()
    assert got == {**session, "message_count": 2, "total_tokens": 3,
                   "last_message_at": got["last_message_at"], "updated_at": got["updated_at"]}
    assert got["session_name"] == "private"
    assert (await client.get(prefix, headers=bob.headers)).json()["total"] == 0


async def test_a_malformed_session_id_is_not_echoed(client, alice: User, prefix: str) -> None:
    r = await client.get(f"{prefix}/<script>", headers=alice.headers)
    assert (r.status_code, r.json()) == (404, {"error": {
        "message": "Session (malformed id) not found", "type": "invalid_request_error",
        "param": "session_id", "code": "session_not_found"}})
