"""A session's summary on the API (contract §5, §11): `GET .../summary`, `POST .../compact`,
`summary` on the session object, and what export, import, fork, clear, delete and merge do
with it."""

from __future__ import annotations

from typing import Any

import asyncpg
import httpx
import pytest

from proxy import codec
from proxy.config import Settings
from proxy.summaries import lock_key
from tests.conftest import User, configured
from tests.fault_helpers import app_client
from tests.summary_helpers import SUMMARY_MODEL, Upstream, put_summary, seed
from tests.turns import Client, new_session

PREFIXES = ["/v1/chat/sessions", "/chat/sessions"]


@pytest.fixture
def on(settings: Settings) -> Settings:
    return configured(settings, summary_model=SUMMARY_MODEL)


async def summary_of(client: Client | httpx.AsyncClient, user: User, sid: str,
                     prefix: str = "/v1/chat/sessions") -> httpx.Response:
    return await client.get(f"{prefix}/{sid}/summary", headers=user.headers)


async def session_of(client: Client, user: User, sid: str) -> dict[str, Any]:
    r = await client.get(f"/v1/chat/sessions/{sid}", headers=user.headers)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_get_answers_the_summary_or_404(
    client: Client, db: asyncpg.Connection, alice: User, bob: User, prefix: str
) -> None:
    sid = await new_session(client, alice)
    r = await summary_of(client, alice, sid, prefix)
    assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found")
    assert (await session_of(client, alice, sid))["summary"] is None

    await seed(db, sid, 4)
    await put_summary(db, sid, "text \u0000 \ud800 kept", 3, 42)
    r = await summary_of(client, alice, sid, prefix)
    assert r.status_code == 200
    body = r.json()
    assert body == {"text": "text \u0000 \ud800 kept", "up_to_seq": 3, "tokens": 42,
                    "model": "hand-made", "updated_at": body["updated_at"]}
    session = await session_of(client, alice, sid)
    assert session["summary"] == {"up_to_seq": 3, "tokens": 42, "updated_at": body["updated_at"]}
    listed = await client.get("/v1/chat/sessions", headers=alice.headers)
    assert [s["summary"] for s in listed.json()["data"] if s["id"] == sid] == [session["summary"]]

    for other in (await summary_of(client, bob, sid, prefix),
                  await summary_of(client, alice, "sess_nope", prefix)):
        assert (other.status_code, other.json()["error"]["code"]) == (404, "session_not_found")


async def test_compact_needs_summaries_on(client: Client, alice: User) -> None:
    sid = await new_session(client, alice)
    r = await client.post(f"/v1/chat/sessions/{sid}/compact", headers=alice.headers)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "summaries_off"
    assert "CHATPROXY_SUMMARY_MODEL" in r.json()["error"]["message"]


async def test_compact_summarises_everything_before_the_window_now(
    on: Settings, db: asyncpg.Connection, alice: User, bob: User
) -> None:
    fake = Upstream()
    async with app_client(on, fake.router) as proxy:
        sid = await new_session(proxy, alice, max_history_messages=4)
        r = await proxy.post(f"/chat/sessions/{sid}/compact", headers=alice.headers)
        assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found")  # nothing yet
        await seed(db, sid, 10)
        r = await proxy.post(f"/chat/sessions/{sid}/compact", headers=alice.headers, json={})
        assert r.status_code == 200, r.text
        assert r.json() == {"text": "SUMMARY 1", "up_to_seq": 6, "tokens": r.json()["tokens"],
                            "model": SUMMARY_MODEL, "updated_at": r.json()["updated_at"]}
        assert r.json()["tokens"] > 0
        assert (await summary_of(proxy, alice, sid)).json() == r.json()
        assert len(fake.summary_bodies) == 1
        again = await proxy.post(f"/chat/sessions/{sid}/compact", headers=alice.headers)
        assert again.json() == r.json() and len(fake.summary_bodies) == 1  # nothing new

        bad = await proxy.post(f"/chat/sessions/{sid}/compact", headers=alice.headers,
                               json={"model": "x"})
        assert (bad.status_code, bad.json()["error"]["code"]) == (400, "unknown_parameter")
        foreign = await proxy.post(f"/chat/sessions/{sid}/compact", headers=bob.headers)
        assert (foreign.status_code, foreign.json()["error"]["code"]) == (
            404, "session_not_found")


async def test_compact_passes_the_upstreams_error_and_waits_for_no_running_job(
    on: Settings, db: asyncpg.Connection, alice: User
) -> None:
    fake = Upstream()
    fake.failing = True
    async with app_client(on, fake.router) as proxy:
        sid = await new_session(proxy, alice, max_history_messages=2)
        await seed(db, sid, 4)
        r = await proxy.post(f"/v1/chat/sessions/{sid}/compact", headers=alice.headers)
        assert r.status_code == 500
        assert r.json() == {"error": {"message": "summary model down", "type": "server_error"}}
        # A compaction that failed sets no back-off: the background job is not held up by it.
        assert await db.fetchval("SELECT count(*) FROM chat_summaries WHERE session_id = $1",
                                 sid) == 0

        fake.failing = False
        await db.execute("SELECT pg_advisory_lock($1)", lock_key(sid))  # a job elsewhere
        try:
            r = await proxy.post(f"/v1/chat/sessions/{sid}/compact", headers=alice.headers)
            assert (r.status_code, r.json()["error"]["code"]) == (409, "conflict")
        finally:
            await db.execute("SELECT pg_advisory_unlock($1)", lock_key(sid))
        r = await proxy.post(f"/v1/chat/sessions/{sid}/compact", headers=alice.headers)
        assert r.status_code == 200 and r.json()["up_to_seq"] == 2


async def test_export_and_import_carry_the_summary(
    client: Client, db: asyncpg.Connection, alice: User
) -> None:
    sid = await new_session(client, alice)
    await seed(db, sid, 6)
    await db.execute("DELETE FROM chat_messages WHERE session_id = $1 AND seq <= 2", sid)
    await put_summary(db, sid, "earlier \ud800", 4, 17)  # covers 1..4, of which 3 and 4 remain
    exported = codec.loads((await client.get(f"/v1/chat/sessions/{sid}/export",
                                             headers=alice.headers)).content)
    assert exported["summary"] == {"text": "earlier \ud800", "up_to_seq": 4, "tokens": 17,
                                   "model": "hand-made",
                                   "updated_at": exported["summary"]["updated_at"]}
    r = await client.post("/v1/chat/sessions/import", content=codec.dumps(exported),
                          headers={**alice.headers, "content-type": "application/json"})
    assert r.status_code == 201, r.text
    copy = r.json()["id"]
    imported = codec.loads((await summary_of(client, alice, copy)).content)
    # The import renumbers messages 3..6 as 1..4: the summary follows its last message (4 → 2).
    assert imported == {**exported["summary"], "up_to_seq": 2}

    no_seqs = {**exported, "messages": [{"role": m["role"], "content": m["content"]}
                                        for m in exported["messages"]],
               "summary": {"text": "hand written", "up_to_seq": 3}}
    r = await client.post("/v1/chat/sessions/import", content=codec.dumps(no_seqs),
                          headers={**alice.headers, "content-type": "application/json"})
    assert r.status_code == 201, r.text
    counted = (await summary_of(client, alice, r.json()["id"])).json()
    assert (counted["up_to_seq"], counted["model"]) == (3, None)
    assert counted["tokens"] > 0  # counted, as a message's tokens are


@pytest.mark.parametrize(("summary", "param"), [
    ({"up_to_seq": 1}, "summary.text"),
    ({"text": 5, "up_to_seq": 1}, "summary.text"),
    ({"text": "s", "up_to_seq": -1}, "summary.up_to_seq"),
    ({"text": "s", "up_to_seq": 1, "tokens": "many"}, "summary.tokens"),
    ({"text": "s", "up_to_seq": 9}, "summary.up_to_seq"),  # beyond the document's 2 messages
    ("text", "summary"),
])
async def test_an_import_with_a_bad_summary_is_refused_whole(
    client: Client, db: asyncpg.Connection, alice: User, summary: Any, param: str
) -> None:
    before = await db.fetchval("SELECT count(*) FROM chat_sessions")
    doc = {"format": "chatproxy.session.v1", "session": {}, "summary": summary,
           "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    r = await client.post("/v1/chat/sessions/import", headers=alice.headers, json=doc)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert await db.fetchval("SELECT count(*) FROM chat_sessions") == before


async def test_fork_keeps_a_summary_of_copied_messages_only(
    client: Client, db: asyncpg.Connection, alice: User
) -> None:
    sid = await new_session(client, alice)
    await seed(db, sid, 6)
    await put_summary(db, sid, "first four", 4, 9)
    for up_to, kept in ((4, True), (6, True), (3, False)):
        r = await client.post(f"/v1/chat/sessions/{sid}/fork", headers=alice.headers,
                              json={"up_to_seq": up_to})
        assert r.status_code == 201, r.text
        fork = r.json()
        assert (fork["summary"] is not None) is kept, up_to
        got = await summary_of(client, alice, fork["id"])
        assert got.status_code == (200 if kept else 404)


async def test_clear_drops_the_summary_and_delete_restore_keeps_it(
    client: Client, db: asyncpg.Connection, alice: User
) -> None:
    sid = await new_session(client, alice)
    await seed(db, sid, 4)
    await put_summary(db, sid, "kept", 2, 5)
    assert (await client.delete(f"/v1/chat/sessions/{sid}", headers=alice.headers)
            ).status_code == 204
    assert (await summary_of(client, alice, sid)).status_code == 404  # the session is gone
    restored = await client.post(f"/v1/chat/sessions/{sid}/restore", headers=alice.headers)
    assert restored.json()["summary"]["up_to_seq"] == 2
    assert (await summary_of(client, alice, sid)).json()["text"] == "kept"

    assert (await client.delete(f"/v1/chat/sessions/{sid}/messages", headers=alice.headers)
            ).status_code == 204
    assert (await summary_of(client, alice, sid)).status_code == 404
    assert (await session_of(client, alice, sid))["summary"] is None
    assert await db.fetchval("SELECT count(*) FROM chat_summaries WHERE session_id = $1",
                             sid) == 0


async def test_purging_a_session_takes_its_summary(
    client: Client, db: asyncpg.Connection, alice: User
) -> None:
    sid = await new_session(client, alice)
    await seed(db, sid, 2)
    await put_summary(db, sid, "gone with it", 1, 5)
    await db.execute("DELETE FROM chat_sessions WHERE id = $1", sid)  # what retention runs
    assert await db.fetchval("SELECT count(*) FROM chat_summaries WHERE session_id = $1",
                             sid) == 0


async def test_merge_keeps_the_targets_summary_and_not_the_sources(
    client: Client, db: asyncpg.Connection, alice: User
) -> None:
    target, source = await new_session(client, alice), await new_session(client, alice)
    await seed(db, target, 4)
    await seed(db, source, 4)
    await put_summary(db, target, "target's", 2, 5)
    await put_summary(db, source, "source's", 4, 5)
    r = await client.post(f"/v1/chat/sessions/{target}/merge", headers=alice.headers,
                          json={"source_session_id": source})
    assert r.status_code == 200, r.text
    assert r.json()["summary"]["up_to_seq"] == 2
    assert (await summary_of(client, alice, target)).json()["text"] == "target's"
    restored = await client.post(f"/v1/chat/sessions/{source}/restore", headers=alice.headers)
    assert restored.json()["summary"]["up_to_seq"] == 4  # the source is whole again
