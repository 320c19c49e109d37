"""Who may touch what on the Responses and Conversations routes, and bad input.

Every new route walked with two users: another user's conversation, item or response answers
exactly as a missing one (404), is never changed and never shown. Bad input is a 400 naming its
field, and stores nothing.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import httpx
import pytest
import respx

from tests.conftest import User
from tests.turns import Client, completion

SECRET = "alice-secret-91c"


async def counts(db: asyncpg.Connection, user: User) -> tuple[int, int, int]:
    row = await db.fetchrow(
        """
        SELECT (SELECT count(*) FROM chat_sessions WHERE user_id = $1) AS sessions,
               (SELECT count(*) FROM chat_messages m JOIN chat_sessions s ON s.id = m.session_id
                WHERE s.user_id = $1) AS messages,
               (SELECT count(*) FROM responses WHERE user_id = $1) AS responses
        """, user.id)
    return row["sessions"], row["messages"], row["responses"]


async def test_another_users_conversations_items_and_responses_are_404_everywhere(
    client: Client, upstream: respx.Router, alice: User, bob: User, db: asyncpg.Connection
) -> None:
    route = upstream.post("/chat/completions").mock(
        return_value=httpx.Response(200, json=completion(SECRET)))
    made = await client.post("/v1/conversations", headers=alice.headers, json={
        "items": [{"role": "user", "content": SECRET}], "metadata": {"s": SECRET}})
    cid = made.json()["id"]
    response = await client.post("/v1/responses", headers=alice.headers, json={
        "model": "gpt-4o", "input": SECRET, "conversation": cid})
    rid = response.json()["id"]
    item = (await client.get(f"/v1/conversations/{cid}/items", headers=alice.headers)
            ).json()["data"][0]["id"]
    bobs = (await client.post("/v1/conversations", headers=bob.headers, json={})).json()["id"]
    before = await counts(db, alice)
    calls = route.call_count

    walk: list[tuple[str, str, Any, str]] = [
        ("GET", f"/v1/conversations/{cid}", None, "conversation_id"),
        ("POST", f"/v1/conversations/{cid}", {"metadata": {"x": "y"}}, "conversation_id"),
        ("DELETE", f"/v1/conversations/{cid}", None, "conversation_id"),
        ("GET", f"/v1/conversations/{cid}/items", None, "conversation_id"),
        ("POST", f"/v1/conversations/{cid}/items", {"items": [{"role": "user", "content": "x"}]},
         "conversation_id"),
        ("GET", f"/v1/conversations/{cid}/items/{item}", None, "conversation_id"),
        ("DELETE", f"/v1/conversations/{cid}/items/{item}", None, "conversation_id"),
        ("GET", f"/v1/conversations/{bobs}/items/{item}", None, "item_id"),
        ("DELETE", f"/v1/conversations/{bobs}/items/{item}", None, "item_id"),
        ("POST", "/v1/responses", {"model": "gpt-4o", "input": "x", "conversation": cid},
         "conversation"),
        ("POST", "/v1/responses", {"model": "gpt-4o", "input": "x", "previous_response_id": rid},
         "previous_response_id"),
        ("POST", "/v1/responses", {"model": "gpt-4o", "input": "x", "stream": True,
                                   "previous_response_id": rid}, "previous_response_id"),
        ("GET", f"/v1/responses/{rid}", None, "response_id"),
        ("GET", f"/v1/responses/{rid}/input_items", None, "response_id"),
        ("DELETE", f"/v1/responses/{rid}", None, "response_id"),
    ]
    for method, path, body, param in walk:
        for caller in (bob, None):
            headers = caller.headers if caller is not None else {}
            r = await client.request(method, path, json=body, headers=headers)
            if caller is None:
                assert r.status_code == 401, (method, path)
                continue
            assert r.status_code == 404, (method, path, r.text)
            assert r.json()["error"]["code"] == "not_found"
            assert r.json()["error"]["param"] == param, (method, path)
            assert SECRET not in r.text
            # the same answer as for an id that names nothing
            missing = path.replace(cid, "sess_nothing").replace(rid, "resp_nothing")
            twin = await client.request(method, missing, json=_retarget(body, cid, rid),
                                        headers=headers)
            assert (twin.status_code, twin.json()["error"]["code"]) == (404, "not_found")
    assert route.call_count == calls
    assert await counts(db, alice) == before
    assert (await client.get(f"/v1/conversations/{cid}", headers=alice.headers)).json() == (
        made.json())
    assert (await client.get(f"/v1/responses/{rid}", headers=alice.headers)).json() == (
        response.json())


def _retarget(body: Any, cid: str, rid: str) -> Any:
    if not isinstance(body, dict):
        return body
    return {k: ("sess_nothing" if v == cid else "resp_nothing" if v == rid else v)
            for k, v in body.items()}


TOO_MANY = [{"role": "user", "content": str(i)} for i in range(21)]


@pytest.mark.parametrize(("method", "path", "body", "param", "code"), [
    ("POST", "/v1/conversations", {"items": TOO_MANY}, "items", "invalid_value"),
    ("POST", "/v1/conversations", {"items": [{"type": "mystery"}]}, "items[0].type",
     "invalid_value"),
    ("POST", "/v1/conversations", {"items": "hello"}, "items", "invalid_value"),
    ("POST", "/v1/conversations", {"metadata": {str(i): "v" for i in range(17)}}, "metadata",
     "invalid_value"),
    ("POST", "/v1/conversations", {"colour": "red"}, "colour", "unknown_parameter"),
    ("POST", "CONVERSATION/items", {"items": TOO_MANY}, "items", "invalid_value"),
    ("POST", "CONVERSATION/items", {"items": [{"role": "user", "content": "ok"},
                                              {"type": "web_search_call"}]}, "items[1].type",
     "unsupported_value"),
    ("POST", "CONVERSATION/items", {}, "items", "missing_required_parameter"),
    ("POST", "CONVERSATION", {"metadata": {"k": 1}}, "metadata.k", "invalid_value"),
    ("GET", "CONVERSATION/items?after=msg_0", None, "after", "invalid_value"),
    ("GET", "CONVERSATION/items?limit=101", None, "limit", "invalid_value"),
    ("GET", "CONVERSATION/items?order=up", None, "order", "invalid_value"),
    ("POST", "/v1/responses", {"model": "gpt-4o", "input": "x", "conversation": "CID",
                               "previous_response_id": "resp_x"}, "previous_response_id",
     "invalid_value"),
    ("POST", "/v1/responses", {"model": "gpt-4o", "input": [{"type": "mystery"}],
                               "conversation": "CID"}, "input[0].type", "invalid_value"),
    ("POST", "/v1/responses", {"model": "gpt-4o", "input": 7, "conversation": "CID"}, "input",
     "invalid_value"),
    ("POST", "/v1/responses", {"model": "gpt-4o", "tools": [{"type": "web_search"}],
                               "conversation": "CID"}, "tools[0].type", "unsupported_value"),
    ("POST", "/v1/responses", {"model": "gpt-4o", "background": True, "conversation": "CID"},
     "background", "unsupported_value"),
])
async def test_bad_input_is_a_400_naming_the_field_and_stores_nothing(
    client: Client, upstream: respx.Router, alice: User, db: asyncpg.Connection,
    method: str, path: str, body: Any, param: str, code: str,
) -> None:
    route = upstream.post("/chat/completions").mock(
        return_value=httpx.Response(200, json=completion("x")))
    cid = (await client.post("/v1/conversations", headers=alice.headers, json={
        "items": [{"role": "user", "content": "first"}]})).json()["id"]
    before = await counts(db, alice)
    path = path.replace("CONVERSATION", f"/v1/conversations/{cid}")
    if isinstance(body, dict) and body.get("conversation") == "CID":
        body = {**body, "conversation": cid}
    r = await client.request(method, path, json=body, headers=alice.headers)
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["param"], r.json()["error"]["code"]) == (param, code)
    assert await counts(db, alice) == before
    assert route.call_count == 0
