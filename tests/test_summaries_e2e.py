"""Summaries end to end (contract §11): live `chatproxy serve` processes on the test database,
driven with the official `openai` SDK, and a fake upstream where the summary model is just
another model — one that can answer, fail, or hang until told (or until its caller is gone).

What only real processes show: one summary job per session at a time across two processes
(the fake counts the summary calls running at once), turns that go on unchanged while the
summary model fails or hangs, and a job killed mid-call that the next turn after a restart
schedules again and completes.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import pytest

from proxy.store import messages
from proxy.store.messages import NewMessage
from tests.conftest import UPSTREAM_KEY, User
from tests.fault_helpers import Serve, serve_env
from tests.threaded import Threaded, read_body
from tests.turns import metric

pytestmark = pytest.mark.e2e

SUMMARY = "summ-live"
WITHIN = 30.0  # a hang detector, not a benchmark


class Fake:
    """The upstream: chat models answer `r:<last message>` (streamed when asked); the summary
    model answers `SUMMARY <n>`, or a 500 (`mode` "fail"), or holds the call (`mode` "hang")
    until `release` is set or its caller goes away. `active` / `max_active` count summary calls
    running at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.mode = "ok"
        self.release = threading.Event()
        self.active = 0
        self.max_active = 0
        self.summary_bodies: list[dict[str, Any]] = []
        self.chat_bodies: list[dict[str, Any]] = []
        self._threaded = Threaded(self._app, log_level="warning", loop="asyncio")
        self.url = f"http://127.0.0.1:{self._threaded.port}/v1"

    def reset(self, mode: str = "ok") -> None:
        with self.lock:
            self.mode = mode
            self.max_active = self.active
            self.summary_bodies.clear()
            self.chat_bodies.clear()
        self.release.clear()

    async def _app(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        raw = await read_body(receive)
        body = json.loads(raw) if raw else {}
        if body.get("model") == SUMMARY:
            await self._summary(body, receive, send)
            return
        with self.lock:
            self.chat_bodies.append(body)
        reply = {"role": "assistant", "content": f"r:{body['messages'][-1]['content']}"}
        if body.get("stream"):
            chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1,
                     "model": body["model"], "choices": [
                         {"index": 0, "delta": reply, "finish_reason": "stop"}]}
            events = f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode()
            await _send(send, 200, events, b"text/event-stream")
            return
        await _send(send, 200, _completion(body["model"], reply["content"]))

    async def _summary(self, body: dict[str, Any], receive: Any, send: Any) -> None:
        with self.lock:
            self.summary_bodies.append(body)
            number = len(self.summary_bodies)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            mode = self.mode
        try:
            if mode == "hang":
                gone = asyncio.ensure_future(_disconnected(receive))
                # `release` is a threading.Event, set from the test's thread.
                while not self.release.is_set() and not gone.done():  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
                gone.cancel()
                if not self.release.is_set():
                    return  # the caller went away
            if mode == "fail":
                error = {"error": {"message": "summary model down", "type": "server_error"}}
                await _send(send, 500, json.dumps(error).encode())
                return
            await _send(send, 200, _completion(SUMMARY, f"SUMMARY {number}"))
        finally:
            with self.lock:
                self.active -= 1


async def _disconnected(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _completion(model: str, content: str) -> bytes:
    return json.dumps({
        "id": "chatcmpl-fake", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}}).encode()


async def _send(send: Any, status: int, body: bytes,
                content_type: bytes = b"application/json") -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type)]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def fake() -> Iterator[Fake]:
    upstream = Fake()
    upstream._threaded.start()
    yield upstream
    upstream.release.set()
    upstream._threaded.stop()


def env_for(database_url: str, fake: Fake, tmp: Path) -> dict[str, str]:
    return serve_env(database_url, fake.url, tmp, CHATPROXY_SUMMARY_MODEL=SUMMARY,
                     CHATPROXY_UPSTREAM_API_KEY=UPSTREAM_KEY, CHATPROXY_LOG_LEVEL="info",
                     CHATPROXY_SHUTDOWN_GRACE="2")


@pytest.fixture(scope="module")
def pair(database_url: str, fake: Fake,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Serve, Serve]]:
    """Two `chatproxy serve` processes on one database."""
    servers = []
    for name in ("a", "b"):
        tmp = tmp_path_factory.mktemp(f"summaries-{name}")
        servers.append(Serve(env_for(database_url, fake, tmp), tmp / "serve.log").start())
    try:
        yield servers[0], servers[1]
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
async def sdks(pair: tuple[Serve, Serve], alice: User
               ) -> AsyncIterator[tuple[openai.AsyncOpenAI, openai.AsyncOpenAI]]:
    clients = [openai.AsyncOpenAI(base_url=s.url + "/v1", api_key=alice.key, max_retries=0,
                                  timeout=WITHIN) for s in pair]
    yield clients[0], clients[1]
    for client in clients:
        await client.close()


async def new_session(server: Serve, user: User, **fields: Any) -> str:
    async with httpx.AsyncClient(base_url=server.url, headers=user.headers) as client:
        r = await client.post("/v1/chat/sessions", json=fields)
    assert r.status_code == 201, r.text
    sid: str = r.json()["id"]
    return sid


async def say(sdk: openai.AsyncOpenAI, sid: str, text: str, **extra: Any) -> httpx.Headers:
    raw = await sdk.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": text}],
        extra_body={"session_id": sid}, **extra)
    completion = raw.parse()
    assert completion.choices[0].message.content == f"r:{text}"
    return raw.headers


async def until(check: Any, what: str) -> Any:
    """Poll `check()` (sync or async) until it returns something truthy."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WITHIN
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        assert loop.time() < deadline, f"never: {what}"
        await asyncio.sleep(0.05)


async def summary_row(db: asyncpg.Connection, sid: str) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await db.fetchrow(
        "SELECT text, up_to_seq, tokens FROM chat_summaries WHERE session_id = $1 "
        "AND text IS NOT NULL", sid)
    return row


async def jobs(server: Serve, outcome: str) -> float:
    async with httpx.AsyncClient() as client:
        text = (await client.get(server.url + "/metrics")).text
    return metric(text, "chatproxy_summary_jobs_total", outcome=outcome)


def summaries_in(body: dict[str, Any]) -> list[int]:
    """Where the chat call carried a summary message (indexes into its messages)."""
    return [i for i, m in enumerate(body["messages"]) if m["role"] == "system"
            and str(m["content"]).startswith("Summary of the earlier conversation:\n")]


async def test_the_summary_covers_what_was_dropped_and_goes_in_once_within_the_budget(
    fake: Fake, sdks: tuple[openai.AsyncOpenAI, openai.AsyncOpenAI], pair: tuple[Serve, Serve],
    db: asyncpg.Connection, alice: User,
) -> None:
    fake.reset()
    sdk = sdks[0]
    sid = await new_session(pair[0], alice, system_prompt="be brief", max_history_messages=4,
                            max_history_tokens=400)
    for i in range(1, 5):
        await say(sdk, sid, f"u{i}")  # the 4th leaves out u1 and its reply
    row = await until(lambda: summary_row(db, sid), "a summary")
    assert (row["text"], row["up_to_seq"]) == ("SUMMARY 1", 6)
    folded = fake.summary_bodies[0]["messages"][1]["content"]
    assert "user: u1\nassistant: r:u1\n" in folded and folded.endswith("assistant: r:u3")

    headers = await say(sdk, sid, "u5", stream=False)
    body = fake.chat_bodies[-1]
    assert summaries_in(body) == [1]  # once, right after the head
    assert body["messages"][1]["content"] == "Summary of the earlier conversation:\nSUMMARY 1"
    assert headers["x-history-summary-seq"] == "6"
    assert int(headers["x-history-tokens"]) + row["tokens"] <= 400
    stream = await sdk.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "u6"}],
        extra_body={"session_id": sid}, stream=True)
    assert "".join([c.choices[0].delta.content or "" async for c in stream]) == "r:u6"
    assert summaries_in(fake.chat_bodies[-1]) == [1]
    assert len(fake.summary_bodies) == 1  # a window's worth later, not per turn


async def test_two_processes_run_one_job_per_session_at_a_time(
    fake: Fake, sdks: tuple[openai.AsyncOpenAI, openai.AsyncOpenAI], pair: tuple[Serve, Serve],
    db: asyncpg.Connection, alice: User,
) -> None:
    fake.reset("hang")
    sid = await new_session(pair[0], alice, max_history_messages=2)
    await messages.store_turn(db, sid, [NewMessage({"role": r, "content": f"m{i}"}, 10)
                                        for i, r in enumerate(["user", "assistant"] * 2)])
    busy_before = await jobs(pair[1], "busy")
    await say(sdks[0], sid, "via a")  # a's job: its summary call hangs
    await until(lambda: fake.active == 1, "a summary call")
    await say(sdks[1], sid, "via b")  # b finds the summary behind too: its job finds a's lock
    async def gave_way() -> bool:
        return await jobs(pair[1], "busy") > busy_before

    await until(gave_way, "b's job giving way")
    assert await jobs(pair[1], "busy") == busy_before + 1
    assert (fake.active, len(fake.summary_bodies)) == (1, 1)
    fake.release.set()
    row = await until(lambda: summary_row(db, sid), "a's summary")
    assert row["up_to_seq"] == 4
    # More turns through both at once: each may start a job; never two calls at a time.
    fake.reset("ok")
    await asyncio.gather(*(say(sdks[i % 2], sid, f"t{i}") for i in range(8)))
    await until(lambda: fake.active == 0, "the jobs ending")
    assert fake.max_active <= 1


async def test_a_failing_or_hanging_summary_model_leaves_every_turn_unchanged(
    fake: Fake, sdks: tuple[openai.AsyncOpenAI, openai.AsyncOpenAI], pair: tuple[Serve, Serve],
    db: asyncpg.Connection, alice: User,
) -> None:
    for mode in ("fail", "hang"):
        fake.reset(mode)
        sid = await new_session(pair[0], alice, max_history_messages=2)
        for i in range(1, 6):
            headers = await say(sdks[0], sid, f"{mode}-secret-{i}")
            assert "x-history-summary-seq" not in headers
            previous = [f"{mode}-secret-{i - 1}", f"r:{mode}-secret-{i - 1}"] if i > 1 else []
            assert [m["content"] for m in fake.chat_bodies[-1]["messages"]] == [
                *previous, f"{mode}-secret-{i}"]
        assert await db.fetchval("SELECT count(*) FROM chat_messages WHERE session_id = $1",
                                 sid) == 10
        assert len(fake.summary_bodies) == 1  # backing off, or still running: one call
        fake.release.set()
    log = pair[0].log()
    assert "summary job for session" in log and "failed" in log
    assert "secret" not in log and "summary model down" not in log


async def test_a_job_killed_mid_call_is_done_by_a_turn_after_the_restart(
    fake: Fake, pair: tuple[Serve, Serve], db: asyncpg.Connection, alice: User,
) -> None:
    fake.reset("hang")
    server = pair[0]
    sid = await new_session(server, alice, max_history_messages=2)
    await messages.store_turn(db, sid, [NewMessage({"role": r, "content": f"m{i}"}, 10)
                                        for i, r in enumerate(["user", "assistant"] * 2)])
    async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=alice.key,
                                  max_retries=0, timeout=WITHIN) as sdk:
        await say(sdk, sid, "before")
    await until(lambda: fake.active == 1, "the summary call")
    assert server.process is not None
    server.process.kill()  # no graceful shutdown: the job dies holding its lock
    server.process.wait(timeout=WITHIN)
    await until(lambda: fake.active == 0, "the fake seeing its caller gone")
    fake.reset("ok")
    server.start()
    async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=alice.key,
                                  max_retries=0, timeout=WITHIN) as sdk:
        await say(sdk, sid, "after")  # finds the summary behind: schedules it again
    row = await until(lambda: summary_row(db, sid), "the summary after the restart")
    assert (row["text"], row["up_to_seq"]) == ("SUMMARY 1", 6)
