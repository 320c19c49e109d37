"""Helpers for the MCP tests: the official `mcp` client on `/mcp` or on `chatproxy mcp`, tool
calls that must succeed or must fail, and conversations to arrange in the database."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import httpx2
from mcp import ClientSession
from mcp.client.client import Client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

from proxy.store import sessions
from tests.conftest import ROOT, User
from tests.fault_helpers import Serve, serve_env, serving
from tests.test_lifecycle import codec_conn, seed

TOOLS = {
    "list_sessions", "resume_session", "get_messages", "create_session", "export_session",
    "import_session", "merge_sessions", "fork_session", "clear_session", "delete_session",
    "cleanup_sessions", "send_message",
}

PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")

# seq: 1 user, 2 assistant opening a two-call tool exchange, 3-4 its results, 5 the answer,
# 6 user with content parts and a name, 7 a reply cut off mid-stream.
CONVO: list[tuple[dict[str, Any], int, str]] = [
    ({"role": "user", "content": "Weather in Paris?"}, 12, "complete"),
    ({"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}},
        {"id": "call_2", "type": "function", "function": {"name": "sky", "arguments": "{}"}}]},
     20, "complete"),
    ({"role": "tool", "tool_call_id": "call_1", "content": "18C"}, 5, "complete"),
    ({"role": "tool", "tool_call_id": "call_2", "content": "sunny"}, 6, "complete"),
    ({"role": "assistant", "content": "It is 18C and sunny."}, 9, "complete"),
    ({"role": "user", "name": "ann", "content": [{"type": "text", "text": "thanks"}]}, 7,
     "complete"),
    ({"role": "assistant", "content": "You're welc"}, 4, "incomplete"),
]


@contextmanager
def live_server(database_url: str, upstream_url: str, tmp: Path) -> Iterator[Serve]:
    """`chatproxy serve` on the test database, logging at info (the access log's lines)."""
    env = serve_env(database_url, upstream_url, tmp, CHATPROXY_LOG_LEVEL="info")
    with serving(env, tmp / "serve.log") as server:
        yield server


@asynccontextmanager
async def rest_as(live: Serve, user: User) -> AsyncIterator[httpx.AsyncClient]:
    """The REST API as `user`, on the same server."""
    async with httpx.AsyncClient(base_url=live.url, headers=user.headers, timeout=30) as c:
        yield c


@asynccontextmanager
async def over_http(url: str, key: str, **client: Any) -> AsyncIterator[ClientSession]:
    """An initialized MCP session on `url`/mcp with `key`."""
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx2.AsyncClient(headers=headers, timeout=30, **client) as http:
        async with streamable_http_client(url + "/mcp", http_client=http) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                yield session


@asynccontextmanager
async def over_http_modern(url: str, key: str) -> AsyncIterator[ClientSession]:
    """A session on `url`/mcp as the official `Client` makes one by default: it asks the server
    (`server/discover`) and speaks the per-request protocol (2026-07-28) when it can, which
    needs no handshake and no state on the server."""
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
        async with Client(streamable_http_client(url + "/mcp", http_client=http)) as client:
            yield client.session


def stdio_parameters(database_url: str, user: str, **extra: str) -> StdioServerParameters:
    """`chatproxy mcp --user USER` on the test database; `extra` adds to its environment (e.g.
    `CHATPROXY_UPSTREAM_BASE_URL`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATPROXY_")
           and k.lower() not in PROXY_VARIABLES}  # as `Serve`: the fakes are reached directly
    env.update(CHATPROXY_CONFIG=os.devnull, CHATPROXY_DATABASE_URL=database_url,
               CHATPROXY_MODELS_FILE=str(ROOT / "config" / "models.toml"),
               CHATPROXY_LOG_LEVEL="info", **extra)
    return StdioServerParameters(command=sys.executable, args=["-m", "proxy", "mcp", "--user",
                                                               user], env=env, cwd=ROOT)


@asynccontextmanager
async def over_stdio(database_url: str, user: str, **extra: str) -> AsyncIterator[ClientSession]:
    """An initialized MCP session on `chatproxy mcp --user USER`."""
    # The command's log lines go to the test's stderr (pytest shows them if the test fails).
    parameters = stdio_parameters(database_url, user, **extra)
    async with stdio_client(parameters, errlog=sys.stderr) as (r, w):
        async with ClientSession(r, w) as session:
            await session.initialize()
            yield session


async def ok(session: ClientSession, tool: str, **arguments: Any) -> dict[str, Any]:
    """The structured result of a call that must succeed (the client checked it against the
    tool's outputSchema); its text rendering must be there too."""
    result = await session.call_tool(tool, arguments)
    assert not result.is_error, result.content
    assert result.content[0].type == "text" and result.content[0].text
    assert result.structured_content is not None
    return result.structured_content


async def refused(session: ClientSession, tool: str, **arguments: Any) -> str:
    """The message of a call that must fail as a tool result (never a protocol error)."""
    result = await session.call_tool(tool, arguments)
    assert result.is_error, result
    assert result.structured_content is None
    text: str = result.content[0].text
    return text


async def conversation(db: asyncpg.Connection, owner: User, **fields: Any) -> str:
    """A session of `owner` holding CONVO; its id."""
    conn = await codec_conn(db)
    session = await sessions.create_session(conn, owner.id, {"max_history_messages": 20, **fields})
    await seed(conn, session["id"], CONVO)
    return str(session["id"])


async def fingerprint(db: asyncpg.Connection, *users: User) -> list[tuple[Any, ...]]:
    """Every session of `users` and every message in them: what a refused call must not change."""
    rows = await db.fetch(
        """
        SELECT s.id, s.is_active, s.updated_at, s.deleted_at, s.message_count, s.session_name,
               array_agg(m.seq || ':' || m.body ORDER BY m.seq) AS bodies
        FROM chat_sessions s LEFT JOIN chat_messages m ON m.session_id = s.id
        WHERE s.user_id = ANY($1::text[]) GROUP BY s.id ORDER BY s.id
        """,
        [u.id for u in users])
    return [tuple(r) for r in rows]
