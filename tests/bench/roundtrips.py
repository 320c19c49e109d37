"""Database round trips per request, counted on the wire.

For each proxy under test, one more server of the same code is started whose database
connection goes through `benchtool pgcount`: every Sync (the end of an extended-protocol batch)
and every simple Query the server's driver sends is one round trip, labelled with its SQL.
Each kind of request runs once to prepare every pooled connection, then the counter is reset and
the kind runs again; round trips / requests served is the figure.
"""

from __future__ import annotations

import math
from typing import Any

import phases
import procs
from report import check


def round_trips(b: phases.Bench, run: procs.Procs, tmp: Any) -> None:
    """For each proxy, one more server of its kind whose database traffic goes through pgcount."""
    section = "database round trips (counted on the wire: each Sync or simple Query)"
    counter, line = procs.start_tool(run, "pgcount", "-upstream", b.db.socket_or_addr)
    listen, http = line.split()[1], line.split()[3]
    env_db = {"CHATPROXY_DATABASE_URL": procs.counted_url(b.db, listen)}
    details: dict[str, Any] = {}
    try:
        for p in b.proxies:
            port = procs.free_port()
            env = procs.chatproxy_env(env_db, f"{b.mock}/v1", port, tmp)
            log = tmp / f"{p.name.replace(' ', '-')}-counted.log"
            server = procs.serve(run, env, port, b.proxy_cpu, log, command=p.command)
            counted = phases.Proxy(p.name, f"http://127.0.0.1:{port}", server.pid, p.command)
            kinds = [
                ("turn on a 20-message session", "request",
                 phases.sessioned(b, counted, b.sessions20[:4]), 2),
                ("streamed turn on a 20-message session", "stream",
                 phases.sessioned(b, counted, b.sessions20[:4], stream=True), 2),
                ("request without a session", "request", phases.plain(b, counted), None),
            ]
            try:
                for label, mode, target, limit in kinds:
                    phases.load(mode, 4, [target], 1, 0.5, warmup=0)  # every connection ready
                    procs.http_json(f"http://{http}/reset", method="POST")
                    res = phases.load(mode, 4, [target], 1, 1.0, warmup=0)[target["name"]]
                    counts = procs.http_json(f"http://{http}/counts")
                    done = max(1, res["requests"] - res["errors"])
                    per = counts["round_trips"] / done if res["requests"] > res["errors"] \
                        else math.nan
                    details[f"{p.name}: {label}"] = {
                        "requests": res["requests"], "errors": res["errors"],
                        "round_trips": counts["round_trips"],
                        "by_sql_per_request": {k: v / done for k, v in counts["by_sql"].items()},
                    }
                    failed = f" ({res['errors']} requests failed)" if res["errors"] else ""
                    b.row(section, f"{p.name}, {label}", f"{per:.2f} per request{failed}",
                          f"<= {limit}" if limit else "", check(per, limit) if limit else None)
            finally:
                run.stop(server)
    finally:
        run.stop(counter)
    b.raw["round_trips"] = details
