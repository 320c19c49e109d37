"""A turn's write against what can happen meanwhile (issue 13, items 3, 4, 11 and 12).

- The connection dies mid-write: the retry recognises the turn by its own id, so a turn that
  repeats the previous one word for word is stored once, never dropped.
- The session is merged away or deleted while the turn waits for the upstream: the turn is not
  stored into a deleted session behind the client's back; the client is told (404, or the
  stream's error event), and its Idempotency-Key is released.
- `chatproxy cleanup --older-than 1s` while a turn runs: the session is kept, the turn stored.
- An upstream's `usage.completion_tokens` beyond a 32-bit integer is stored as the largest one;
  any failure of the write releases the Idempotency-Key.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import pytest
import respx

from proxy.auth import hash_key
from proxy.config import Settings
from proxy.errors import ConversationGone, InternalError, SessionGone
from proxy.schemas import MAX_TOKENS
from proxy.store import idempotency, messages
from proxy.turns.claim import Idempotency, request_hash
from proxy.turns.engine import Caller, TurnRequest, run_turn
from proxy.turns.outcome import Streaming
from proxy.upstream import make_client
from tests.conftest import User, configured, fresh_database, make_user
from tests.fault_helpers import LiveClient, Relay, app_client
from tests.test_cli_sessions import cli
from tests.turns import completion, new_session, runtime_on, session_of, settle

SSE = {"content-type": "text/event-stream"}


@pytest.fixture
def relay(database_url: str) -> Iterator[Relay]:
    with Relay(database_url) as running:
        yield running


def turn(sid: str, text: str = "hi", **fields: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "session_id": sid,
            "messages": [{"role": "user", "content": text}], **fields}


async def contents(db: asyncpg.Connection, sid: str) -> list[tuple[str, Any]]:
    rows = await db.fetch(
        "SELECT role, body FROM chat_messages WHERE session_id = $1 ORDER BY seq", sid)
    return [(r["role"], json.loads(r["body"])["content"]) for r in rows]


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + (
        b"data: [DONE]\n\n")


def chunk(content: str, usage: dict[str, Any] | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {"id": "c", "object": "chat.completion.chunk", "created": 1,
                             "model": "gpt-4o",
                             "choices": [{"index": 0, "delta": {"content": content}}]}
    if usage is not None:
        event["usage"] = usage
    return event


def last_event(raw: bytes) -> bytes:
    return raw.rstrip(b"\n").split(b"\n\n")[-1]


def error_event(error: Any) -> bytes:
    return b"data: " + json.dumps(error.body(), separators=(",", ":")).encode()


async def until(check: Any, what: str) -> None:
    for _ in range(500):
        if await check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never happened: {what}")


# --- item 3: the in-doubt retry, by the turn's id --------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cut", ["before_commit", "after_commit"])
async def test_a_write_cut_mid_statement_stores_a_turn_repeating_the_last_one_once(
    settings: Settings, relay: Relay, alice: User, db: asyncpg.Connection, cut: str
) -> None:
    """The connection through the relay is cut while the write's statement is out: either it
    never reached PostgreSQL (`before_commit`), or it committed and the answer was lost
    (`after_commit`). The turn repeats the previous one word for word; the retry stores it
    exactly once either way."""
    upstream = respx.Router(base_url=settings.upstream_base_url, assert_all_called=False)
    calls = 0

    def answer(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 2:  # the repeated turn: its write goes out into the fault
            relay.stall() if cut == "before_commit" else relay.deafen()
        return httpx.Response(200, json=completion("same"))

    upstream.post("/chat/completions").mock(side_effect=answer)
    # One pooled connection: the write's statement, prepared there by the first turn, goes out
    # whole (a deafened statement still to be prepared would wait for its Parse forever).
    one = configured(settings, database_url=relay.url(), db_pool_size=1)
    async with app_client(one, upstream) as client:
        sid = await new_session(client, alice)
        r = await client.post("/v1/chat/completions", json=turn(sid), headers=alice.headers)
        assert r.status_code == 200, r.text
        again = asyncio.ensure_future(
            client.post("/v1/chat/completions", json=turn(sid), headers=alice.headers))
        if cut == "before_commit":
            async def held() -> bool:
                return relay.held > 0
            await until(held, "the write's statement held by the relay")
            assert await contents(db, sid) == [("user", "hi"), ("assistant", "same")]
        else:
            async def committed() -> bool:
                return len(await contents(db, sid)) == 4 and relay.dropped > 0
            await until(committed, "the write committed, its answer dropped")
        await asyncio.to_thread(relay.resume)  # cuts the connection the write waits on
        r = await asyncio.wait_for(again, 30)
        assert r.status_code == 200, r.text
        assert r.json() == completion("same")
    assert await contents(db, sid) == [
        ("user", "hi"), ("assistant", "same"), ("user", "hi"), ("assistant", "same")]
    counts = await db.fetchrow(
        "SELECT message_count, next_seq FROM chat_sessions WHERE id = $1", sid)
    assert tuple(counts) == (4, 5)


# --- item 12: a merge or a delete while the turn waits for the upstream ------------------------


class Paused:
    """An upstream that holds each chat request until `go` is set."""

    def __init__(self, settings: Settings, *, stream: bool) -> None:
        self.entered, self.go = asyncio.Event(), asyncio.Event()
        self.router = respx.Router(base_url=settings.upstream_base_url, assert_all_called=False)
        self.router.post("/chat/completions").mock(side_effect=self._answer)
        self.stream = stream

    async def _answer(self, request: httpx.Request) -> httpx.Response:
        self.entered.set()
        await self.go.wait()
        if self.stream:
            return httpx.Response(200, headers=SSE, content=sse(
                {**chunk("late"), "choices": [{"index": 0, "delta": {
                    "role": "assistant", "content": "late"}}]}))
        return httpx.Response(200, json=completion("late"))


async def race(client: LiveClient, paused: Paused, user: User, sid: str,
               meanwhile: Any, **fields: Any) -> httpx.Response:
    """A turn on `sid` held at the upstream while `meanwhile()` runs, then let go."""
    body = turn(sid, "lost?", stream=paused.stream, **fields)
    pending = asyncio.ensure_future(
        client.post("/v1/chat/completions", json=body, headers=user.headers))
    await asyncio.wait_for(paused.entered.wait(), 10)
    await meanwhile()
    paused.entered.clear()
    paused.go.set()
    return await asyncio.wait_for(pending, 30)


def told(r: httpx.Response, sid: str, *, stream: bool) -> bool:
    """The client learnt that its turn was not stored: a 404, or the stream's error event."""
    gone = SessionGone(sid)
    if stream:
        return r.status_code == 200 and last_event(r.content) == error_event(gone) and (
            b"[DONE]" not in r.content)
    return (r.status_code, r.json()) == (404, gone.body())


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_turn_on_a_session_merged_away_meanwhile_is_refused_not_lost(
    settings: Settings, alice: User, db: asyncpg.Connection, stream: bool
) -> None:
    paused = Paused(settings, stream=stream)
    async with app_client(settings, paused.router) as client:
        source, target = await new_session(client, alice), await new_session(client, alice)
        await messages.store_turn(db, source, [messages.NewMessage(
            {"role": "user", "content": "before"}, 3)])

        async def merge() -> None:
            r = await client.post(f"/v1/chat/sessions/{target}/merge", headers=alice.headers,
                                  json={"source_session_id": source})
            assert r.status_code == 200, r.text

        r = await race(client, paused, alice, source, merge)
        assert told(r, source, stream=stream), r.content
    # The turn is nowhere: not in the deleted source, not in the target (which has what the
    # source held when it was merged).
    assert await contents(db, source) == [("user", "before")]
    assert await contents(db, target) == [("user", "before")]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_turn_on_a_session_deleted_meanwhile_is_refused_and_its_key_released(
    settings: Settings, alice: User, db: asyncpg.Connection, stream: bool
) -> None:
    paused = Paused(settings, stream=stream)
    key = {"Idempotency-Key": f"deleted-meanwhile-{stream}"}
    async with app_client(settings, paused.router) as client:
        sid = await new_session(client, alice)

        async def delete() -> None:
            r = await client.delete(f"/v1/chat/sessions/{sid}", headers=alice.headers)
            assert r.status_code == 204

        body = turn(sid, "lost?", stream=stream)
        pending = asyncio.ensure_future(client.post(
            "/v1/chat/completions", json=body, headers={**alice.headers, **key}))
        await asyncio.wait_for(paused.entered.wait(), 10)
        await delete()
        paused.go.set()
        r = await asyncio.wait_for(pending, 30)
        assert told(r, sid, stream=stream), r.content
        assert await contents(db, sid) == []
        # The key was given back: restored, the same request runs again (not 409).
        r = await client.post(f"/v1/chat/sessions/{sid}/restore", headers=alice.headers)
        assert r.status_code == 200
        r = await client.post("/v1/chat/completions", json=body,
                              headers={**alice.headers, **key})
        assert r.status_code == 200, r.text
        assert "idempotent-replayed" not in r.headers
    assert await contents(db, sid) == [("user", "lost?"), ("assistant", "late")]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_response_in_a_conversation_deleted_meanwhile_is_refused_and_stores_nothing(
    settings: Settings, alice: User, db: asyncpg.Connection, stream: bool
) -> None:
    """The Responses door writes the turn with its response row (one statement): a
    conversation deleted while the turn waited takes neither, and the client is told."""
    paused = Paused(settings, stream=stream)
    async with app_client(settings, paused.router) as client:
        sid = await new_session(client, alice)
        body = {"model": "gpt-4o", "input": "lost?", "conversation": sid, "stream": stream}
        pending = asyncio.ensure_future(
            client.post("/v1/responses", json=body, headers=alice.headers))
        await asyncio.wait_for(paused.entered.wait(), 10)
        r = await client.delete(f"/v1/chat/sessions/{sid}", headers=alice.headers)
        assert r.status_code == 204
        paused.go.set()
        r = await asyncio.wait_for(pending, 30)
        gone = ConversationGone(sid).message
        if stream:
            assert r.status_code == 200
            last = json.loads(last_event(r.content).split(b"data: ", 1)[1])
            assert last["type"] == "response.failed", last
            assert last["response"]["error"]["message"] == gone
        else:
            assert r.status_code == 404, r.text
            assert r.json()["error"]["message"] == gone
        assert await contents(db, sid) == []
        assert await db.fetchval("SELECT count(*) FROM responses WHERE session_id = $1", sid) == 0
        # Restored, the same conversation takes the next response, once.
        r = await client.post(f"/v1/chat/sessions/{sid}/restore", headers=alice.headers)
        assert r.status_code == 200
        r = await client.post("/v1/responses", json=body, headers=alice.headers)
        assert r.status_code == 200, r.text
        assert (b"response.completed" in r.content) if stream else r.json()["status"] == "completed"
    assert await contents(db, sid) == [("user", "lost?"), ("assistant", "late")]
    assert await db.fetchval("SELECT count(*) FROM responses WHERE session_id = $1", sid) == 1


# --- item 4: retention with a tiny cutoff while a turn runs ------------------------------------


async def test_cleanup_older_than_one_second_keeps_a_session_receiving_a_turn(
    server_url: str, settings: Settings
) -> None:
    async with fresh_database(server_url, "chatproxy_retention_race_") as url:
        conn = await asyncpg.connect(url)
        try:
            user = await make_user(conn)
            paused = Paused(settings, stream=False)
            async with app_client(configured(settings, database_url=url), paused.router) as client:
                busy, idle = await new_session(client, user), await new_session(client, user)
                # Active half an hour ago (too recently for the turn's read to touch it), and
                # three hours ago.
                for sid, idle_for in ((busy, "30 minutes"), (idle, "3 hours")):
                    await conn.execute(
                        f"UPDATE chat_sessions SET updated_at = now() - interval '{idle_for}', "
                        f"created_at = now() - interval '{idle_for}' WHERE id = $1", sid)

                async def cleanup() -> None:
                    done = await cli(url, "cleanup", "--older-than", "1s")
                    assert done.returncode == 0, done.stderr.decode()
                    assert "deleted 1 inactive and 0 soft-deleted sessions" in done.stdout.decode()

                r = await race(client, paused, user, busy, cleanup)
                assert r.status_code == 200, r.text
                assert r.json() == completion("late")
            assert await contents(conn, busy) == [("user", "lost?"), ("assistant", "late")]
            assert await conn.fetchval(
                "SELECT count(*) FROM chat_sessions WHERE id = $1", idle) == 0
        finally:
            await conn.close()


async def test_an_active_session_is_kept_two_hours_whatever_the_cutoff(
    server_url: str
) -> None:
    async with fresh_database(server_url, "chatproxy_retention_floor_") as url:
        conn = await asyncpg.connect(url)
        try:
            user = await make_user(conn)
            ids = {}
            for name, idle, deleted in [("recent", timedelta(hours=1, minutes=59), False),
                                        ("old", timedelta(hours=2, minutes=1), False),
                                        ("deleted", timedelta(minutes=1), True)]:
                ids[name] = await conn.fetchval(
                    "INSERT INTO chat_sessions (id, user_id, max_history_messages, updated_at, "
                    "is_active, deleted_at) VALUES ($1, $2, 20, now() - $3::interval, NOT $4, "
                    "CASE WHEN $4 THEN now() - $3::interval END) RETURNING id",
                    f"sess_{name}", user.id, idle, deleted)
            done = await cli(url, "cleanup", "--older-than", "30s")
            assert done.returncode == 0, done.stderr.decode()
            lines = done.stdout.decode().splitlines()
            assert lines[0].endswith(
                "(active sessions: idle for 2 hours at least, as one may be in a turn)")
            assert lines[1] == "deleted 1 inactive and 1 soft-deleted sessions, with 0 messages"
            left = await conn.fetch("SELECT id FROM chat_sessions")
            assert [r["id"] for r in left] == [ids["recent"]]
        finally:
            await conn.close()


# --- item 11: numbers beyond a 32-bit integer; every failure releases the key ----------------


HUGE = {"prompt_tokens": 1, "completion_tokens": 2**40, "total_tokens": 2**40 + 1}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_huge_completion_token_count_is_stored_clamped_and_replayed(
    settings: Settings, alice: User, db: asyncpg.Connection, stream: bool
) -> None:
    upstream = respx.Router(base_url=settings.upstream_base_url, assert_all_called=False)
    if stream:
        response = httpx.Response(200, headers=SSE, content=sse(chunk("big", usage=HUGE)))
    else:
        response = httpx.Response(200, json=completion("big", usage=HUGE))
    route = upstream.post("/chat/completions").mock(return_value=response)
    key = {"Idempotency-Key": f"huge-usage-{stream}"}
    async with app_client(settings, upstream) as client:
        sid = await new_session(client, alice)
        body = turn(sid, stream=stream)
        first = await client.post("/v1/chat/completions", json=body,
                                  headers={**alice.headers, **key})
        assert first.status_code == 200, first.text
        if stream:
            assert first.content.endswith(b"data: [DONE]\n\n")
        again = await client.post("/v1/chat/completions", json=body,
                                  headers={**alice.headers, **key})
        assert (again.status_code, again.headers["idempotent-replayed"]) == (200, "true")
        assert again.content == first.content
        session = await client.get(f"/v1/chat/sessions/{sid}", headers=alice.headers)
    assert route.call_count == 1
    tokens = await db.fetch(
        "SELECT role, tokens FROM chat_messages WHERE session_id = $1 ORDER BY seq", sid)
    assert [r["role"] for r in tokens] == ["user", "assistant"]
    assert tokens[1]["tokens"] == MAX_TOKENS
    assert session.json()["total_tokens"] == tokens[0]["tokens"] + MAX_TOKENS


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_write_that_fails_unexpectedly_answers_an_error_and_releases_the_key(
    settings: Settings, alice: User, db: asyncpg.Connection, stream: bool,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    upstream = respx.Router(base_url=settings.upstream_base_url, assert_all_called=False)
    content = sse(chunk("ok")) if stream else json.dumps(completion("ok")).encode()
    upstream.post("/chat/completions").mock(return_value=httpx.Response(
        200, headers=SSE if stream else {"content-type": "application/json"}, content=content))
    real = messages.store_turn

    async def broken(*args: Any, **kwargs: Any) -> int:
        raise RuntimeError("a bug in the write")

    key = {**alice.headers, "Idempotency-Key": f"write-bug-{stream}"}
    async with app_client(settings, upstream) as client:
        sid = await new_session(client, alice)
        body = turn(sid, stream=stream)
        monkeypatch.setattr(messages, "store_turn", broken)
        r = await client.post("/v1/chat/completions", json=body, headers=key)
        if stream:  # the stream ends with an error event, never cut without one
            assert r.status_code == 200
            assert last_event(r.content) == error_event(InternalError())
        else:
            assert (r.status_code, r.json()) == (500, InternalError().body())
        monkeypatch.setattr(messages, "store_turn", real)
        again = await client.post("/v1/chat/completions", json=body, headers=key)
        assert again.status_code == 200, again.text  # the key was released: it ran again
        assert "idempotent-replayed" not in again.headers
    assert await contents(db, sid) == [("user", "hi"), ("assistant", "ok")]
    assert "a bug in the write" in caplog.text  # the traceback is logged, not sent


@pytest.mark.timeout(60)
async def test_a_claim_whose_connection_died_is_given_back(
    settings: Settings, relay: Relay, alice: User, db: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The claim's INSERT commits, then its connection is cut before the answer: the request
    gets a 503, and its retry runs (not 409 for 15 minutes)."""
    real = idempotency.try_claim
    cut = {"once": True}

    async def deafened(*args: Any) -> bool:
        if cut.pop("once", False):
            relay.deafen()  # the statement reaches PostgreSQL; its answer never comes back
        return await real(*args)

    monkeypatch.setattr(idempotency, "try_claim", deafened)
    upstream = respx.Router(base_url=settings.upstream_base_url, assert_all_called=False)
    route = upstream.post("/chat/completions").mock(
        return_value=httpx.Response(200, json=completion("ran")))
    key = {**alice.headers, "Idempotency-Key": "claim-cut"}
    one = configured(settings, database_url=relay.url(), db_pool_size=1)  # as above
    async with app_client(one, upstream) as client:
        sid = await new_session(client, alice)
        cut.clear()  # a first claim, untouched, prepares the statement on the connection
        warm = await client.post("/v1/chat/completions", json=turn(sid, "warm"),
                                 headers={**alice.headers, "Idempotency-Key": "warm"})
        assert warm.status_code == 200, warm.text
        cut["once"] = True
        pending = asyncio.ensure_future(
            client.post("/v1/chat/completions", json=turn(sid), headers=key))

        async def claimed() -> bool:
            return await db.fetchval(
                "SELECT count(*) FROM idempotency_keys WHERE user_id = $1 AND key = 'claim-cut'",
                alice.id) == 1 and relay.dropped > 0
        await until(claimed, "the claim committed, its answer dropped")
        await asyncio.to_thread(relay.resume)
        r = await asyncio.wait_for(pending, 30)
        assert (r.status_code, r.json()["error"]["code"]) == (503, "database_unavailable")
        r = await client.post("/v1/chat/completions", json=turn(sid), headers=key)
        assert r.status_code == 200, r.text
    assert route.call_count == 2
    assert await contents(db, sid) == [
        ("user", "warm"), ("assistant", "ran"), ("user", "hi"), ("assistant", "ran")]


@pytest.mark.parametrize("summary_due", [False, True])
async def test_a_stream_closed_before_it_began_closes_the_upstream_and_gives_the_key_back(
    settings: Settings, database_url: str, alice: User, db: asyncpg.Connection,
    summary_due: bool,
) -> None:
    """The door never read the events (its request was cancelled before the body began): the
    relay never ran, yet its upstream response is closed and its claim released; also when
    the engine wraps the events to schedule a summary job after them."""
    closed = asyncio.Event()

    class Body(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield sse(chunk("never read"))

        async def aclose(self) -> None:
            closed.set()

    upstream = respx.Router(base_url=settings.upstream_base_url, assert_all_called=False)
    upstream.post("/chat/completions").mock(
        return_value=httpx.Response(200, headers=SSE, stream=Body()))
    if summary_due:  # a window of one over three stored messages: a summary job is due
        settings = configured(settings, summary_model="gpt-4o-mini")
    http = make_client(settings, transport=httpx.MockTransport(upstream.async_handler))
    sid = await session_of(db, alice)
    if summary_due:
        await db.execute("UPDATE chat_sessions SET max_history_messages = 1 WHERE id = $1", sid)
        await messages.store_turn(db, sid, [messages.NewMessage(
            {"role": "user", "content": f"old {n}"}, 3) for n in range(3)])
    body = turn(sid, stream=True)
    key = Idempotency("never-began", request_hash(sid, json.dumps(body).encode()))
    async with runtime_on(settings, database_url, http) as rt:
        request = TurnRequest(Caller(key_hash=hash_key(alice.key)), sid, dict(body),
                              stream=True, idempotency=key)
        outcome = await run_turn(rt, request)
        assert isinstance(outcome, Streaming)
        wrapped = getattr(outcome.events, "_events", None)
        assert (getattr(wrapped, "__qualname__", "") == "_then_summarise") is summary_due
        assert await db.fetchval("SELECT state FROM idempotency_keys WHERE user_id = $1 "
                                 "AND key = 'never-began'", alice.id) == "running"
        await outcome.events.aclose()
        await settle(rt)
        assert closed.is_set()
    assert await db.fetchval("SELECT count(*) FROM idempotency_keys WHERE user_id = $1 "
                             "AND key = 'never-began'", alice.id) == 0
    assert len(await contents(db, sid)) == (3 if summary_due else 0)
