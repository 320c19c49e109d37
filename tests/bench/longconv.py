"""Long conversations (issue 19): what summaries and the overflow retry cost a turn.

- Summaries: a second `chatproxy serve` with `CHATPROXY_SUMMARY_MODEL` set (the mock answers the
  summary model like any model) and a third without, each on 64 sessions of 20 seeded messages
  with a window of 10, so that every few turns of a session leave out messages its summary
  does not cover yet and a summary job runs in the background while the turns are measured.
  Turns at concurrency 1 go round each server's sessions, interleaved with the direct upstream
  by the load tool; the jobs each server ran during the measurement are read from its
  `/metrics`.
- Overflow: on the main server, turns on 20-message sessions with the mock's `bench-ctx-N` model,
  which refuses a body over N bytes as too long for its context (without numbers, so every turn
  takes the path: the refusal, then the retry with half the history), beside plain turns on
  sessions of the same size.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path
from typing import Any

import phases
import procs
import seed
from report import added_p50, fmt_ms, latency_summary

SUMMARY_MODEL = "bench-summary"
WINDOW = 10  # messages a turn injects (of 20 seeded): every few turns leave out new ones
OVERFLOW_MODEL = "bench-ctx-1800"  # 20 seeded messages (~2.5 KB) go over; 10 (~1.4 KB) fit
SESSIONS = 64


def _turns(b: phases.Bench, p: phases.Proxy, ids: list[str], name: str,
           model: str = phases.MODEL) -> dict[str, Any]:
    bodies = [json.dumps({"model": model, "session_id": s,
                          "messages": [{"role": "user", "content": phases.PROMPT}]})
              for s in ids]
    return {"name": name, "url": f"{p.url}/v1/chat/completions",
            "headers": {"Authorization": f"Bearer {b.key}"}, "bodies": bodies,
            "cpu_pids": [p.pid], "cycle": True}


def _sessions(b: phases.Bench, name: str, window: int) -> list[str]:
    ids = seed.create_sessions(b.main.url, b.key, SESSIONS, name, window)
    asyncio.run(seed.seed(b.db.url, [(ids, 20)]))
    return ids


def _jobs(url: str) -> dict[str, float]:
    """The server's summary jobs so far, by outcome (its /metrics)."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as answer:
        text = answer.read().decode()
    jobs: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("chatproxy_summary_jobs_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            jobs[outcome] = float(line.split()[-1])
    return jobs


def _row(b: phases.Bench, section: str, res: dict[str, Any], name: str, label: str) -> None:
    s = latency_summary(res[name])
    base = latency_summary(res["direct"])
    b.row(section, f"{label}: p50 / p99 (added p50 / p99)",
          f"{fmt_ms(s['p50_ms'])} / {fmt_ms(s['p99_ms'])} "
          f"({fmt_ms(added_p50(res[name], res['direct']))} / "
          f"{fmt_ms(s['p99_ms'] - base['p99_ms'])})"
          + (f", {s['errors']} errors" if s["errors"] else ""))


def summaries(b: phases.Bench, run: procs.Procs, tmp: Path) -> None:
    section = (f"a turn at concurrency 1 with summaries on, jobs running (window {WINDOW} of "
               "20+ messages), and off")
    servers = {}
    started = []
    for name, extra in (("on", {"CHATPROXY_SUMMARY_MODEL": SUMMARY_MODEL}), ("off", {})):
        port = procs.free_port()
        env = {**procs.chatproxy_env(b.db.env, f"{b.mock}/v1", port, tmp), **extra}
        server = procs.serve(run, env, port, b.proxy_cpu, tmp / f"summaries-{name}.log")
        started.append(server)
        servers[name] = phases.Proxy(f"summaries {name}", f"http://127.0.0.1:{port}",
                                     server.pid, procs.CHATPROXY)
    try:
        targets = [phases.direct(b)]
        for name, p in servers.items():
            targets.append(_turns(b, p, _sessions(b, f"bench-long-{name}", WINDOW),
                                  f"summaries {name}"))
        phases.load("request", 1, targets, 1, 1.0, warmup=0)  # warm, and the first jobs
        before = _jobs(servers["on"].url)
        res = phases.load("request", 1, targets, b.rounds, b.window)
        after = _jobs(servers["on"].url)
    finally:
        for server in started:
            run.stop(server)
    b.raw["summaries_c1"] = res
    _row(b, section, res, "summaries off", "summaries off")
    _row(b, section, res, "summaries on", "summaries on")
    stored = after.get("stored", 0) - before.get("stored", 0)
    other = {k: v - before.get(k, 0) for k, v in after.items() if k != "stored"}
    carried = res["summaries on"].get("headers_seen", {}).get("x-history-summary-seq")
    b.row(section, "summary jobs that ran during it (summaries on)",
          f"{stored:.0f} stored" + "".join(f", {v:.0f} {k}" for k, v in other.items() if v)
          + ("; turns carried a summary" if carried else "; no turn carried a summary"))
    on, off = (added_p50(res[f"summaries {n}"], res["direct"]) for n in ("on", "off"))
    b.row(section, "on - off, added p50", fmt_ms(on - off))


def overflow(b: phases.Bench) -> None:
    section = ("the overflow path: a refusal, then the retry with half the history (two "
               "upstream calls), beside a plain turn; 20-message sessions")
    refused = _sessions(b, "bench-overflow", 20)
    plain = _sessions(b, "bench-plain", 20)
    targets = [phases.direct(b), _turns(b, b.main, plain, "plain turn"),
               _turns(b, b.main, refused, "overflow turn", OVERFLOW_MODEL)]
    phases.load("request", 1, targets, 1, 1.0, warmup=0)
    res = phases.load("request", 1, targets, b.rounds, b.window)
    b.raw["overflow_c1"] = res
    _row(b, section, res, "plain turn", "plain turn")
    _row(b, section, res, "overflow turn", "overflow turn")
    seen = res["overflow turn"].get("headers_seen", {})
    b.row(section, "overflow turn: X-History-Retried / messages injected in the retry",
          f"{seen.get('x-history-retried', 'absent')} / {seen.get('x-history-messages', '?')}")
    extra = (added_p50(res["overflow turn"], res["direct"])
             - added_p50(res["plain turn"], res["direct"]))
    b.row(section, "overflow - plain, added p50", fmt_ms(extra))
