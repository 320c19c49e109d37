"""The Responses API against chat completions, on the same 20-message sessions (issue 18).

`POST /v1/responses` with `conversation` set to a session runs the same turn as
`POST /v1/chat/completions` with that `session_id`, plus the translation both ways and the
stored response row; these rows measure what that adds, side by side and interleaved: the
added p50 at concurrency 1, the added time to first event of a stream, and the server's CPU per
request at 64 clients.
"""

from __future__ import annotations

import json
import os
from typing import Any

from phases import MODEL, PROMPT, Bench, load, sessioned
from report import added_p50, check, fmt_ms, latency_summary

SECTION = "Responses API against chat completions (the same 20-message sessions)"


def responded(
    b: Bench, ids: list[str], stream: bool = False, cycle: bool = False
) -> dict[str, Any]:
    p = b.main
    bodies = []
    for session in ids:
        value: dict[str, Any] = {"model": MODEL, "input": PROMPT, "conversation": session}
        if stream:
            value["stream"] = True
        bodies.append(json.dumps(value))
    return {"name": "responses + conversation", "url": f"{p.url}/v1/responses",
            "headers": {"Authorization": f"Bearer {b.key}"}, "bodies": bodies,
            "cpu_pids": [p.pid], "cycle": cycle}


def chat(b: Bench, ids: list[str], stream: bool = False, cycle: bool = False) -> dict[str, Any]:
    return sessioned(b, b.main, ids, stream, cycle, name="chat completions + session")


def responses_api(b: Bench) -> None:
    resp, via_chat = "responses + conversation", "chat completions + session"
    # concurrency 1, going round the 64 sessions
    res = load("request", 1, [chat(b, b.sessions20, cycle=True),
                              responded(b, b.sessions20, cycle=True)], b.rounds, b.window)
    b.raw["responses_c1"] = res
    for name in (via_chat, resp):
        s = latency_summary(res[name])
        b.row(SECTION, f"{name}: p50 / p99 at concurrency 1",
              f"{fmt_ms(s['p50_ms'])} / {fmt_ms(s['p99_ms'])}")
    added = added_p50(res[resp], res[via_chat])
    b.row(SECTION, "responses: added p50 over chat completions, concurrency 1", fmt_ms(added),
          "<= 0.3 ms", check(added, 0.3))

    # streams: 4 at once; the first event (response.created) against the first chunk
    res = load("stream", 4, [chat(b, b.sessions20[:8], stream=True),
                             responded(b, b.sessions20[8:16], stream=True)],
               max(2, b.rounds - 2), max(2.0, b.window))
    b.raw["responses_streaming"] = res
    ttfb = added_p50(res[resp], res[via_chat], "round_ttfb_p50_us")
    ttlb = added_p50(res[resp], res[via_chat])
    b.row(SECTION, "responses stream: added time to first event p50 over chat completions",
          fmt_ms(ttfb), "<= 0.3 ms", check(ttfb, 0.3))
    b.row(SECTION, "responses stream: added time to last byte p50", fmt_ms(ttlb))

    # CPU per request at 64 clients, one session each
    res = load("request", 64, [chat(b, b.sessions20), responded(b, b.sessions20)],
               max(2, b.rounds - 2), b.window)
    b.raw["responses_c64"] = res
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")

    def per(r: dict[str, Any]) -> float:
        return float(r["cpu_ticks"] * tick_ms / max(1, r["requests"] - r["errors"]))

    for name in (via_chat, resp):
        s = latency_summary(res[name])
        b.row(SECTION, f"{name}: 64 clients", f"{s['rps']:.0f} req/s, p50 "
              f"{fmt_ms(s['p50_ms'])}, CPU {per(res[name]):.2f} ms per request")
    ratio = per(res[resp]) / per(res[via_chat]) if per(res[via_chat]) else float("nan")
    b.row(SECTION, "responses: CPU per request / chat completions', 64 clients",
          f"{ratio:.2f}x", "<= 1.25x", check(ratio, 1.25))
