"""`run.py --workers N`: throughput of `chatproxy serve --workers N` beside the one-worker server.

The N-worker server is not pinned (it gets every core); the one-worker server keeps its own
core. On a machine with few cores the load tool, the mock upstream and PostgreSQL share those
cores, so the ratio is a lower bound of what N workers give on N free cores.
"""

from __future__ import annotations

from typing import Any

import phases
import procs
from report import latency_summary


def workers(b: phases.Bench, run: procs.Procs, tmp: Any, count: int) -> None:
    section = f"--workers {count} beside one worker (64 clients)"
    port = procs.free_port()
    env = procs.chatproxy_env(b.db.env, f"{b.mock}/v1", port, tmp)
    server = procs.serve(run, env, port, None, tmp / f"chatproxy-{count}-workers.log",
                         workers=count)
    many = phases.Proxy(f"{count} workers", f"http://127.0.0.1:{port}", server.pid,
                        procs.CHATPROXY)
    try:
        targets = []
        for p in (b.main, many):
            targets += [phases.plain(b, p), phases.sessioned(b, p, b.sessions20)]
        res = phases.load("request", 64, targets, max(2, b.rounds - 2), b.window)
    finally:
        run.stop(server)
    b.raw[f"workers_{count}"] = res
    for suffix, label in (("", "no session"), ("+session", "20-message session")):
        one = latency_summary(res[b.main.name + suffix])["rps"]
        n = latency_summary(res[many.name + suffix])["rps"]
        b.row(section, f"{label}: req/s with 1 / {count} workers",
              f"{one:.0f} / {n:.0f} ({n / one:.2f}x)" if one else "n/a")
