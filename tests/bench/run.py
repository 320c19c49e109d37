"""chatproxy's benchmark (issue 6): `.venv/bin/python tests/bench/run.py [--peer URL ...]`.

Builds the Go tool (mock upstream, load generator, stream holder, PostgreSQL round-trip
counter), starts an embedded PostgreSQL in a temporary directory (or a fresh database on
CHATPROXY_DATABASE_URL), the mock upstream and `chatproxy serve` (one worker, on its own core),
seeds sessions of 20, 10, 10,000 and 1,000,000 messages with set-based SQL, measures, prints
one table with the targets of issue 6 and writes the raw numbers to tests/bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import datetime as dt
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import longconv
import machine
import overlap
import phases
import procs
import responsesapi
import roundtrips
import scaling
import search
import seed
import spy
from report import markdown, render

RESULTS = procs.BENCH / "results"
PHASES = ("hops", "streams", "latency", "throughput", "streaming", "history", "overlap", "mcp",
          "responses", "roundtrips", "search", "long")


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer", action="append", default=[], metavar="URL",
                        help="another OpenAI-compatible proxy's base URL (…/v1) to measure too")
    parser.add_argument("--peer-key", action="append", default=[], metavar="KEY",
                        help="bearer key for the peer of the same position (one: for all)")
    parser.add_argument("--mock-addr", default="127.0.0.1:0", metavar="HOST:PORT",
                        help="where the mock upstream listens (fix it to point a peer at it)")
    parser.add_argument("--peer-pid", action="append", default=[], type=int, metavar="PID",
                        help="the peer's server process, to report its CPU per request")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per measurement")
    parser.add_argument("--window", type=float, default=1.5,
                        help="seconds each target gets per round")
    parser.add_argument("--streams", type=int, default=500, help="open slow streams to hold")
    parser.add_argument("--big", type=int, default=1_000_000, help="messages in the big session")
    parser.add_argument("--search-sessions", type=int, default=10_000, metavar="N",
                        help="sessions of the search phase's user")
    parser.add_argument("--search-per-session", type=int, default=100, metavar="N",
                        help="messages in each of them")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME",
                        help="also measure tests/bench/variants/NAME.py, a patched chatproxy")
    parser.add_argument("--workers", type=int, default=0, metavar="N",
                        help="also measure `chatproxy serve --workers N` (unpinned) at 64 clients")
    parser.add_argument("--only", default=",".join(PHASES), metavar="LIST",
                        help=f"comma-separated subset of: {', '.join(PHASES)}")
    parser.add_argument("--share-core", action="store_true",
                        help="run the proxy on the load tool's core too (a diagnostic: no hop "
                             "crosses cores; the targets are meant for the proxy on its own)")
    parser.add_argument("--serve", action="store_true",
                        help="set everything up, print the URLs and the key, wait for Ctrl-C")
    parser.add_argument("--profile", choices=("session", "plain", "stream"),
                        help="instead of measuring: py-spy the server under this kind of load")
    parser.add_argument("--profile-seconds", type=float, default=15)
    return parser.parse_args(argv)


def _peers(args: argparse.Namespace) -> list[phases.Peer]:
    result = []
    for i, url in enumerate(args.peer):
        keys = args.peer_key
        key = keys[i] if i < len(keys) else (keys[0] if len(keys) == 1 else None)
        pid = args.peer_pid[i] if i < len(args.peer_pid) else None
        result.append(phases.Peer(f"peer{i + 1}", url.rstrip("/"), key, pid))
    return result


def _machine() -> dict[str, Any]:
    def out(*command: str) -> str:
        try:
            return subprocess.run(command, capture_output=True, text=True, check=False).stdout
        except OSError:
            return ""

    return {
        "nproc": out("nproc").strip(),
        "lscpu": out("lscpu").splitlines()[:16],
        "free": out("free", "-h").splitlines(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "commit": out("git", "-C", str(procs.ROOT), "rev-parse", "--short", "HEAD").strip(),
        "dirty": bool(out("git", "-C", str(procs.ROOT), "status", "--porcelain", "proxy", "sql")),
    }


def _pin_and_limits(share: bool) -> int | None:
    """Keep this process and its children on CPU 0; give the proxy CPU 1, or with `share` CPU 0
    too (None: no pinning)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or shutil.which("taskset") is None:
        procs.log("fewer than 2 CPUs (or no taskset): nothing is pinned")
        return None
    os.sched_setaffinity(0, {cpus[0]})
    return cpus[0] if share else cpus[1]


def _timed(name: str, work: Callable[[], Any]) -> Any:
    started = time.monotonic()
    procs.log(f"{name} ...")
    result = work()
    procs.log(f"{name}: {time.monotonic() - started:.1f}s")
    return result


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` cleans up
    started = time.monotonic()
    proxy_cpu = _pin_and_limits(args.share_core)
    _timed("building the Go tool", procs.build_tool)
    tmp = Path(tempfile.mkdtemp(prefix="chatproxy-bench-"))
    if not args.keep:
        # Registered before the embedded cluster's own exit hook, so it runs after the cluster
        # has stopped.
        atexit.register(shutil.rmtree, tmp, True)
    run = procs.Procs()
    external = os.environ.get("CHATPROXY_DATABASE_URL")
    db = (asyncio.run(procs.external_database(external)) if external
          else _timed("starting PostgreSQL", lambda: procs.embedded_database(tmp / "data")))
    try:
        rows, raw = _measure(args, run, db, tmp, proxy_cpu, external is None)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut cleanup short
        run.stop_all()
        if db.pgdata is not None:
            procs.stop_embedded(db.pgdata)
        if db.drop and external:
            asyncio.run(_drop(external, db.drop))
    if args.serve:
        return 0
    raw["machine"] = _machine()
    raw["args"] = vars(args)
    raw["elapsed_s"] = time.monotonic() - started
    table = render(rows)
    print(table)
    notes = _notes(raw)
    print(notes)
    RESULTS.mkdir(exist_ok=True)
    stamp = _stamp()
    (RESULTS / f"{stamp}.json").write_text(json.dumps(raw, default=str))
    (RESULTS / f"{stamp}.txt").write_text(table + "\n" + notes + "\n")
    (RESULTS / f"{stamp}.md").write_text(markdown(rows) + "\n")
    print(f"\nraw results: {RESULTS / stamp}.json (table: .txt, markdown: .md); "
          f"total {raw['elapsed_s']:.0f}s")
    return 0


def _stamp() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


async def _drop(server_url: str, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def _measure(args: argparse.Namespace, run: procs.Procs, db: procs.Database, tmp: Path,
             proxy_cpu: int | None, embedded: bool) -> tuple[list[Any], dict[str, Any]]:
    mock_proc, line = procs.start_tool(run, "upstream", "-addr", args.mock_addr)
    mock = "http://" + line.split()[1]
    port = procs.free_port()
    env = procs.chatproxy_env(db.env, f"{mock}/v1", port, tmp)
    procs.cli(env, "users", "create", "bench")
    key = procs.cli(env, "keys", "create", "bench")
    server = _timed("starting chatproxy serve",
                    lambda: procs.serve(run, env, port, proxy_cpu, tmp / "chatproxy.log"))
    proxy = f"http://127.0.0.1:{port}"
    proxies = [phases.Proxy("chatproxy", proxy, server.pid, procs.CHATPROXY)]
    for name in args.variant:
        command = procs.variant_command(name)
        vport = procs.free_port()
        venv = procs.chatproxy_env(db.env, f"{mock}/v1", vport, tmp)
        vserver = procs.serve(run, venv, vport, proxy_cpu, tmp / f"variant-{name}.log",
                              command=command)
        proxies.append(phases.Proxy(f"variant {name}", f"http://127.0.0.1:{vport}", vserver.pid,
                                    command))

    def sessions() -> tuple[list[str], dict[str, tuple[list[str], int]]]:
        s20 = seed.create_sessions(proxy, key, 64, "bench-20", 20)
        groups = {
            "10 messages": (seed.create_sessions(proxy, key, 256, "bench-10", 10), 10),
            "10,000 messages": (seed.create_sessions(proxy, key, 1, "bench-10k", 10), 10_000),
            f"{args.big:,} messages": (seed.create_sessions(proxy, key, 1, "bench-big", 10),
                                       args.big),
        }
        asyncio.run(seed.seed(db.url, [(s20, 20), *groups.values()]))
        return s20, groups

    s20, groups = _timed("creating and seeding sessions", sessions)
    b = phases.Bench(proxies=proxies, key=key, mock=mock, mock_pid=mock_proc.pid, db=db,
                     embedded=embedded,
                     sessions20=s20, peers=_peers(args), rounds=args.rounds, window=args.window,
                     proxy_cpu=proxy_cpu)
    if args.serve:
        print(json.dumps({"mock": mock, "proxies": {p.name: p.url for p in proxies}, "key": key,
                          "sessions20": s20, "database": db.url}, indent=2), flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return b.rows, b.raw
    _timed("warming up", lambda: phases.warm_up(b))
    if args.profile:
        RESULTS.mkdir(exist_ok=True)
        out = RESULTS / f"profile-{args.profile}-{_stamp()}.txt"
        summary = spy.profile(b, args.profile, args.profile_seconds, out)
        b.raw["profile"] = summary
        print(summary)
        return b.rows, b.raw
    only = set(args.only.split(","))
    if "hops" in only:
        load_cpu = min(os.sched_getaffinity(0))
        _timed("process-to-process round trips", lambda: machine.hops(b, load_cpu))
    if "streams" in only:
        _timed(f"{args.streams} open streams", lambda: phases.open_streams(b, args.streams))
    if "latency" in only:
        _timed("latency at concurrency 1", lambda: phases.latency_c1(b))
    if "throughput" in only:
        backends = asyncio.run(seed.backend_pids(db.url)) if embedded else []
        _timed("16 clients", lambda: phases.throughput(b, 16, backends))
        res64 = _timed("64 clients", lambda: phases.throughput(b, 64, backends))
        phases.cpu_per_request(b, res64)
    if "streaming" in only:
        _timed("streaming", lambda: phases.streaming(b))
    if "history" in only:
        _timed("history against session size", lambda: phases.history_size(b, groups))
    if "overlap" in only:
        _timed("a resent conversation against the new message", lambda: overlap.overlap(b))
    if "mcp" in only:
        _timed("MCP against REST", lambda: phases.mcp(b))
    if "responses" in only:
        _timed("Responses against chat completions", lambda: responsesapi.responses_api(b))
    if "roundtrips" in only:
        _timed("database round trips", lambda: roundtrips.round_trips(b, run, tmp))
    if "search" in only:
        big = groups[f"{args.big:,} messages"][0][0]
        _timed("deep pages", lambda: search.deep_pages(b, big, args.big))
        _timed("search", lambda: search.search(b, run, tmp, args.search_sessions,
                                               args.search_per_session))
    if "long" in only:
        _timed("summaries on and off", lambda: longconv.summaries(b, run, tmp))
        _timed("the overflow path", lambda: longconv.overflow(b))
    if args.workers > 1:
        _timed(f"{args.workers} workers", lambda: scaling.workers(b, run, tmp, args.workers))
    b.raw["proxy_log_tail"] = (tmp / "chatproxy.log").read_text()[-4000:]
    _failures(b)
    return b.rows, b.raw


def _failures(b: phases.Bench) -> None:
    """One row for every request any measurement saw fail (each must succeed)."""
    failed: dict[str, int] = {}

    def walk(where: str, value: Any) -> None:
        if isinstance(value, dict):
            if isinstance(value.get("errors"), int) and "requests" in value:
                if value["errors"]:
                    failed[where] = failed.get(where, 0) + value["errors"]
                return
            for key, item in value.items():
                walk(f"{where}/{key}" if where else str(key), item)

    walk("", b.raw)
    shown = ", ".join(f"{k}: {v}" for k, v in failed.items()) or "none"
    b.row("all measurements", "failed requests", shown, "none", not failed)


def _notes(raw: dict[str, Any]) -> str:
    lines = ["", "database round trips by statement (per request):"]
    for label, detail in raw.get("round_trips", {}).items():
        lines.append(f"  {label}:")
        for sql, per in sorted(detail["by_sql_per_request"].items(), key=lambda kv: -kv[1]):
            lines.append(f"    {per:5.2f}  {sql[:100]}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
