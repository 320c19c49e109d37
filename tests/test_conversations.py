"""The Conversations API (contract §10): a conversation is a session, its items its messages."""

from __future__ import annotations

from typing import Any

import asyncpg
import respx
from openai.types.conversations import Conversation, ConversationItemList

from tests.conftest import User
from tests.turns import Client, answers, completion, sent, stored, u

WEATHER = {"id": "call_w", "type": "function",
           "function": {"name": "weather", "arguments": '{"city":"Oslo"}'}}
TIME = {"id": "call_t", "type": "function", "function": {"name": "time", "arguments": "{}"}}


def user_item(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


async def new_conversation(client: Client, user: User, **body: Any) -> str:
    r = await client.post("/v1/conversations", json=body, headers=user.headers)
    assert r.status_code == 200, r.text
    cid: str = r.json()["id"]
    return cid


async def items(client: Client, user: User, cid: str, **params: Any) -> dict[str, Any]:
    r = await client.get(f"/v1/conversations/{cid}/items", params=params, headers=user.headers)
    assert r.status_code == 200, r.text
    page: dict[str, Any] = r.json()
    return page


async def test_a_conversation_is_a_session(client: Client, alice: User) -> None:
    r = await client.post("/v1/conversations", headers=alice.headers, json={
        "items": [user_item("hello"), {"role": "assistant", "content": "hi!"}],
        "metadata": {"topic": "greetings"}})
    assert r.status_code == 200, r.text
    made = r.json()
    Conversation.model_validate(made)
    assert (made["object"], made["metadata"]) == ("conversation", {"topic": "greetings"})
    cid = made["id"]
    assert cid.startswith("sess_") and isinstance(made["created_at"], int)
    session = await client.get(f"/v1/chat/sessions/{cid}", headers=alice.headers)
    assert (session.json()["message_count"], session.json()["metadata"]) == (
        2, {"topic": "greetings"})
    assert [(m["role"], m["content"]) for m in await stored(client, alice, cid)] == [
        ("user", "hello"), ("assistant", "hi!")]
    assert (await client.get(f"/v1/conversations/{cid}", headers=alice.headers)).json() == made

    updated = await client.post(f"/v1/conversations/{cid}", headers=alice.headers,
                                json={"metadata": {"topic": "farewells"}})
    assert updated.json() == {**made, "metadata": {"topic": "farewells"}}

    gone = await client.delete(f"/v1/conversations/{cid}", headers=alice.headers)
    assert gone.json() == {"id": cid, "object": "conversation.deleted", "deleted": True}
    assert (await client.get(f"/v1/conversations/{cid}", headers=alice.headers)).status_code == 404
    restored = await client.post(f"/v1/chat/sessions/{cid}/restore", headers=alice.headers)
    assert restored.status_code == 200
    assert (await client.get(f"/v1/conversations/{cid}", headers=alice.headers)).status_code == 200


async def test_items_are_the_stored_messages_with_stable_ids_and_pages(
    client: Client, alice: User, db: asyncpg.Connection
) -> None:
    cid = await new_conversation(client, alice, items=[
        user_item("weather and time?"),
        {"type": "message", "role": "assistant", "content": [
            {"type": "output_text", "text": "Let me look.", "annotations": []}]},
        {"type": "function_call", "call_id": "call_w", "name": "weather",
         "arguments": '{"city":"Oslo"}'},
        {"type": "function_call", "call_id": "call_t", "name": "time", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_w", "output": "rain"},
        {"type": "function_call_output", "call_id": "call_t", "output": "noon"},
    ])
    assert [(m["role"], m.get("tool_calls"), m.get("tool_call_id"), m["content"])
            for m in await stored(client, alice, cid)] == [
        ("user", None, None, "weather and time?"),
        ("assistant", [WEATHER, TIME], None, "Let me look."),
        ("tool", None, "call_w", "rain"), ("tool", None, "call_t", "noon")]
    rows = [r["id"] for r in await db.fetch(
        "SELECT id FROM chat_messages WHERE session_id = $1 ORDER BY seq", cid)]
    asc = await items(client, alice, cid, order="asc")
    ConversationItemList.model_validate(asc)
    assert [(i["id"], i["type"]) for i in asc["data"]] == [
        (f"msg_{rows[0]}", "message"), (f"msg_{rows[1]}", "message"),
        (f"fc_{rows[1]}_0", "function_call"), (f"fc_{rows[1]}_1", "function_call"),
        (f"msg_{rows[2]}", "function_call_output"), (f"msg_{rows[3]}", "function_call_output")]
    assert asc["data"][2] == {"id": f"fc_{rows[1]}_0", "type": "function_call",
                              "status": "completed", "call_id": "call_w", "name": "weather",
                              "arguments": '{"city":"Oslo"}'}
    assert asc["data"][4] == {"id": f"msg_{rows[2]}", "type": "function_call_output",
                              "status": "completed", "call_id": "call_w", "output": "rain"}
    newest_first = await items(client, alice, cid)
    assert newest_first["data"] == asc["data"][::-1]
    assert (await items(client, alice, cid, order="asc")) == asc  # the same ids on every read

    walked, after = [], None
    while True:
        page = await items(client, alice, cid, limit=2, **({"after": after} if after else {}))
        walked += page["data"]
        assert page["first_id"] == page["data"][0]["id"]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert walked == newest_first["data"]

    one = await client.get(f"/v1/conversations/{cid}/items/fc_{rows[1]}_1", headers=alice.headers)
    assert one.json() == asc["data"][3]
    missing = await client.get(f"/v1/conversations/{cid}/items/fc_{rows[1]}_2",
                               headers=alice.headers)
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "item_id"


async def test_added_items_are_one_turn_and_come_back_with_their_ids(
    client: Client, alice: User
) -> None:
    cid = await new_conversation(client, alice)
    r = await client.post(f"/v1/conversations/{cid}/items", headers=alice.headers,
                          json={"items": [user_item("one"), user_item("two")]})
    assert r.status_code == 200, r.text
    created = r.json()
    ConversationItemList.model_validate(created)
    assert created["data"] == (await items(client, alice, cid, order="asc"))["data"]
    assert [m["seq"] for m in await stored(client, alice, cid)] == [1, 2]


async def test_an_item_that_is_not_an_object_is_named_as_other_list_elements_are(
    client: Client, alice: User
) -> None:
    """`items[1]`, as `messages[0]` and `input[0]` are named elsewhere (not pydantic's
    `items.1`); and nothing is stored."""
    cid = await new_conversation(client, alice)
    for path in ("/v1/conversations", f"/v1/conversations/{cid}/items"):
        r = await client.post(path, headers=alice.headers,
                              json={"items": [user_item("kept?"), None]})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "items[1]", (path, r.text)
        assert r.json()["error"]["message"].startswith("Invalid value for items[1]: ")
    assert await stored(client, alice, cid) == []


async def test_deleting_an_item_keeps_tool_exchanges_whole(
    client: Client, alice: User, db: asyncpg.Connection
) -> None:
    cid = await new_conversation(client, alice, items=[
        user_item("q"),
        {"role": "assistant", "content": "Looking."},
        {"type": "function_call", "call_id": "call_w", "name": "weather",
         "arguments": '{"city":"Oslo"}'},
        {"type": "function_call", "call_id": "call_t", "name": "time", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_w", "output": "rain"},
        {"type": "function_call_output", "call_id": "call_t", "output": "noon"},
    ])
    rows = [r["id"] for r in await db.fetch(
        "SELECT id FROM chat_messages WHERE session_id = $1 ORDER BY seq", cid)]
    # a call's output goes with it
    r = await client.delete(f"/v1/conversations/{cid}/items/msg_{rows[2]}", headers=alice.headers)
    assert r.status_code == 200 and r.json()["id"] == cid
    assert [(m["role"], m.get("tool_calls"), m["content"])
            for m in await stored(client, alice, cid)] == [
        ("user", None, "q"), ("assistant", [TIME], "Looking."), ("tool", None, "noon")]
    # the assistant's text goes, its call stays
    await client.delete(f"/v1/conversations/{cid}/items/msg_{rows[1]}", headers=alice.headers)
    # and the call's answer goes with the call, and the empty assistant message with them
    await client.delete(f"/v1/conversations/{cid}/items/fc_{rows[1]}_0", headers=alice.headers)
    assert [(m["role"], m["content"]) for m in await stored(client, alice, cid)] == [("user", "q")]
    session = (await client.get(f"/v1/chat/sessions/{cid}", headers=alice.headers)).json()
    assert session["message_count"] == 1
    assert session["total_tokens"] == (await stored(client, alice, cid))[0]["tokens"]


async def test_a_response_in_a_conversation_is_a_turn_of_its_session(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    route = upstream.post("/chat/completions").mock(side_effect=answers(
        completion("Nice to meet you, Ada."), completion("You are Ada.")))
    cid = await new_conversation(client, alice, items=[user_item("I am Ada.")])
    r = await client.post("/v1/responses", headers=alice.headers, json={
        "model": "gpt-4o", "conversation": cid, "input": "Hello"})
    assert r.status_code == 200, r.text
    assert r.json()["conversation"] == {"id": cid}
    assert sent(route)["messages"] == [u("I am Ada."), u("Hello")]
    # continued through chat completions, with the same session
    chat = await client.post("/v1/chat/completions", headers=alice.headers, json={
        "model": "gpt-4o", "session_id": cid, "messages": [u("Who am I?")]})
    assert chat.status_code == 200
    assert [m["content"] for m in sent(route)["messages"]] == [
        "I am Ada.", "Hello", "Nice to meet you, Ada.", "Who am I?"]
    listed = await items(client, alice, cid, order="asc")
    assert [i["content"][0]["text"] for i in listed["data"]] == [
        "I am Ada.", "Hello", "Nice to meet you, Ada.", "Who am I?", "You are Ada."]
    assert [i["role"] for i in listed["data"]] == [
        "user", "user", "assistant", "user", "assistant"]


async def test_a_response_that_resends_the_conversations_newest_items_stores_them_once(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    route = upstream.post("/chat/completions").mock(side_effect=answers(
        completion("first answer"), completion("second answer")))
    cid = await new_conversation(client, alice)
    await client.post("/v1/responses", headers=alice.headers, json={
        "model": "gpt-4o", "conversation": cid, "input": "first"})
    # a client that keeps its own history sends it all again, with the new message
    r = await client.post("/v1/responses", headers=alice.headers, json={
        "model": "gpt-4o", "conversation": cid, "input": [
            user_item("first"),
            {"type": "message", "role": "assistant",
             "content": [{"type": "output_text", "text": "first answer", "annotations": []}]},
            user_item("second")]})
    assert r.status_code == 200, r.text
    assert [m["content"] for m in sent(route)["messages"]] == [
        "first", "first answer", "second"]  # each message once
    assert [m["content"] for m in await stored(client, alice, cid)] == [
        "first", "first answer", "second", "second answer"]
    inputs = await client.get(f"/v1/responses/{r.json()['id']}/input_items",
                              headers=alice.headers)
    assert [i["content"][0]["text"] for i in inputs.json()["data"]] == ["second"]
