"""`chatproxy mcp --user USER` (the tools over stdio, with the official client), and `/mcp` on a
server with two workers, which any worker must answer (stateless transport)."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import asyncpg
import httpx2
import pytest
from mcp.shared.exceptions import MCPError

from tests.conftest import ROOT, User
from tests.fault_helpers import serve_env, serving
from tests.mcp_helpers import (
    CONVO,
    TOOLS,
    conversation,
    ok,
    over_http,
    over_stdio,
    refused,
    stdio_parameters,
)

pytestmark = pytest.mark.e2e


async def test_stdio_serves_every_tool_as_the_user(
    database_url: str, alice: User, bob: User, db: asyncpg.Connection
) -> None:
    sid = await conversation(db, alice, session_name="Trip", max_history_messages=5)
    theirs = await conversation(db, bob)
    async with over_stdio(database_url, alice.name) as mcp:
        assert {t.name for t in (await mcp.list_tools()).tools} == TOOLS
        created = (await ok(mcp, "create_session", session_name="new"))["session"]
        listed = await ok(mcp, "list_sessions")
        assert [s["id"] for s in listed["sessions"]] == [created["id"], sid]
        read = await ok(mcp, "get_messages", session_id=sid, order="desc", limit=2)
        assert ([m["seq"] for m in read["messages"]], read["total"]) == ([7, 6], len(CONVO))
        assert await ok(mcp, "delete_session", session_id=sid) == {"session_id": sid,
                                                                    "deleted": True}
        resumed = await ok(mcp, "resume_session", session_id=sid)
        assert resumed["session"]["is_active"]
        assert [m["seq"] for m in resumed["messages"]] == [5, 6, 7]
        exported = await ok(mcp, "export_session", session_id=sid)
        copy = (await ok(mcp, "import_session", document=exported))["session"]
        fork = (await ok(mcp, "fork_session", session_id=sid, up_to_seq=1))["session"]
        assert (copy["message_count"], fork["message_count"]) == (7, 1)
        merged = await ok(mcp, "merge_sessions", primary_id=fork["id"], secondary_id=copy["id"])
        assert merged["session"]["message_count"] == 8
        assert await ok(mcp, "clear_session", session_id=fork["id"]) == {
            "session_id": fork["id"], "cleared": True}
        transcript = await mcp.read_resource(f"chatproxy://sessions/{sid}")
        assert transcript.contents[0].text.startswith("# Trip\n")  # type: ignore[union-attr]

        # Acting as alice only: bob's session is not found, and a cleanup leaves it alone.
        await db.execute("UPDATE chat_sessions SET updated_at = now() - interval '1 day' "
                         "WHERE id = ANY($1::text[])", [theirs, created["id"]])
        assert await refused(mcp, "get_messages", session_id=theirs) == (
            f"Error executing tool get_messages: Session {theirs} not found")
        with pytest.raises(MCPError):
            await mcp.read_resource(f"chatproxy://sessions/{theirs}")
        assert await ok(mcp, "cleanup_sessions", older_than="1h") == {
            "deleted_sessions": 1, "deleted_messages": 0}
    assert await db.fetchval("SELECT count(*) FROM chat_sessions WHERE id = $1", theirs) == 1
    assert await db.fetchval("SELECT count(*) FROM chat_sessions WHERE id = $1",
                             created["id"]) == 0


async def test_stdio_writes_nothing_but_the_protocol_on_stdout(
    database_url: str, alice: User, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """Raw lines in and out, the user named by id, logging at debug."""
    sid = await conversation(db, alice)
    requests: list[dict[str, Any]] = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {},
            "clientInfo": {"name": "raw", "version": "1"}}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
        {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {
            "name": "get_messages", "arguments": {"session_id": sid}}},
        {"jsonrpc": "2.0", "id": 4, "method": "resources/read", "params": {
            "uri": f"chatproxy://sessions/{sid}"}},
    ]
    parameters = stdio_parameters(database_url, alice.id)
    env = {**(parameters.env or {}), "CHATPROXY_LOG_LEVEL": "debug"}
    with (tmp_path / "stderr").open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            parameters.command, *parameters.args, cwd=ROOT, env=env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=log)
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write("".join(json.dumps(r) + "\n" for r in requests).encode())
    await process.stdin.drain()
    # Every line on stdout is a JSON-RPC message; stdin stays open until the last answer
    # (the host closing it ends the server, and whatever it was still doing).
    lines = [await asyncio.wait_for(process.stdout.readline(), 60) for _ in range(4)]
    answers = sorted((json.loads(line) for line in lines), key=lambda a: int(a["id"]))
    process.stdin.close()
    rest, _ = await asyncio.wait_for(process.communicate(), 60)
    errors = (tmp_path / "stderr").read_bytes()
    assert (process.returncode, rest) == (0, b""), errors.decode()[-2000:]
    assert [(a["jsonrpc"], a["id"], "result" in a) for a in answers] == [
        ("2.0", i, True) for i in (1, 2, 3, 4)]
    assert answers[2]["result"]["structuredContent"]["total"] == len(CONVO)
    assert not answers[2]["result"]["isError"]
    assert b"chatproxy" in errors  # the logs went to stderr, without message text
    assert b"Weather in Paris" not in errors


async def test_an_unknown_user_stops_the_command_with_one_line(database_url: str) -> None:
    parameters = stdio_parameters(database_url, "nobody-at-all")
    done = await asyncio.to_thread(
        subprocess.run, [parameters.command, *parameters.args], cwd=ROOT, env=parameters.env,
        input=b"", capture_output=True, timeout=120)
    assert (done.returncode, done.stdout) == (1, b"")
    assert done.stderr.decode().splitlines()[-1] == "chatproxy: no user 'nobody-at-all'"


async def test_two_clients_at_once_on_two_workers(
    database_url: str, alice: User, bob: User, tmp_path: Path
) -> None:
    """Every request on a new connection, so the workers share them out: a transport that kept
    session state in one process would lose it on the other."""
    env = serve_env(database_url, "http://127.0.0.1:9/v1", tmp_path)
    fresh = {"limits": httpx2.Limits(max_keepalive_connections=0)}

    async def work(url: str, user: User) -> list[str]:
        async with over_http(url, user.key, **fresh) as mcp:
            made = [(await ok(mcp, "create_session", session_name=f"{user.name} {i}"))[
                "session"]["id"] for i in range(8)]
            listed = await ok(mcp, "list_sessions", limit=100)
            for sid in made:
                assert (await ok(mcp, "get_messages", session_id=sid))["total"] == 0
            return [s["id"] for s in listed["sessions"]]

    with serving(env, tmp_path / "serve.log", "--workers", "2") as server:
        seen_by_alice, seen_by_bob = await asyncio.gather(
            work(server.url, alice), work(server.url, bob))
    assert len(seen_by_alice) == len(seen_by_bob) == 8
    assert not set(seen_by_alice) & set(seen_by_bob)
