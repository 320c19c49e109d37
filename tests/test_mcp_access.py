"""Who may do what over `/mcp`: a key is required (401 in the OpenAI envelope), another user's
session is "not found" to every tool and the resource, and a bad argument is a tool result with
`isError: true` that changes nothing."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import pytest
from mcp.shared.exceptions import MCPError

from proxy import auth
from proxy.store import users
from tests.conftest import User
from tests.fault_helpers import Serve, serve_env, serving
from tests.mcp_helpers import (
    CONVO,
    conversation,
    fingerprint,
    ok,
    over_http,
    refused,
)

pytestmark = pytest.mark.e2e

INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-11-25", "capabilities": {},
    "clientInfo": {"name": "test", "version": "1"}}}
MCP_HEADERS = {"Accept": "application/json, text/event-stream"}


@pytest.fixture(scope="module")
def live(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    tmp = tmp_path_factory.mktemp("mcp-access")
    env = serve_env(database_url, "http://127.0.0.1:9/v1", tmp)
    with serving(env, tmp / "serve.log") as server:
        yield server


def unauthorized(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": None,
                      "code": "invalid_api_key"}}


async def test_paths_that_only_begin_with_mcp_are_unknown_routes(
    live: Serve, alice: User
) -> None:
    """The app mounts `/mcp` by prefix; `/mcpx` and `/mcp/x` are not the endpoint (contract §4:
    an unknown path outside /v1/ is a 404 `not_found`, with or without a key)."""
    async with httpx.AsyncClient(timeout=30) as http:
        for path in ("/mcpx", "/mcp/x", "/mcp/tools/list"):
            for headers in ({}, alice.headers):
                r = await http.post(live.url + path, json=INITIALIZE,
                                    headers={**MCP_HEADERS, **headers})
                assert (path, r.status_code, r.json()) == (path, 404, {"error": {
                    "message": f"Unknown route: POST {path}", "type": "invalid_request_error",
                    "param": None, "code": "not_found"}})
        for path in ("/mcp", "/mcp/"):
            r = await http.post(live.url + path, json=INITIALIZE,
                                headers={**MCP_HEADERS, **alice.headers})
            assert r.status_code == 200 and r.json()["result"]["serverInfo"]["name"] == "chatproxy"


async def test_requests_without_a_valid_key_are_401_before_the_mcp_layer(
    live: Serve, alice: User, db: asyncpg.Connection
) -> None:
    gone = auth.generate_key()
    row = await users.create_key(db, alice.id, auth.hash_key(gone), gone[:12], "gone")
    assert row is not None and await users.revoke_key(db, row["id"])
    cases = [
        ({}, "Missing API key: send 'Authorization: Bearer sk-cp-...'"),
        ({"Authorization": "Bearer nope"}, "Invalid API key"),
        ({"Authorization": "Bearer sk-cp-" + "A" * 43}, "Invalid API key"),
        ({"Authorization": f"Bearer {gone}"}, "Invalid API key"),
    ]
    async with httpx.AsyncClient(timeout=30) as http:
        for headers, message in cases:
            for method in ("POST", "GET", "DELETE"):
                r = await http.request(method, live.url + "/mcp", json=INITIALIZE,
                                       headers={**MCP_HEADERS, **headers})
                assert (method, r.status_code, r.json()) == (method, 401,
                                                            unauthorized(message))
            # The per-request protocol (2026-07-28), which the SDK routes by this header, too.
            r = await http.post(live.url + "/mcp", json=INITIALIZE, headers={
                **MCP_HEADERS, **headers, "MCP-Protocol-Version": "2026-07-28"})
            assert (r.status_code, r.json()) == (401, unauthorized(message))
        r = await http.post(live.url + "/mcp", json=INITIALIZE,
                            headers={**MCP_HEADERS, **alice.headers})
        assert r.status_code == 200 and r.json()["result"]["serverInfo"]["name"] == "chatproxy"
    # The official client is refused too: its initialize gets the 401 and fails.
    statuses: list[int] = []

    async def seen(response: Any) -> None:
        statuses.append(response.status_code)

    with pytest.raises(ExceptionGroup) as refused_by_client:
        async with over_http(live.url, gone, event_hooks={"response": [seen]}):
            pass
    assert refused_by_client.value.subgroup(MCPError) is not None
    assert statuses == [401]


async def test_another_users_session_is_not_found_by_any_tool_or_the_resource(
    live: Serve, alice: User, bob: User, db: asyncpg.Connection
) -> None:
    theirs = await conversation(db, alice)
    mine = await conversation(db, bob)
    unknown = "sess_" + "Z" * 24
    before = await fingerprint(db, alice)
    async with over_http(live.url, bob.key) as mcp:
        for name, arguments in [
            ("resume_session", {"session_id": "{sid}"}),
            ("get_messages", {"session_id": "{sid}"}),
            ("export_session", {"session_id": "{sid}"}),
            ("fork_session", {"session_id": "{sid}"}),
            ("fork_session", {"session_id": "{sid}", "up_to_seq": 1}),
            ("merge_sessions", {"primary_id": "{sid}", "secondary_id": mine}),
            ("merge_sessions", {"primary_id": mine, "secondary_id": "{sid}"}),
            ("clear_session", {"session_id": "{sid}"}),
            ("delete_session", {"session_id": "{sid}"}),
        ]:
            def filled(sid: str, arguments: dict[str, Any] = arguments) -> dict[str, Any]:
                return {k: sid if v == "{sid}" else v for k, v in arguments.items()}

            foreign = await refused(mcp, name, **filled(theirs))
            missing = await refused(mcp, name, **filled(unknown))
            assert foreign == f"Error executing tool {name}: Session {theirs} not found"
            assert foreign.replace(theirs, unknown) == missing, name
        for sid in (theirs, unknown):
            with pytest.raises(MCPError) as error:
                await mcp.read_resource(f"chatproxy://sessions/{sid}")
            assert error.value.error.message == f"Session {sid} not found"
        listed = await ok(mcp, "list_sessions", include_inactive=True, limit=100)
        assert [s["id"] for s in listed["sessions"]] == [mine]
        await db.execute("UPDATE chat_sessions SET updated_at = now() - interval '1 day' "
                         "WHERE id = $1", theirs)
        before = await fingerprint(db, alice)
        assert await ok(mcp, "cleanup_sessions", older_than="1h") == {
            "deleted_sessions": 0, "deleted_messages": 0}
    assert await fingerprint(db, alice) == before  # nothing of alice's changed
    async with over_http(live.url, alice.key) as mcp:
        assert (await ok(mcp, "get_messages", session_id=theirs))["total"] == len(CONVO)


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("list_sessions", {"limit": 0}, "greater than or equal to 1"),
    ("list_sessions", {"limit": 101}, "less than or equal to 100"),
    ("list_sessions", {"limit": "lots"}, "valid integer"),
    ("list_sessions", {"offset": -1}, "greater than or equal to 0"),
    ("list_sessions", {"include_inactive": "maybe"}, "valid boolean"),
    ("get_messages", {"session_id": "{sid}", "limit": 501}, "less than or equal to 500"),
    ("get_messages", {"session_id": "{sid}", "order": "sideways"}, "'asc' or 'desc'"),
    ("get_messages", {}, "session_id\n  Field required"),
    ("get_messages", {"session_id": 42}, "valid string"),
    ("get_messages", {"session_id": "sess_\u0000"}, "Session (malformed id) not found"),
    ("resume_session", {"session_id": "x" * 201}, "at most 200 characters"),
    ("create_session", {"max_history_messages": 5000}, "less than or equal to 1000"),
    ("create_session", {"metadata": {"team": 1}}, "valid string"),
    ("fork_session", {"session_id": "{sid}", "up_to_seq": 3},
     "up_to_seq 3 is inside a tool exchange"),
    ("fork_session", {"session_id": "{sid}", "up_to_seq": 99}, "up_to_seq must be between 1"),
    ("merge_sessions", {"primary_id": "{sid}", "secondary_id": "{sid}"},
     "A session cannot be merged into itself"),
    ("import_session", {"document": {"format": "chatproxy.session.v1", "session": {},
                                     "messages": [{"role": "user", "content": "hi"},
                                                  {"role": "robot", "content": "x"}]}},
     "Invalid value for messages[1].role"),
    ("import_session", {"document": {"format": "other", "session": {}, "messages": []}},
     "Invalid value for format"),
    ("import_session", {"document": "not a document"}, "valid dictionary"),
    ("cleanup_sessions", {"older_than": "soon"}, "older_than must be a duration like 30s"),
    ("cleanup_sessions", {"older_than": "0d"}, "older_than must be a duration like 30s"),
    ("send_message", {"session_id": "{sid}", "content": "hi"},
     "has no model: give the model to send to"),
    ("no_such_tool", {}, "Unknown tool: no_such_tool"),
]


@pytest.mark.parametrize(("tool", "arguments", "message"), BAD,
                         ids=[f"{t}-{i}" for i, (t, _, _) in enumerate(BAD)])
async def test_a_bad_argument_is_a_tool_error_and_changes_nothing(
    live: Serve, alice: User, db: asyncpg.Connection, tool: str, arguments: dict[str, Any],
    message: str
) -> None:
    sid = await conversation(db, alice)
    await db.execute("UPDATE chat_sessions SET updated_at = now() - interval '30 days' "
                     "WHERE id = $1", sid)  # what a cleanup that went wrong would remove
    filled = {k: sid if v == "{sid}" else v for k, v in arguments.items()}
    before = await fingerprint(db, alice)
    async with over_http(live.url, alice.key) as mcp:
        text = await refused(mcp, tool, **filled)
    assert message in text
    assert await fingerprint(db, alice) == before


async def test_arguments_a_tool_does_not_know_are_ignored(live: Serve, alice: User) -> None:
    async with over_http(live.url, alice.key) as mcp:
        assert await ok(mcp, "list_sessions", colour="blue") == await ok(mcp, "list_sessions")


async def test_an_upstream_that_cannot_be_reached_is_a_tool_error(
    live: Serve, alice: User, db: asyncpg.Connection
) -> None:
    """This server's upstream (port 9) refuses connections: the turn's 502, as a tool result."""
    sid = await conversation(db, alice, model="gpt-4o")
    before = await fingerprint(db, alice)
    async with over_http(live.url, alice.key) as mcp:
        assert await refused(mcp, "send_message", session_id=sid, content="hi") == (
            "Error executing tool send_message: The upstream could not be reached")
    assert await fingerprint(db, alice) == before
