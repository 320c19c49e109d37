"""Summaries of what a session's turns leave out (contract §11): when a job is due, what the
summary model reads, how a later turn carries the summary (once, right after the head, within
the budget), and what a failing summary model changes for the turns (nothing).

The app runs in the test's own loop (tests/fault_helpers.py `app_client`), so its background
jobs can be awaited; the upstream is respx, with the summary model as just another model.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from proxy import metrics
from proxy.config import Settings
from proxy.mcp import text as mcptext
from proxy.mcp import tools as mcptools
from proxy.store import messages
from proxy.store.messages import NewMessage
from proxy.summaries import lock_key
from tests.conftest import User, configured
from tests.fault_helpers import LiveClient, app_client
from tests.summary_helpers import (
    SUMMARY_MODEL,
    Upstream,
    jobs_done,
    material,
    put_summary,
    seed,
    summary_in,
)
from tests.turns import a, metric, new_session, u

PROMPT = "Summarise for the test."


@pytest.fixture
def fake() -> Upstream:
    return Upstream()


@pytest.fixture
def on(settings: Settings) -> Settings:
    return configured(settings, summary_model=SUMMARY_MODEL, summary_prompt=PROMPT)


async def turn(
    client: LiveClient, user: User, sid: str, text: str, **extra: object
) -> dict[str, str]:
    """One turn, and whatever summary job it started, done."""
    r = await client.post("/v1/chat/completions", headers=user.headers, json={
        "model": "gpt-4o", "session_id": sid, "messages": [u(text)], **extra})
    assert r.status_code == 200, r.text
    await jobs_done(client.app.state.rt)
    return dict(r.headers)


async def test_a_summary_covers_what_turns_leave_out_and_later_turns_carry_it_once(
    on: Settings, fake: Upstream, db: asyncpg.Connection, alice: User
) -> None:
    async with app_client(on, fake.router) as proxy:
        sid = await new_session(proxy, alice, system_prompt="be brief", max_history_messages=4)
        for i in (1, 2, 3):
            await turn(proxy, alice, sid, f"u{i}")
        assert fake.summary_bodies == []  # nothing left out yet
        await turn(proxy, alice, sid, "u4")  # leaves out u1, r:u1: a job, over all it read
        assert len(fake.summary_bodies) == 1
        first = fake.summary_bodies[0]
        assert first["model"] == SUMMARY_MODEL
        assert first["messages"][0] == {"role": "system", "content": PROMPT}
        assert material(first) == (
            "The summary so far:\n(none yet)\n\nNew messages, oldest first:\n"
            "user: u1\nassistant: r:u1\nuser: u2\nassistant: r:u2\nuser: u3\nassistant: r:u3")
        row = await db.fetchrow("SELECT text, up_to_seq, model FROM chat_summaries "
                                "WHERE session_id = $1", sid)
        assert dict(row) == {"text": "SUMMARY 1", "up_to_seq": 6, "model": SUMMARY_MODEL}
        key = lock_key(sid) & 0xFFFF_FFFF_FFFF_FFFF
        held = await db.fetchval(  # the job's lock went with it, not on to a pooled connection
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = $1::oid "
            "AND objid = $2::oid AND objsubid = 1", key >> 32, key & 0xFFFF_FFFF)
        assert held == 0

        headers = await turn(proxy, alice, sid, "u5")
        assert fake.chat_bodies[-1]["messages"] == [
            {"role": "system", "content": "be brief"},
            {"role": "system", "content": "Summary of the earlier conversation:\nSUMMARY 1"},
            u("u3"), a("r:u3"), u("u4"), a("r:u4"), u("u5"),
        ]
        assert headers["x-history-summary-seq"] == "6"
        assert (headers["x-history-messages"], headers["x-history-dropped"]) == ("4", "0")
        await turn(proxy, alice, sid, "u6")
        assert len(fake.summary_bodies) == 1  # still covered: no call per turn
        assert summary_in(fake.chat_bodies[-1]) == [
            "Summary of the earlier conversation:\nSUMMARY 1"]

        await turn(proxy, alice, sid, "u7")  # leaves out u4 (seq 7), newer than the summary
        assert len(fake.summary_bodies) == 2
        assert material(fake.summary_bodies[1]) == (
            "The summary so far:\nSUMMARY 1\n\nNew messages, oldest first:\n"
            "user: u4\nassistant: r:u4\nuser: u5\nassistant: r:u5\nuser: u6\nassistant: r:u6")
        headers = await turn(proxy, alice, sid, "u8")
        assert headers["x-history-summary-seq"] == "12"
        assert summary_in(fake.chat_bodies[-1]) == [
            "Summary of the earlier conversation:\nSUMMARY 2"]
        text = metrics.render().decode()
        assert metric(text, "chatproxy_summary_jobs_total", outcome="stored") >= 2


async def test_the_summary_counts_in_the_budget_and_stays_out_when_it_does_not_fit(
    on: Settings, fake: Upstream, db: asyncpg.Connection, alice: User
) -> None:
    async with app_client(on, fake.router) as proxy:
        sid = await new_session(proxy, alice, max_history_messages=8, max_history_tokens=700)
        await seed(db, sid, 10)  # m0..m9, 100 tokens each; the window is m2..m9
        await put_summary(db, sid, "what came before", 2, 250)
        headers = await turn(proxy, alice, sid, "next")
        body = fake.chat_bodies[-1]
        assert summary_in(body) == ["Summary of the earlier conversation:\nwhat came before"]
        history = [m["content"] for m in body["messages"][1:-1]]
        assert history == ["m6", "m7", "m8", "m9"]  # 700 - 250 leaves room for 4 of 100
        assert (headers["x-history-tokens"], headers["x-history-summary-seq"]) == ("400", "2")
        # That turn left m2..m5 out (newer than the summary): a job made the summary whole again.
        assert len(fake.summary_bodies) == 1

        await db.execute("UPDATE chat_summaries SET tokens = 800, up_to_seq = 2, text = 'big' "
                         "WHERE session_id = $1", sid)
        headers = await turn(proxy, alice, sid, "again")
        body = fake.chat_bodies[-1]
        assert summary_in(body) == []  # 800 > 700: left out, and the history is as without it
        assert [m["content"] for m in body["messages"]] == [
            "m4", "m5", "m6", "m7", "m8", "m9", "next", "r:next", "again"]  # the whole window
        assert "x-history-summary-seq" not in headers


async def test_no_summary_when_nothing_is_left_out_or_summaries_are_off(
    settings: Settings, on: Settings, fake: Upstream, db: asyncpg.Connection, alice: User
) -> None:
    async with app_client(on, fake.router) as proxy:
        sid = await new_session(proxy, alice)
        await seed(db, sid, 3)
        await put_summary(db, sid, "covers m0 and m1", 2, 20)
        headers = await turn(proxy, alice, sid, "next")
        assert summary_in(fake.chat_bodies[-1]) == []  # all three are sent
        assert "x-history-summary-seq" not in headers

        off = Upstream()
        async with app_client(settings, off.router) as plain:  # no CHATPROXY_SUMMARY_MODEL
            sid = await new_session(plain, alice, max_history_messages=2)
            await seed(db, sid, 6)
            await put_summary(db, sid, "s", 4, 20)
            headers = await turn(plain, alice, sid, "next")
            assert summary_in(off.chat_bodies[-1]) == []
            assert "x-history-summary-seq" not in headers
            assert off.summary_bodies == [] and not plain.app.state.rt.summary_jobs


async def test_tool_exchanges_reach_the_summary_model_as_text(
    on: Settings, fake: Upstream, db: asyncpg.Connection, alice: User
) -> None:
    async with app_client(on, fake.router) as proxy:
        sid = await new_session(proxy, alice, max_history_messages=2)
        call = {"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}
        await messages.store_turn(db, sid, [
            NewMessage(u("weather in Paris?"), 10),
            NewMessage({"role": "assistant", "content": None, "tool_calls": [call]}, 20),
            NewMessage({"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"}, 10),
            NewMessage({"role": "assistant", "content": [{"type": "text", "text": "18C."}]}, 10),
        ])
        await turn(proxy, alice, sid, "thanks")
        assert material(fake.summary_bodies[0]).endswith(
            "user: weather in Paris?\n"
            "assistant: [calls get_weather({\"city\": \"Paris\"})]\n"
            "tool result for call_1: 18C, sunny\n"
            "assistant: 18C.")
        await turn(proxy, alice, sid, "bye")
        carried = [m for m in fake.chat_bodies[-1]["messages"] if m["role"] == "system"]
        assert carried == [{"role": "system",
                            "content": "Summary of the earlier conversation:\nSUMMARY 1"}]


async def test_a_failing_summary_model_changes_no_turn_and_is_retried_after_a_back_off(
    on: Settings, fake: Upstream, db: asyncpg.Connection, alice: User,
    captured: object,
) -> None:
    async with app_client(on, fake.router) as proxy:
        fake.failing = True
        sid = await new_session(proxy, alice, max_history_messages=2)
        for i in range(1, 5):
            headers = await turn(proxy, alice, sid, f"secret-{i}")
            assert "x-history-summary-seq" not in headers
        # Every turn went through as without summaries: the window, nothing else.
        assert fake.chat_bodies[-1]["messages"] == [u("secret-3"), a("r:secret-3"), u("secret-4")]
        assert len(fake.summary_bodies) == 1  # backing off: not one call per turn
        row = await db.fetchrow("SELECT text, failures, retry_after > now() AS waiting "
                                "FROM chat_summaries WHERE session_id = $1", sid)
        assert dict(row) == {"text": None, "failures": 1, "waiting": True}
        logged = captured.getvalue()  # type: ignore[attr-defined]
        assert f"summary job for session {sid} failed" in logged
        assert "secret" not in logged and "summary model down" not in logged
        text = metrics.render().decode()
        assert metric(text, "chatproxy_summary_jobs_total", outcome="failed") >= 1

        fake.failing = False
        await db.execute("UPDATE chat_summaries SET retry_after = now() - interval '1 second' "
                         "WHERE session_id = $1", sid)
        await turn(proxy, alice, sid, "secret-5")
        row = await db.fetchrow("SELECT text, up_to_seq, failures, retry_after FROM chat_summaries "
                                "WHERE session_id = $1", sid)
        assert dict(row) == {"text": "SUMMARY 2", "up_to_seq": 8, "failures": 0,
                             "retry_after": None}


async def test_the_back_off_doubles_with_each_failure(
    on: Settings, fake: Upstream, db: asyncpg.Connection, alice: User
) -> None:
    async with app_client(on, fake.router) as proxy:
        fake.failing = True
        sid = await new_session(proxy, alice, max_history_messages=2)
        await seed(db, sid, 4)
        waits = []
        for _ in range(3):
            await db.execute("UPDATE chat_summaries SET retry_after = now() WHERE session_id = $1",
                             sid)
            before = datetime.now(UTC)
            await turn(proxy, alice, sid, "again")
            after = await db.fetchval(
                "SELECT retry_after FROM chat_summaries WHERE session_id = $1", sid)
            waits.append(after - before)
        assert [round(w / timedelta(seconds=30)) for w in waits] == [1, 2, 4]


async def test_a_summary_written_while_the_session_is_cleared_is_not_kept(
    on: Settings, fake: Upstream, db: asyncpg.Connection, alice: User
) -> None:
    async with app_client(on, fake.router) as proxy:
        fake.gated = True
        sid = await new_session(proxy, alice, max_history_messages=2)
        await seed(db, sid, 4)
        r = await proxy.post("/v1/chat/completions", headers=alice.headers, json={
            "model": "gpt-4o", "session_id": sid, "messages": [u("go")]})
        assert r.status_code == 200
        await fake.started.wait()  # the job's call is at the summary model
        cleared = await proxy.delete(f"/v1/chat/sessions/{sid}/messages", headers=alice.headers)
        assert cleared.status_code == 204
        fake.gate.set()
        await jobs_done(proxy.app.state.rt)
        assert await db.fetchval("SELECT count(*) FROM chat_summaries WHERE session_id = $1",
                                 sid) == 0


async def test_a_streamed_turn_starts_its_job_once_its_stream_is_done(
    on: Settings, fake: Upstream, db: asyncpg.Connection, alice: User
) -> None:
    async with app_client(on, fake.router) as proxy:
        sid = await new_session(proxy, alice, max_history_messages=2)
        await seed(db, sid, 4)
        headers = await turn(proxy, alice, sid, "streamed", stream=True)
        assert headers["content-type"].startswith("text/event-stream")
        assert await db.fetchval("SELECT up_to_seq FROM chat_summaries WHERE session_id = $1",
                                 sid) == 4
        assert material(fake.summary_bodies[0]).endswith("user: m0\nassistant: m1\nuser: m2\n"
                                                         "assistant: m3")


@pytest.mark.parametrize("summaries", ["on", "off"])
async def test_mcp_resume_session_shows_the_summary_a_turn_would_carry(
    settings: Settings, on: Settings, alice: User, db: asyncpg.Connection, fake: Upstream,
    summaries: str,
) -> None:
    """resume_session answers what a turn would be sent, by the turn's own rules: with
    summaries on, the session's summary of what the window leaves out, and the same history a
    turn on the session gets (its upstream body, side by side)."""
    chosen = on if summaries == "on" else settings
    async with app_client(chosen, fake.router) as client:
        sid = await new_session(client, alice, max_history_messages=4)
        await seed(db, sid, 10)
        await put_summary(db, sid, "they talked of m0 to m5", 6, 50)
        resumed = await mcptools.resume_session(client.app.state.rt, alice.id, sid)
        await turn(client, alice, sid, "next")
    sent = fake.chat_bodies[-1]
    carried = summary_in(sent)
    assert [m["seq"] for m in resumed["messages"]] == [7, 8, 9, 10]
    assert [m["content"] for m in resumed["messages"]] == [
        m["content"] for m in sent["messages"] if m["role"] != "system"][:4]
    if summaries == "on":
        assert resumed["summary"] == {"text": "they talked of m0 to m5", "up_to_seq": 6,
                                      "tokens": 50}
        assert carried == ["Summary of the earlier conversation:\nthey talked of m0 to m5"]
        assert "they talked of m0 to m5" in mcptext.resumed(resumed)
    else:
        assert resumed["summary"] is None and carried == []
