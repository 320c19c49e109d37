"""Search (contract §12): `GET /v1/chat/search`, `GET /v1/chat/sessions?q=`, what is indexed
when a message is stored by a turn, an import, a fork or a merge, and hostile queries."""

from __future__ import annotations

from typing import Any

import asyncpg
import httpx
import pytest
import respx

from proxy.store import messages
from proxy.store.messages import NewMessage
from tests.conftest import User
from tests.turns import Client, chat, completion, new_session, u

Json = dict[str, Any]


@pytest.fixture(params=["/v1/chat/search", "/chat/search"], ids=["v1", "bare"])
def search_path(request: pytest.FixtureRequest) -> str:
    path: str = request.param
    return path


async def store(db: asyncpg.Connection, sid: str, *bodies: Json) -> None:
    turn = [NewMessage(body, tokens=3) for body in bodies]
    assert await messages.store_turn(db, sid, turn) == len(bodies)


async def find(client: Client, user: User, q: str, path: str = "/v1/chat/search",
               **params: Any) -> Json:
    r = await client.get(path, headers=user.headers, params={"q": q, **params})
    assert r.status_code == 200, r.text
    body: Json = r.json()
    return body


def hits(body: Json) -> list[tuple[str, int]]:
    return [(h["session_id"], h["seq"]) for h in body["data"]]


def bad(message: str, param: str | None, code: str = "invalid_value") -> Json:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param,
                      "code": code}}


# --- what matches ---------------------------------------------------------------------------


async def test_a_turn_is_found_by_prefixes_of_every_word_case_insensitively(
    client: Client, upstream: respx.Router, alice: User, search_path: str
) -> None:
    upstream.post("/chat/completions").mock(return_value=httpx.Response(
        200, json=completion("The DEPLOYMENT finished at noon.")))
    sid = await new_session(client, alice, session_name="Ops")
    r = await chat(client, alice, sid, u("How is the Kubernetes deploy going?"))
    assert r.status_code == 200

    body = await find(client, alice, "kube DEPLOY", search_path)
    assert body["object"] == "list" and body["has_more"] is False
    assert body["next_cursor"] is None
    (hit,) = body["data"]
    assert hit == {"session_id": sid, "session_name": "Ops", "message_id": hit["message_id"],
                   "seq": 1, "role": "user", "snippet": "How is the Kubernetes deploy going?",
                   "created_at": hit["created_at"]}
    assert hit["message_id"].startswith("msg_")
    # "deploy" is a prefix of both messages' words; "noon" only of the reply's.
    assert hits(await find(client, alice, "deploy", search_path)) == [(sid, 2), (sid, 1)]
    assert hits(await find(client, alice, "deployment noon", search_path)) == [(sid, 2)]
    # Every word must match: a word found nowhere finds nothing.
    assert hits(await find(client, alice, "deploy zebra", search_path)) == []
    # A prefix only: the middle or the end of a word does not match.
    assert hits(await find(client, alice, "ployment", search_path)) == []


async def test_text_parts_tool_arguments_and_non_latin_words_are_searchable(
    client: Client, alice: User, db: asyncpg.Connection
) -> None:
    sid = await new_session(client, alice)
    await store(
        db, sid,
        {"role": "user", "content": [{"type": "text", "text": "Météo à Zürich?"},
                                     {"type": "image_url", "image_url": {"url": "x"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Reykjavík"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "ПРИВЕТ мир, 12°C"},
    )
    assert hits(await find(client, alice, "zur")) == []  # ü is not u
    assert hits(await find(client, alice, "ZÜRICH météo")) == [(sid, 1)]
    call = await find(client, alice, "reykj")
    assert hits(call) == [(sid, 2)]
    assert call["data"][0]["snippet"] == '{"city": "Reykjavík"}'
    assert hits(await find(client, alice, "привет")) == [(sid, 3)]
    # The function's name is not text the search looks at; the URL of an image part neither.
    assert hits(await find(client, alice, "get_weather")) == []
    assert hits(await find(client, alice, "image")) == []


async def test_searching_is_scoped_to_the_callers_active_sessions(
    client: Client, alice: User, bob: User, db: asyncpg.Connection
) -> None:
    mine = await new_session(client, alice)
    other = await new_session(client, alice)
    theirs = await new_session(client, bob)
    for sid in (mine, other, theirs):
        await store(db, sid, u("a shared secret word: platypus"))
    assert sorted(hits(await find(client, alice, "platypus"))) == sorted(
        [(mine, 1), (other, 1)])
    assert hits(await find(client, bob, "platypus")) == [(theirs, 1)]
    assert hits(await find(client, alice, "platypus", session_id=mine)) == [(mine, 1)]

    # Another user's session, a missing one, a malformed one: the same 404 as everywhere.
    for sid, shown in ((theirs, theirs), ("sess_nope", "sess_nope"),
                       ("x'; DROP", "(malformed id)")):
        r = await client.get("/v1/chat/search", headers=alice.headers,
                             params={"q": "platypus", "session_id": sid})
        assert r.status_code == 404
        assert r.json() == {"error": {"message": f"Session {shown} not found",
                                      "type": "invalid_request_error", "param": "session_id",
                                      "code": "session_not_found"}}

    # A deleted session's messages are not found (until it is restored).
    assert (await client.delete(f"/v1/chat/sessions/{other}", headers=alice.headers)
            ).status_code == 204
    assert hits(await find(client, alice, "platypus")) == [(mine, 1)]
    assert (await client.post(f"/v1/chat/sessions/{other}/restore", headers=alice.headers)
            ).status_code == 200
    assert len(hits(await find(client, alice, "platypus"))) == 2

    r = await client.get("/v1/chat/search", params={"q": "platypus"})
    assert r.status_code == 401


async def test_pages_by_offset_and_by_cursor_agree(
    client: Client, alice: User, db: asyncpg.Connection
) -> None:
    sid = await new_session(client, alice)
    await store(db, sid, *(u(f"note number {i} about wombats") for i in range(7)))
    every = hits(await find(client, alice, "wombat", limit=100))
    assert every == [(sid, seq) for seq in range(7, 0, -1)]  # newest first

    by_offset = []
    for offset in (0, 3, 6):
        page = await find(client, alice, "wombat", limit=3, offset=offset)
        by_offset += hits(page)
        assert page["has_more"] is (offset + 3 < 7)
    assert by_offset == every

    by_cursor: list[tuple[str, int]] = []
    after = None
    for _ in range(5):
        page = await find(client, alice, "wombat", limit=3,
                          **({"after": after} if after else {}))
        by_cursor += hits(page)
        after = page["next_cursor"]
        assert (after is None) is (not page["has_more"])
        if after is None:
            break
    assert by_cursor == every

    # Messages stored after the first page was read do not shift the next page.
    first = await find(client, alice, "wombat", limit=3)
    await store(db, sid, u("a new wombat"))
    second = await find(client, alice, "wombat", limit=3, after=first["next_cursor"])
    assert hits(second) == every[3:6]


async def test_sessions_are_found_by_name_or_by_message(
    client: Client, alice: User, bob: User, db: asyncpg.Connection
) -> None:
    named = await new_session(client, alice, session_name="Quarterly Budget")
    talked = await new_session(client, alice, session_name="misc")
    await store(db, talked, u("what about the budgets of 2025?"))
    await new_session(client, alice, session_name="unrelated")
    await new_session(client, bob, session_name="Budget too")

    async def listed(q: str, **params: Any) -> list[str]:
        r = await client.get("/v1/chat/sessions", headers=alice.headers,
                             params={"q": q, **params})
        assert r.status_code == 200, r.text
        return [s["id"] for s in r.json()["data"]]

    assert sorted(await listed("budget")) == sorted([named, talked])
    assert await listed("quarterly budg") == [named]
    assert await listed("2025 budget") == [talked]
    # A rename is searchable at once; a fork keeps its name's words or takes its new name's.
    r = await client.patch(f"/v1/chat/sessions/{named}", headers=alice.headers,
                           json={"session_name": "Annual plan"})
    assert r.status_code == 200
    assert await listed("quarterly") == []
    assert await listed("annual") == [named]
    forked = (await client.post(f"/v1/chat/sessions/{talked}/fork", headers=alice.headers,
                                json={"session_name": "Ideas for 2026"})).json()["id"]
    assert sorted(await listed("2026")) == [forked]
    assert sorted(await listed("budgets")) == sorted([talked, forked])  # the copied messages


async def test_imported_and_merged_messages_are_searchable(
    client: Client, alice: User, db: asyncpg.Connection
) -> None:
    document = {"format": "chatproxy.session.v1", "session": {"session_name": "imported"},
                "messages": [u("the capybara is large"), {"role": "assistant",
                                                          "content": "indeed"}]}
    r = await client.post("/v1/chat/sessions/import", headers=alice.headers, json=document)
    assert r.status_code == 201
    imported = r.json()["id"]
    assert hits(await find(client, alice, "capybara")) == [(imported, 1)]
    target = await new_session(client, alice)
    await store(db, target, u("first"))
    r = await client.post(f"/v1/chat/sessions/{target}/merge", headers=alice.headers,
                          json={"source_session_id": imported})
    assert r.status_code == 200
    assert hits(await find(client, alice, "capybara")) == [(target, 2)]  # the source is deleted


# --- text PostgreSQL cannot keep, and hostile queries --------------------------------------


async def test_nul_and_lone_surrogates_are_stored_searched_and_shown(
    client: Client, alice: User, db: asyncpg.Connection
) -> None:
    sid = await new_session(client, alice)
    text = "alpha\x00beta \ud800gamma delta"
    await store(db, sid, u(text))
    for q in ("alpha", "beta", "gamma delta"):
        (hit,) = (await find(client, alice, q))["data"]
        assert hit["snippet"] == text
    # In the query, they separate words like any other character that is not a letter.
    r = await client.get("/v1/chat/search", headers=alice.headers,
                         params={"q": "alpha\x00beta"})
    assert r.status_code == 200 and len(r.json()["data"]) == 1
    raw = await client.get("/v1/chat/search?q=%ED%A0%80gamma", headers=alice.headers)
    assert raw.status_code == 200  # invalid UTF-8 in the query string is not a 500


HOSTILE = [
    "'", "''", '"', "\\", "\\'", "&", "|", "!", "!!", ":*", "*", "()", "(", ")", "<->", "<1>",
    "a & b", "a | b", "!a", "a:*", "'a':*", "a' | 'b", "x:A", "foo\\", "a\\' & b", "(a",
    "a)", "--", "/* */", "%", "_", "a_b", "$1", "\x01", "\u00ad", "😀", "a" * 150,
]


@pytest.mark.parametrize("q", HOSTILE, ids=range(len(HOSTILE)))
async def test_hostile_queries_are_a_list_or_a_400_never_a_500(
    client: Client, alice: User, q: str
) -> None:
    for path in ("/v1/chat/search", "/v1/chat/sessions"):
        r = await client.get(path, headers=alice.headers, params={"q": q})
        assert r.status_code in (200, 400), (q, r.status_code, r.text)
        if r.status_code == 400:
            assert r.json() == bad("q must contain at least one letter or digit", "q")


async def test_bad_queries_are_400_naming_q(client: Client, alice: User) -> None:
    r = await client.get("/v1/chat/search", headers=alice.headers)
    assert r.status_code == 400
    assert r.json() == bad("Missing required parameter: q", "q", "missing_required_parameter")
    for q, message in (("", "q must contain at least one letter or digit"),
                       ("  !?&| ", "q must contain at least one letter or digit"),
                       ("x" * 1001, "q must be at most 1000 characters"),
                       (" ".join(f"w{i}" for i in range(33)), "q must have at most 32 words")):
        r = await client.get("/v1/chat/search", headers=alice.headers, params={"q": q})
        assert r.status_code == 400
        assert r.json() == bad(message, "q")
    r = await client.get("/v1/chat/search", headers=alice.headers,
                         params={"q": "x" * 10_000})
    assert r.json() == bad("q must be at most 1000 characters", "q")
    for params, message, param in (
        ({"limit": "0"}, "limit must be between 1 and 100", "limit"),
        ({"offset": "-1"}, "offset must be between 0 and 2147483647", "offset"),
        ({"after": "garbage"}, "after is not a cursor from this list (next_cursor)", "after"),
    ):
        r = await client.get("/v1/chat/search", headers=alice.headers,
                             params={"q": "ok", **params})
        assert r.json() == bad(message, param)


async def test_a_cursor_is_only_good_for_its_own_list(
    client: Client, alice: User, db: asyncpg.Connection
) -> None:
    for _ in range(2):
        sid = await new_session(client, alice)
        await store(db, sid, u("koala"), u("koala"))
    found = await find(client, alice, "koala", limit=1)
    sessions = (await client.get("/v1/chat/sessions", headers=alice.headers,
                                 params={"limit": 1})).json()
    assert found["next_cursor"] and sessions["next_cursor"]
    r = await client.get("/v1/chat/sessions", headers=alice.headers,
                         params={"after": found["next_cursor"]})
    assert r.json() == bad("after is not a cursor from this list (next_cursor)", "after")
    r = await client.get("/v1/chat/search", headers=alice.headers,
                         params={"q": "koala", "after": sessions["next_cursor"]})
    assert r.json() == bad("after is not a cursor from this list (next_cursor)", "after")
    for forged in ("", "=", "bXw", "bXwwfDA", "bXw5OTk5OTk5OTk5OTk5OTk5OTk5fDE", "\u00e9" * 10,
                   "bXwxfDF8MQ"):
        r = await client.get("/v1/chat/search", headers=alice.headers,
                             params={"q": "koala", "after": forged})
        assert r.status_code == 400, forged


# --- list filters and keyset pages ----------------------------------------------------------


async def test_the_session_list_filters_by_model_and_metadata(
    client: Client, alice: User, bob: User
) -> None:
    a = await new_session(client, alice, model="gpt-4o", metadata={"team": "infra", "env": "p"})
    b = await new_session(client, alice, model="gpt-4o", metadata={"team": "web"})
    c = await new_session(client, alice, model="llama3", metadata={"team": "infra",
                                                                  "odd": "a\x00b"})
    await new_session(client, bob, model="gpt-4o", metadata={"team": "infra"})

    async def listed(query: str) -> tuple[list[str], int]:
        r = await client.get(f"/v1/chat/sessions?{query}", headers=alice.headers)
        assert r.status_code == 200, r.text
        return sorted(s["id"] for s in r.json()["data"]), r.json()["total"]

    assert await listed("model=gpt-4o") == (sorted([a, b]), 2)
    assert await listed("metadata.team=infra") == (sorted([a, c]), 2)
    assert await listed("metadata.team=infra&metadata.env=p") == ([a], 1)
    assert await listed("metadata.team=infra&model=llama3") == ([c], 1)
    assert await listed("metadata.team=infra&metadata.team=web") == ([], 0)  # all must match
    assert await listed("metadata.odd=a%00b") == ([c], 1)  # text PostgreSQL cannot keep
    assert await listed("model=gpt") == ([], 0)  # exact, not a prefix
    r = await client.get("/v1/chat/sessions?metadata.=x", headers=alice.headers)
    assert r.json() == bad("metadata filters are metadata.KEY=VALUE", "metadata.")


async def test_the_session_list_pages_by_cursor_like_by_offset(
    client: Client, alice: User, db: asyncpg.Connection
) -> None:
    made = [await new_session(client, alice) for _ in range(5)]
    await store(db, made[2], u("makes it the most recent"))
    every = [s["id"] for s in (await client.get("/v1/chat/sessions?limit=100",
                                                headers=alice.headers)).json()["data"]]
    assert every[0] == made[2] and sorted(every) == sorted(made)
    seen: list[str] = []
    after = ""
    while True:
        r = await client.get(f"/v1/chat/sessions?limit=2{after}", headers=alice.headers)
        page = r.json()
        seen += [s["id"] for s in page["data"]]
        assert page["total"] == 5 and page["has_more"] is (page["next_cursor"] is not None)
        if page["next_cursor"] is None:
            break
        after = f"&after={page['next_cursor']}"
    assert seen == every


async def test_messages_page_by_seq_in_either_direction(
    client: Client, alice: User, db: asyncpg.Connection
) -> None:
    sid = await new_session(client, alice)
    await store(db, sid, *(u(f"m{i}") for i in range(1, 8)))

    async def seqs(query: str) -> tuple[list[int], bool]:
        r = await client.get(f"/v1/chat/sessions/{sid}/messages?{query}", headers=alice.headers)
        assert r.status_code == 200, r.text
        return [m["seq"] for m in r.json()["data"]], r.json()["has_more"]

    assert await seqs("after_seq=2&limit=3") == ([3, 4, 5], True)
    assert await seqs("after_seq=5&limit=3") == ([6, 7], False)
    assert await seqs("after_seq=4&limit=3") == ([5, 6, 7], False)
    assert await seqs("after_seq=0&limit=2&order=asc") == ([1, 2], True)
    assert await seqs("before_seq=6&limit=3") == ([5, 4, 3], True)
    assert await seqs("before_seq=3&limit=3&order=desc") == ([2, 1], False)
    assert await seqs("before_seq=99") == ([7, 6, 5, 4, 3, 2, 1], False)
    assert await seqs("after_seq=2&limit=2&offset=1") == ([4, 5], True)
    for query, message, param in (
        ("after_seq=1&before_seq=5", "Give after_seq or before_seq, not both", "before_seq"),
        ("after_seq=1&order=desc", "after_seq lists in ascending order and before_seq in "
         "descending order", "order"),
        ("before_seq=1&order=asc", "after_seq lists in ascending order and before_seq in "
         "descending order", "order"),
        ("after_seq=x", "after_seq must be an integer", "after_seq"),
        ("before_seq=-1", "before_seq must be between 0 and 9223372036854775807",
         "before_seq"),
    ):
        r = await client.get(f"/v1/chat/sessions/{sid}/messages?{query}", headers=alice.headers)
        assert r.status_code == 400
        assert r.json() == bad(message, param)


async def test_deep_pages_walk_an_index(client: Client, alice: User,
                                        db: asyncpg.Connection) -> None:
    """The plans behind a deep keyset page: an index walked from the position, no sort."""
    sid = await new_session(client, alice, model="m")
    plan = "\n".join(r[0] for r in await db.fetch(
        "EXPLAIN SELECT seq FROM chat_messages WHERE session_id = $1 AND seq > $2 "
        "ORDER BY seq LIMIT 50", sid, 199_900))
    assert "Index" in plan and "Sort" not in plan
    await db.execute("SET enable_seqscan = off")  # a tiny test table: as on a big one
    try:
        for where in ("", " AND model = 'm'"):
            plan = "\n".join(r[0] for r in await db.fetch(
                "EXPLAIN SELECT id FROM chat_sessions WHERE user_id = $1 AND is_active"
                f"{where} AND (COALESCE(last_message_at, created_at), id) < (now(), 'x') "
                "ORDER BY COALESCE(last_message_at, created_at) DESC, id DESC LIMIT 21",
                alice.id))
            assert "Index" in plan and "Sort" not in plan, plan
        plan = "\n".join(r[0] for r in await db.fetch(
            "EXPLAIN SELECT id FROM chat_sessions WHERE metadata @> '{\"a\": \"b\"}'"))
        assert "chat_sessions_metadata_idx" in plan, plan
        plan = "\n".join(r[0] for r in await db.fetch(
            "EXPLAIN SELECT id FROM chat_messages WHERE search @@ 'abc:*'::tsquery"))
        assert "chat_messages_search_idx" in plan, plan
    finally:
        await db.execute("RESET enable_seqscan")
