"""The search phase (issue 20): one user's 1,000,000 messages across 10,000 sessions, searched
for one word; and a turn with the search index's write-time work against one without it.

The corpus is seeded with set-based SQL, a batch of sessions per statement. Its text is drawn
from a vocabulary of 5,000 made-up words with a Zipf-like law (the word of rank r is about r
times rarer than the most common one), 12 words a message, so a query word can be picked by how
many messages hold it. `search` is filled in the same statement with exactly the words
`proxy.searchtext` would compute (the text is lower-case letters and spaces).

Search latency is measured from this process with one keep-alive client, one request at a time,
the query words taken in turn; each word's number of matching messages is reported beside it.
The turn comparison starts `tests/bench/variants/searchoff.py` (the shipped server without the
write-time indexing) and runs turns on 20-message sessions through both, interleaved by the
load tool as everywhere else.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import asyncpg
import phases
import procs
from report import added_p50, check, fmt_ms, latency_summary, pct

VOCABULARY = 5_000
WORDS_PER_MESSAGE = 12
SESSIONS_PER_BATCH = 500
RANKS = (3, 10, 30, 100, 300, 1000, 3000)  # the query words, by how common they are
PASSES = 30  # requests per word

_SESSIONS = """
INSERT INTO chat_sessions (id, user_id, session_name, model, max_history_messages,
                           message_count, total_tokens, next_seq, last_message_at, search)
SELECT 'sess_search' || lpad(n::text, 8, '0'), $1, 'corpus session ' || n, 'gpt-4o-mini', 20,
       $4, $4 * 24, $4 + 1, now() - ($3 - n) * interval '1 minute',
       array_to_tsvector(ARRAY['corpus', 'session', n::text])
FROM generate_series($2::int, $3::int - 1) AS n
"""

_MESSAGES = """
INSERT INTO chat_messages (session_id, seq, role, has_tool_calls, body, tokens, status,
                           created_at, search)
SELECT 'sess_search' || lpad(s.n::text, 8, '0'), g.seq, m.role, false,
       json_build_object('role', m.role, 'content', array_to_string(w.words, ' '))::text, 24,
       'complete', now() - (($3::bigint - s.n) * $4 + ($4 - g.seq)) * interval '1 second',
       array_to_tsvector(w.words)
FROM generate_series($1::int, $2::int - 1) AS s(n),
     generate_series(1, $4::int) AS g(seq),
     LATERAL (SELECT CASE WHEN g.seq % 2 = 1 THEN 'user' ELSE 'assistant' END AS role) m,
     LATERAL (SELECT ARRAY(
         SELECT ($5::text[])[floor(power($6::float8, random()))::int]
         FROM generate_series(1, $7::int + 0 * g.seq + 0 * s.n)) AS words) w
"""


def vocabulary(size: int = VOCABULARY) -> list[str]:
    """Made-up words, distinct, none a prefix of another, the same on every run."""
    rng = random.Random(20)
    letters = "bcdfghjklmnprstvz"
    vowels = "aeiou"
    words: set[str] = set()
    result = []
    while len(result) < size:
        word = "".join(rng.choice(letters) + rng.choice(vowels)
                       for _ in range(rng.randint(3, 4)))
        if word not in words and not any(w.startswith(word) or word.startswith(w)
                                         for w in words if w[:3] == word[:3]):
            words.add(word)
            result.append(word)
    return result


async def seed_corpus(url: str, user_id: str, sessions: int, per_session: int,
                      words: list[str]) -> dict[str, int]:
    """The corpus, and how many of its messages hold each query word (by rank)."""
    conn = await asyncpg.connect(url)
    try:
        started = time.monotonic()
        for first in range(1, sessions + 1, SESSIONS_PER_BATCH):
            last = min(first + SESSIONS_PER_BATCH, sessions + 1)
            async with conn.transaction():
                await conn.execute(_SESSIONS, user_id, first, last, per_session)
                await conn.execute(_MESSAGES, first, last, sessions + 1, per_session, words,
                                   float(len(words)), WORDS_PER_MESSAGE)
        procs.log(f"seeded {sessions:,} sessions x {per_session} messages for search "
                  f"in {time.monotonic() - started:.0f}s")
        await conn.execute("VACUUM ANALYZE chat_messages")
        await conn.execute("VACUUM ANALYZE chat_sessions")
        counts = {}
        for rank in RANKS:
            counts[words[rank - 1]] = await conn.fetchval(
                "SELECT count(*) FROM chat_messages WHERE search @@ $1::tsquery",
                f"'{words[rank - 1]}':*")
        return counts
    finally:
        await conn.close()


def _search_latencies(url: str, key: str, queries: list[str], passes: int,
                      path: str = "/v1/chat/search") -> dict[str, list[float]]:
    import httpx

    samples: dict[str, list[float]] = {q: [] for q in queries}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"},
                      timeout=60) as client:
        for q in queries:  # warm: each query's plan and pages once
            client.get(path, params={"q": q}).raise_for_status()
        for _ in range(passes):
            for q in queries:
                started = time.perf_counter()
                r = client.get(path, params={"q": q, "limit": 20})
                elapsed = (time.perf_counter() - started) * 1000
                r.raise_for_status()
                samples[q].append(elapsed)
    return samples


def deep_pages(b: phases.Bench, session_id: str, size: int) -> None:
    """A page of 100 messages at the start and at the end of the big session: by offset and by
    seq (issue 20: offset 199,900 took 84 ms against 2.7 ms at offset 0)."""
    import httpx

    section = f"a page of 100 messages of a {size:,}-message session, by offset and by seq"
    deep = max(0, size - 100)
    pages = {"offset=0": "offset=0", f"offset={deep:,}": f"offset={deep}",
             f"after_seq={deep:,}": f"after_seq={deep}", "before_seq=101": "before_seq=101"}
    samples: dict[str, list[float]] = {name: [] for name in pages}
    url = f"{b.main.url}/v1/chat/sessions/{session_id}/messages?limit=100&"
    with httpx.Client(headers={"Authorization": f"Bearer {b.key}"}, timeout=60) as client:
        for query in pages.values():
            client.get(url + query).raise_for_status()
        for _ in range(max(10, b.rounds * 4)):
            for name, query in pages.items():
                started = time.perf_counter()
                client.get(url + query).raise_for_status()
                samples[name].append((time.perf_counter() - started) * 1000)
    b.raw["deep_pages_ms"] = samples
    for name in pages:
        b.row(section, f"{name}: p50", fmt_ms(pct(samples[name], 50)))


def search(b: phases.Bench, run: procs.Procs, tmp: Path, sessions: int, per_session: int
           ) -> None:
    section = (f"search: one user's {sessions * per_session:,} messages in {sessions:,} "
               "sessions")
    env = procs.chatproxy_env(b.db.env, f"{b.mock}/v1", procs.free_port(), tmp)
    procs.cli(env, "users", "create", "bench-search")
    key = procs.cli(env, "keys", "create", "bench-search")
    user_id = asyncio.run(_user_id(b.db.url, "bench-search"))
    words = vocabulary()
    counts = asyncio.run(seed_corpus(b.db.url, user_id, sessions, per_session, words))
    queries = [words[rank - 1] for rank in RANKS]
    samples = _search_latencies(b.main.url, key, queries, max(PASSES, b.rounds * 6))
    b.raw["search"] = {"counts": counts, "samples_ms": samples}
    every = [x for q in queries for x in samples[q]]
    p50, p99 = pct(every, 50), pct(every, 99)
    b.row(section, f"one-word search, {len(queries)} words taken in turn: p50", fmt_ms(p50),
          "<= 50 ms", check(p50, 50))
    b.row(section, "one-word search: p99", fmt_ms(p99), "<= 200 ms", check(p99, 200))
    for q in queries:
        b.row(section, f"  '{q}' (in {counts[q]:,} messages): p50 / p99",
              f"{fmt_ms(pct(samples[q], 50))} / {fmt_ms(pct(samples[q], 99))}")
    listed = _search_latencies(b.main.url, key, queries, max(5, b.rounds), "/v1/chat/sessions")
    b.raw["search"]["sessions_q_ms"] = listed
    every = [x for q in queries for x in listed[q]]
    b.row(section, "sessions?q= (a page of 20 and the total), same words: p50 / p99",
          f"{fmt_ms(pct(every, 50))} / {fmt_ms(pct(every, 99))}")
    turns_against_unindexed(b, run, tmp)


async def _user_id(url: str, name: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        user_id: str = await conn.fetchval("SELECT id FROM users WHERE name = $1", name)
        return user_id
    finally:
        await conn.close()


def turns_against_unindexed(b: phases.Bench, run: procs.Procs, tmp: Path) -> None:
    """A turn on a 20-message session through chatproxy and through the searchoff variant."""
    section = "a turn with the search index's write-time work, and without (variant searchoff)"
    command = procs.variant_command("searchoff")
    port = procs.free_port()
    env = procs.chatproxy_env(b.db.env, f"{b.mock}/v1", port, tmp)
    server = procs.serve(run, env, port, b.proxy_cpu, tmp / "variant-searchoff.log",
                         command=command)
    try:
        off = phases.Proxy("searchoff", f"http://127.0.0.1:{port}", server.pid, command)
        targets = [phases.direct(b), phases.sessioned(b, b.main, b.sessions20, cycle=True,
                                                      name="indexed"),
                   phases.sessioned(b, off, b.sessions20, cycle=True, name="not indexed")]
        phases.load("request", 1, targets, 1, 1.0, warmup=0)  # both warm
        res = phases.load("request", 1, targets, b.rounds, b.window)
    finally:
        run.stop(server)
    b.raw["search_turns"] = res
    indexed = added_p50(res["indexed"], res["direct"])
    plain = added_p50(res["not indexed"], res["direct"])
    base = latency_summary(res["direct"])
    for name in ("indexed", "not indexed"):
        s = latency_summary(res[name])
        b.row(section, f"{name}: added p50 / p99",
              f"{fmt_ms(added_p50(res[name], res['direct']))} / "
              f"{fmt_ms(s['p99_ms'] - base['p99_ms'])}"
              + (f", {s['errors']} errors" if s["errors"] else ""))
    b.row(section, "indexed - not indexed, added p50", fmt_ms(indexed - plain), "<= 0.1 ms",
          check(indexed - plain, 0.1))

