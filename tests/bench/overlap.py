"""The overlap phase (issue 16): a turn that resends a 20-message conversation, as chat apps do,
against a turn that sends only its new message, side by side at concurrency 1.

Each target goes round sessions of its own (window 20) whose newest 20 messages are the
conversation [user: the bench prompt, assistant: the mock's canned answer] ten times, made by real
turns through the proxy, so they are exactly what the proxy stores. A turn adds one more such
pair, so each session's newest 20 messages stay that conversation round after round: the
resending turn is recognised whole every time (`X-History-Overlap: 20`, checked from the
headers the load tool saw), and both targets send the upstream the same 21 messages. The
difference between their p50s is the recognition's cost (issue 16: at most 0.2 ms). The
20-message session turn without any overlap is the latency phase's row, on seeded sessions.
"""

from __future__ import annotations

import json
from typing import Any

import phases
import procs
import seed
from report import added_p50, check, fmt_ms, latency_summary

SESSIONS = 16  # per target
PAIRS = 10  # the conversation: 20 messages
CANNED = "Hello! This is a canned answer from the benchmark's mock upstream."  # go/upstream.go


def conversation() -> list[dict[str, Any]]:
    return [{"role": "user", "content": phases.PROMPT},
            {"role": "assistant", "content": CANNED}] * PAIRS


def _sessions(b: phases.Bench, name: str) -> list[str]:
    """Sessions holding the conversation, made by `PAIRS` turns each."""
    ids = seed.create_sessions(b.main.url, b.key, SESSIONS, name, 20)
    auth = {"Authorization": f"Bearer {b.key}"}
    for sid in ids:
        for _ in range(PAIRS):
            procs.http_json(f"{b.main.url}/v1/chat/completions",
                            json.loads(phases.body(session=sid)), auth)
    return ids


def resending(b: phases.Bench, ids: list[str]) -> dict[str, Any]:
    bodies = [json.dumps({"model": phases.MODEL, "session_id": sid,
                          "messages": [*conversation(), {"role": "user",
                                                         "content": phases.PROMPT}]})
              for sid in ids]
    return {"name": "resends 20", "url": f"{b.main.url}/v1/chat/completions",
            "headers": {"Authorization": f"Bearer {b.key}"}, "bodies": bodies,
            "cpu_pids": [b.main.pid], "cycle": True}


def overlap(b: phases.Bench) -> None:
    section = ("a 20-message conversation at concurrency 1: resent whole (X-History-Overlap: "
               "20) against only the new message")
    alone = phases.sessioned(b, b.main, _sessions(b, "bench-new-only"), cycle=True,
                             name="new message only")
    again = resending(b, _sessions(b, "bench-resend"))
    res = phases.load("request", 1, [phases.direct(b), alone, again], b.rounds, b.window)
    b.raw["overlap"] = res
    seen = res["resends 20"].get("headers_seen", {})
    recognised = seen.get("x-history-overlap", "none")
    injected = seen.get("x-history-messages", "none")
    b.row(section, "direct upstream p50",
          fmt_ms(latency_summary(res["direct"])["p50_ms"]))
    for name in ("new message only", "resends 20"):
        header = res[name].get("headers_seen", {}).get("x-history-messages", "none")
        b.row(section, f"{name}: added p50 (history header {header})",
              fmt_ms(added_p50(res[name], res["direct"])))
    cost = added_p50(res["resends 20"], res["new message only"])
    ok = check(cost, 0.2) if recognised == "20" and injected == "0" else False
    b.row(section, f"resends 20 - new message only: p50 (overlap header {recognised})",
          fmt_ms(cost), "<= 0.2 ms", ok)
