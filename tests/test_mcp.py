"""The MCP session tools (contract §9) over `/mcp`, with the official `mcp` client against a live
`chatproxy serve`: each tool answers what the REST API answers for the same session."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from proxy import codec
from tests.conftest import User
from tests.fault_helpers import Serve
from tests.mcp_helpers import (
    TOOLS,
    conversation,
    fingerprint,
    live_server,
    ok,
    over_http,
    refused,
    rest_as,
)
from tests.test_lifecycle import codec_conn, seed

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def live(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    tmp = tmp_path_factory.mktemp("mcp")
    with live_server(database_url, "http://127.0.0.1:9/v1", tmp) as server:
        yield server


@pytest.fixture
async def rest(live: Serve, alice: User) -> AsyncIterator[httpx.AsyncClient]:
    """The REST API as alice, on the same server."""
    async with rest_as(live, alice) as client:
        yield client


async def rest_json(r: httpx.Response, status: int = 200) -> Any:
    assert r.status_code == status, r.text
    return codec.loads(r.content)


async def test_every_tool_is_listed_with_its_schemas_and_the_transcript_template(
    live: Serve, alice: User
) -> None:
    async with over_http(live.url, alice.key) as mcp:
        tools = {t.name: t for t in (await mcp.list_tools()).tools}
        templates = (await mcp.list_resource_templates()).resource_templates
    assert set(tools) == TOOLS
    for tool in tools.values():
        assert tool.input_schema["type"] == "object", tool.name
        assert tool.output_schema is not None and tool.output_schema["type"] == "object"
        assert len(tool.description or "") > 80, tool.name  # written for a model to read
        if "session_id" in tool.input_schema["properties"]:
            assert "sess_" in tool.input_schema["properties"]["session_id"]["description"]
    assert tools["list_sessions"].input_schema["properties"]["limit"] == {
        "default": 20, "description": "page size", "maximum": 100, "minimum": 1,
        "title": "Limit", "type": "integer"}
    assert set(tools["list_sessions"].output_schema["properties"]) == {
        "sessions", "total", "has_more"}
    assert [(t.uri_template, t.mime_type) for t in templates] == [
        ("chatproxy://sessions/{session_id}", "text/markdown")]


async def test_create_list_and_read_answer_what_the_rest_api_answers(
    live: Serve, alice: User, db: asyncpg.Connection, rest: httpx.AsyncClient
) -> None:
    async with over_http(live.url, alice.key) as mcp:
        created = await ok(mcp, "create_session", session_name="Plans", model="gpt-4o",
                           system_prompt="Be brief.", max_history_tokens=500,
                           metadata={"team": "infra"})
        sid = created["session"]["id"]
        assert created == {"session": await rest_json(await rest.get(
            f"/v1/chat/sessions/{sid}"))}
        assert created["session"]["max_history_messages"] == 20  # the configured default

        convo = await conversation(db, alice)
        listed = await ok(mcp, "list_sessions", limit=1)
        page = await rest_json(await rest.get("/v1/chat/sessions?limit=1"))
        assert listed == {"sessions": page["data"], "total": 2, "has_more": True}
        assert listed["sessions"][0]["id"] == convo  # most recent activity first
        second = await ok(mcp, "list_sessions", limit=1, offset=1)
        assert [s["id"] for s in second["sessions"]] == [sid] and not second["has_more"]

        for args, query in [({}, ""), ({"order": "desc", "limit": 3, "offset": 1},
                                       "?order=desc&limit=3&offset=1")]:
            read = await ok(mcp, "get_messages", session_id=convo, **args)
            page = await rest_json(await rest.get(f"/v1/chat/sessions/{convo}/messages{query}"))
            assert read == {"messages": page["data"], "total": 7,
                            "has_more": page["has_more"]}
        assert [m["seq"] for m in read["messages"]] == [6, 5, 4] and read["has_more"]


async def test_list_sessions_with_a_query_finds_the_callers_sessions_by_name_or_message(
    live: Serve, alice: User, bob: User, db: asyncpg.Connection, rest: httpx.AsyncClient
) -> None:
    named = await conversation(db, alice, session_name="Lisbon trip")
    plain = await conversation(db, alice)
    talked = await conversation(db, alice)
    await seed(await codec_conn(db), talked, [
        ({"role": "user", "content": "What do pelicans eat in Lisbon?"}, 9, "complete")])
    await conversation(db, bob, session_name="Lisbon pelicans")  # every CONVO says Paris too

    def ids(result: dict[str, Any]) -> list[str]:
        return [s["id"] for s in result["sessions"]]

    async with over_http(live.url, alice.key) as mcp:
        found = await ok(mcp, "list_sessions", query="LISBON")  # by message, and by name
        page = await rest_json(await rest.get("/v1/chat/sessions?q=LISBON"))
        assert found == {"sessions": page["data"], "total": 2, "has_more": False}
        assert ids(found) == [talked, named]  # most recent activity first
        assert ids(await ok(mcp, "list_sessions", query="pelic")) == [talked]  # a prefix
        assert ids(await ok(mcp, "list_sessions", query="trip lisbon")) == [named]  # every word
        assert ids(await ok(mcp, "list_sessions", query="lisbon giraffe")) == []
        # Only the caller's own: bob's sessions hold every one of these words too.
        everywhere = await ok(mcp, "list_sessions", query="weather paris", limit=2)
        assert (set(ids(everywhere)), everywhere["total"], everywhere["has_more"]) == (
            {talked, plain}, 3, True)
        assert ids(await ok(mcp, "list_sessions", query="paris", offset=2)) == [named]

        before = await fingerprint(db, alice)
        for query, message in [
            ("!!! ?", "query must contain at least one letter or digit"),
            (" ".join(f"w{i}" for i in range(33)), "query must have at most 32 words"),
            ("", "String should have at least 1 character"),
            ("x" * 1001, "String should have at most 1000 characters"),
            (7, "Input should be a valid string"),
        ]:
            text = await refused(mcp, "list_sessions", query=query)
            assert message in text and "query" in text, text
    assert await fingerprint(db, alice) == before


async def test_resume_restores_a_deleted_session_with_the_history_a_turn_would_get(
    live: Serve, alice: User, db: asyncpg.Connection, rest: httpx.AsyncClient
) -> None:
    sid = await conversation(db, alice, max_history_messages=5)
    assert (await rest.delete(f"/v1/chat/sessions/{sid}")).status_code == 204
    listed = (await rest_json(await rest.get(
        "/v1/chat/sessions?include_inactive=true&limit=100")))["data"]
    assert not next(s for s in listed if s["id"] == sid)["is_active"]
    async with over_http(live.url, alice.key) as mcp:
        resumed = await ok(mcp, "resume_session", session_id=sid)
        session = await rest_json(await rest.get(f"/v1/chat/sessions/{sid}"))
        assert session["is_active"] and resumed["session"] == session
        stored = (await rest_json(await rest.get(f"/v1/chat/sessions/{sid}/messages")))["data"]
        # The newest 5 are seqs 3-7; 3 and 4 answer an exchange whose head is past the edge.
        assert resumed["messages"] == stored[4:]

        # max_history_tokens: 4 + 7 fit in 11, the 9 before them does not.
        await rest.patch(f"/v1/chat/sessions/{sid}", json={"max_history_tokens": 11})
        assert [m["seq"] for m in (await ok(mcp, "resume_session", session_id=sid))[
            "messages"]] == [6, 7]
        # The whole window: the tool exchange comes whole.
        await rest.patch(f"/v1/chat/sessions/{sid}",
                         json={"max_history_tokens": None, "max_history_messages": 7})
        whole = await ok(mcp, "resume_session", session_id=sid)
        assert whole["messages"] == stored

        # The session model's budget: gpt-4's 8192-token window less its 4096 reserve.
        big = (await ok(mcp, "create_session", model="gpt-4"))["session"]["id"]
        await seed(await codec_conn(db), big, [
            ({"role": "user", "content": f"part {i}"}, 1500, "complete") for i in range(4)])
        fits = await ok(mcp, "resume_session", session_id=big)
        assert [m["content"] for m in fits["messages"]] == ["part 2", "part 3"]


async def test_export_import_fork_merge_clear_and_delete(
    live: Serve, alice: User, db: asyncpg.Connection, rest: httpx.AsyncClient
) -> None:
    sid = await conversation(db, alice, session_name="Trip")
    async with over_http(live.url, alice.key) as mcp:
        exported = await ok(mcp, "export_session", session_id=sid)
        assert exported == await rest_json(await rest.get(f"/v1/chat/sessions/{sid}/export"))
        assert exported["format"] == "chatproxy.session.v1" and len(exported["messages"]) == 7

        copy = (await ok(mcp, "import_session", document=exported))["session"]
        assert (copy["session_name"], copy["message_count"]) == ("Trip", 7)
        assert copy["id"] != sid
        copied = await ok(mcp, "export_session", session_id=copy["id"])
        strip = ("id", "session_id", "created_at")
        assert [{k: v for k, v in m.items() if k not in strip} for m in copied["messages"]] == [
            {k: v for k, v in m.items() if k not in strip} for m in exported["messages"]]

        fork = (await ok(mcp, "fork_session", session_id=sid, up_to_seq=5,
                         session_name="branch"))["session"]
        assert (fork["session_name"], fork["message_count"]) == ("branch", 5)
        unnamed = (await ok(mcp, "fork_session", session_id=sid))["session"]
        assert (unnamed["session_name"], unnamed["message_count"]) == ("Trip", 7)

        merged = (await ok(mcp, "merge_sessions", primary_id=fork["id"],
                           secondary_id=copy["id"]))["session"]
        assert (merged["id"], merged["message_count"]) == (fork["id"], 12)
        assert (await rest.get(f"/v1/chat/sessions/{copy['id']}")).status_code == 404

        assert await ok(mcp, "clear_session", session_id=fork["id"]) == {
            "session_id": fork["id"], "cleared": True}
        cleared = await rest_json(await rest.get(f"/v1/chat/sessions/{fork['id']}/messages"))
        assert (cleared["data"], cleared["total"]) == ([], 0)

        assert await ok(mcp, "delete_session", session_id=sid) == {
            "session_id": sid, "deleted": True}
        assert (await rest.get(f"/v1/chat/sessions/{sid}")).status_code == 404


async def test_cleanup_deletes_only_the_callers_old_sessions(
    live: Serve, alice: User, bob: User, db: asyncpg.Connection, rest: httpx.AsyncClient
) -> None:
    old, fresh, gone = [await conversation(db, alice) for _ in range(3)]
    theirs = await conversation(db, bob)
    assert (await rest.delete(f"/v1/chat/sessions/{gone}")).status_code == 204
    long_ago = datetime.now(UTC) - timedelta(days=3)
    await db.execute("UPDATE chat_sessions SET updated_at = $2 WHERE id = ANY($1::text[])",
                     [old, theirs], long_ago)
    await db.execute("UPDATE chat_sessions SET deleted_at = $2 WHERE id = $1", gone, long_ago)
    async with over_http(live.url, alice.key) as mcp:
        # The configured retention (7 days) keeps all of them.
        assert await ok(mcp, "cleanup_sessions") == {"deleted_sessions": 0,
                                                     "deleted_messages": 0}
        assert await ok(mcp, "cleanup_sessions", older_than="2d") == {
            "deleted_sessions": 2, "deleted_messages": 14}
    left = {r["id"] for r in await db.fetch(
        "SELECT id FROM chat_sessions WHERE id = ANY($1::text[])", [old, fresh, gone, theirs])}
    assert left == {fresh, theirs}
    assert await db.fetchval("SELECT count(*) FROM chat_messages WHERE session_id = ANY($1)",
                             [old, gone]) == 0


async def test_the_transcript_resource_is_markdown(
    live: Serve, alice: User, db: asyncpg.Connection
) -> None:
    sid = await conversation(db, alice, session_name="Trip", system_prompt="Be brief.")
    async with over_http(live.url, alice.key) as mcp:
        read = await mcp.read_resource(f"chatproxy://sessions/{sid}")
    (content,) = read.contents
    assert content.mime_type == "text/markdown"
    text = content.text  # type: ignore[union-attr]
    assert text.startswith("# Trip\n\n- id: `" + sid + "`\n- model: (any)\n")
    assert "## System prompt\n\nBe brief." in text
    assert "## 1 · user\n\nWeather in Paris?" in text
    assert ('## 2 · assistant\n\n\n**Tool call** `weather` · id `call_1`\n```json\n'
            '{"city":"Paris"}\n```') in text
    assert "## 3 · tool · result of `call_1`\n\n18C" in text
    assert "## 6 · user\n\nthanks" in text
    assert text.endswith("## 7 · assistant · incomplete (the reply was cut off)\n\n"
                         "You're welc\n")


async def test_get_messages_text_names_the_session_id_as_it_is(
    live: Serve, alice: User, db: asyncpg.Connection
) -> None:
    """Ids are case-sensitive: the text rendering must name the session an assistant can use
    again (it once went through `str.capitalize()`, which lowercased it)."""
    sid = await conversation(db, alice)
    assert sid != sid.lower()
    async with over_http(live.url, alice.key) as mcp:
        result = await mcp.call_tool("get_messages", {"session_id": sid, "limit": 2})
    text = result.content[0].text  # type: ignore[union-attr]
    assert text.startswith(f"Messages of {sid} 1-2 of 7 (more: offset 2):\n"), text


async def test_text_json_cannot_carry_comes_as_replacement_characters(
    live: Serve, alice: User, db: asyncpg.Connection
) -> None:
    """Stored text may hold lone surrogates (contract §5); an MCP message, UTF-8 JSON, cannot."""
    conn = await codec_conn(db)
    sid = await conversation(db, alice, session_name="odd \ud800")
    await seed(conn, sid, [({"role": "user", "content": "nul \u0000 and \udfff"}, 3,
                            "complete")])
    async with over_http(live.url, alice.key) as mcp:
        read = await ok(mcp, "get_messages", session_id=sid, order="desc", limit=1)
        assert read["messages"][0]["content"] == "nul \u0000 and \ufffd"
        exported = await ok(mcp, "export_session", session_id=sid)
        assert exported["session"]["session_name"] == "odd \ufffd"
        markdown = await mcp.read_resource(f"chatproxy://sessions/{sid}")
        assert "# odd \ufffd" in markdown.contents[0].text  # type: ignore[union-attr]


async def test_access_log_names_the_route_and_user_and_never_message_text(
    live: Serve, alice: User, db: asyncpg.Connection
) -> None:
    marker = "secret-marker-" + alice.id
    sid = await conversation(db, alice)
    await seed(await codec_conn(db), sid, [({"role": "user", "content": marker}, 3,
                                            "complete")])
    async with over_http(live.url, alice.key) as mcp:
        await ok(mcp, "get_messages", session_id=sid)
        await ok(mcp, "export_session", session_id=sid)
        await mcp.read_resource(f"chatproxy://sessions/{sid}")
        await refused(mcp, "create_session", session_name=marker, max_history_messages=-1)
    log = live.log()
    assert marker not in log and alice.key not in log
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    mine = [line for line in lines
            if line["logger"] == "chatproxy.access" and line.get("user_id") == alice.id]
    assert len(mine) >= 5
    # 202: the client's `initialized` notification, which has no answer.
    assert {(line["method"], line["route"], line["status"]) for line in mine} == {
        ("POST", "/mcp", 200), ("POST", "/mcp", 202)}
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(live.url + "/metrics")).text
    assert 'route="/mcp"' in metrics


async def test_mcp_is_not_in_the_openapi_document(client: Any) -> None:
    r = await client.get("/schema/openapi.json")
    assert r.status_code == 200
    assert not [path for path in r.json()["paths"] if "mcp" in path]
