"""Helpers for tests of the turn: requests, canned upstream answers, what a session holds."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
import respx
from litestar.testing import AsyncTestClient

from proxy import db, ids
from proxy.app import create_app
from proxy.config import Settings
from proxy.runtime import Runtime
from proxy.tokens import ModelTable, TokenCounter
from proxy.upstream import make_client
from tests.conftest import User

Client = AsyncTestClient[Any]


def completion(content: str | None = "ok", **message: Any) -> dict[str, Any]:
    usage = message.pop("usage", {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13})
    body: dict[str, Any] = {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {
            "role": "assistant", "content": content, "refusal": None, **message}}],
    }
    if usage is not None:
        body["usage"] = usage
    return body


def answers(*bodies: dict[str, Any]) -> list[httpx.Response]:
    return [httpx.Response(200, json=b) for b in bodies]


def sent(route: respx.Route, index: int = -1) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(route.calls[index].request.content)
    return result


async def new_session(client: Client | httpx.AsyncClient, user: User, **fields: Any) -> str:
    r = await client.post("/v1/chat/sessions", json=fields, headers=user.headers)
    assert r.status_code == 201, r.text
    sid: str = r.json()["id"]
    return sid


async def chat(
    client: Client, caller: User, sid: str | None, /, *messages: dict[str, Any], **fields: Any
) -> httpx.Response:
    body: dict[str, Any] = {"model": fields.pop("model", "gpt-4o"), "messages": list(messages)}
    if sid is not None:
        body["session_id"] = sid
    body.update(fields)
    return await client.post("/v1/chat/completions", json=body, headers=caller.headers)


async def stored(client: Client, user: User, sid: str) -> list[dict[str, Any]]:
    """The session's messages as the API lists them, without ids and timestamps."""
    r = await client.get(f"/v1/chat/sessions/{sid}/messages?limit=500", headers=user.headers)
    assert r.status_code == 200, r.text
    return [
        {k: v for k, v in m.items() if k not in ("id", "created_at", "session_id", "object")}
        for m in r.json()["data"]
    ]


def u(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def a(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


def history_headers(r: httpx.Response) -> tuple[str, str, str, str]:
    return (r.headers["x-session-id"], r.headers["x-history-messages"],
            r.headers["x-history-tokens"], r.headers["x-history-dropped"])


@asynccontextmanager
async def runtime_on(settings: Settings, database_url: str,
                     http: httpx.AsyncClient) -> AsyncIterator[Runtime]:
    """A Runtime on the test's own loop, for driving the engine without the app; on the way out
    it waits for the write-backs detached from their request, then closes its pool and `http`."""
    pool = await db.create_pool(database_url, settings)
    rt = Runtime(settings, pool, http, TokenCounter(ModelTable.load(settings.models_file)))
    try:
        yield rt
    finally:
        await settle(rt)
        await http.aclose()
        await pool.close()


async def settle(rt: Runtime) -> None:
    """Wait for the write-backs detached from their request."""
    while rt.writes:
        await asyncio.gather(*rt.writes, return_exceptions=True)


async def session_of(conn: asyncpg.Connection, user: User) -> str:
    """A session made in the database directly (20 messages of history)."""
    sid = ids.new_id("sess_")
    await conn.execute("INSERT INTO chat_sessions (id, user_id, max_history_messages) "
                       "VALUES ($1, $2, 20)", sid, user.id)
    return sid


@asynccontextmanager
async def proxy_with(settings: Settings, upstream: respx.Router) -> AsyncIterator[Client]:
    http = make_client(settings, transport=httpx.MockTransport(upstream.async_handler))
    async with AsyncTestClient(app=create_app(settings, http_client=http),
                               base_url="http://proxy.test") as test_client:
        yield test_client
    await http.aclose()


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of `/metrics`' text (0 when absent)."""
    label = ",".join(f'{k}="{v}"' for k, v in labels.items())
    prefix = f"{name}{{{label}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return 0.0
