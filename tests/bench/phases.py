"""The measurements of issue 6, one function each; every one appends rows to `Bench.rows`.

Targets of one measurement always run interleaved (the Go load tool rotates them round by
round), so drift on the machine hits all of them alike; "added" means proxy minus direct
upstream in the same run.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import procs
import seed
from report import Row, added_p50, check, fmt_ms, latency_summary, ms, pct, round_added

MODEL = "gpt-4o-mini"
PROMPT = "Hello! Please answer briefly: what is the capital of France?"
UPSTREAM_KEY = "sk-bench-upstream-key"
SLOW_MODEL = "bench-slow"
CHUNK_INTERVAL_US = 20_000


@dataclass
class Peer:
    name: str
    base_url: str  # e.g. http://127.0.0.1:4000/v1
    key: str | None
    pid: int | None


@dataclass
class Proxy:
    """A chatproxy server under test: the real one, or a variant (tests/bench/variants/)."""

    name: str
    url: str
    pid: int
    command: list[str]  # what starts one more like it (for the round-trip counter)


@dataclass
class Bench:
    proxies: list[Proxy]  # the first is `chatproxy serve` itself
    key: str
    mock: str
    mock_pid: int
    db: procs.Database
    embedded: bool
    sessions20: list[str]
    peers: list[Peer]
    rounds: int
    window: float
    proxy_cpu: int | None
    rows: list[Row] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def main(self) -> Proxy:
        return self.proxies[0]

    def row(self, section: str, what: str, value: str, target: str = "",
            ok: bool | None = None) -> None:
        self.rows.append(Row(section, what, value, target, ok))


def body(stream: bool = False, session: str | None = None, model: str = MODEL) -> str:
    value: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": PROMPT}]}
    if stream:
        value["stream"] = True
    if session is not None:
        value["session_id"] = session
    return json.dumps(value)


def direct(b: Bench, stream: bool = False) -> dict[str, Any]:
    return {"name": "direct", "url": f"{b.mock}/v1/chat/completions",
            "headers": {"Authorization": f"Bearer {UPSTREAM_KEY}"}, "bodies": [body(stream)]}


def plain(b: Bench, p: Proxy, stream: bool = False) -> dict[str, Any]:
    return {"name": p.name, "url": f"{p.url}/v1/chat/completions",
            "headers": {"Authorization": f"Bearer {b.key}"}, "bodies": [body(stream)],
            "cpu_pids": [p.pid]}


def sessioned(b: Bench, p: Proxy, ids: list[str], stream: bool = False, cycle: bool = False,
              name: str | None = None) -> dict[str, Any]:
    return {"name": name or f"{p.name}+session", "url": f"{p.url}/v1/chat/completions",
            "headers": {"Authorization": f"Bearer {b.key}"},
            "bodies": [body(stream, s) for s in ids], "cpu_pids": [p.pid], "cycle": cycle}


def ours(b: Bench, ids: list[str], stream: bool = False, backends: list[int] | None = None,
         cycle: bool = False) -> list[dict[str, Any]]:
    """Every proxy under test, without a session and on sessions `ids` (one per client, or
    with `cycle` each request on the next)."""
    targets = []
    for p in b.proxies:
        for t in (plain(b, p, stream), sessioned(b, p, ids, stream, cycle)):
            targets.append({**t, "extra_pids": backends or []})
    return targets


def peers(b: Bench, stream: bool = False) -> list[dict[str, Any]]:
    return [{"name": p.name, "url": f"{p.base_url}/chat/completions",
             "headers": {"Authorization": f"Bearer {p.key}"} if p.key else {},
             "bodies": [body(stream)], "cpu_pids": [p.pid] if p.pid else []} for p in b.peers]


def load(mode: str, concurrency: int, targets: list[dict[str, Any]], rounds: int,
         window: float, warmup: float = 0.3, cpu: int | None = None) -> dict[str, dict[str, Any]]:
    spec = {"mode": mode, "concurrency": concurrency, "rounds": rounds, "window_s": window,
            "warmup_s": warmup, "timeout_s": 60, "targets": targets}
    out = procs.run_tool("load", spec, cpu=cpu)
    results = {r["name"]: r for r in out["targets"]}
    for name, r in results.items():
        if r["errors"]:
            procs.log(f"{name}: {r['errors']} of {r['requests']} requests failed, "
                      f"e.g. {r.get('error_sample', '')[:200]}")
    return results


def _history_header(result: dict[str, Any]) -> str:
    return str(result.get("headers_seen", {}).get("x-history-messages", "none"))


# --- 0. warm up -----------------------------------------------------------------------------------


def warm_up(b: Bench) -> None:
    load("request", 8, ours(b, b.sessions20), 1, 1.0, warmup=0)
    load("stream", 8, ours(b, b.sessions20, stream=True), 1, 1.0, warmup=0)


# --- 1. concurrency 1 ---------------------------------------------------------------------------


def _limit(value: float | None) -> str:
    return f"<= {value} ms" if value is not None else ""


def latency_c1(b: Bench) -> None:
    section = "added latency at concurrency 1 (over the direct upstream)"
    # Turns go round the 64 sessions, as the turns of many users would.
    res = load("request", 1, [direct(b), *ours(b, b.sessions20, cycle=True), *peers(b)],
               b.rounds, b.window)
    b.raw["latency_c1"] = res
    base = latency_summary(res["direct"])
    b.row(section, "direct upstream p50 / p99",
          f"{fmt_ms(base['p50_ms'])} / {fmt_ms(base['p99_ms'])}")
    cases: list[tuple[str, str, float | None, float | None]] = []
    for p in b.proxies:
        cases += [(p.name, f"{p.name}, no session", 0.7, None),
                  (f"{p.name}+session", f"{p.name}, 20-message session", 1.5, 5.0)]
    cases += [(peer.name, peer.name, None, None) for peer in b.peers]
    for name, label, p50_limit, p99_limit in cases:
        s = latency_summary(res[name])
        added50 = added_p50(res[name], res["direct"])
        added99 = s["p99_ms"] - base["p99_ms"]
        b.row(section, f"{label}: added p50", fmt_ms(added50), _limit(p50_limit),
              check(added50, p50_limit) if p50_limit else None)
        b.row(section, f"{label}: added p99", fmt_ms(added99), _limit(p99_limit),
              check(added99, p99_limit) if p99_limit else None)
    for p in b.proxies:
        procs.log(f"{p.name}: history messages injected on a 20-message session: "
                  + _history_header(res[f"{p.name}+session"]))


# --- 2. throughput and CPU ------------------------------------------------------------------------


def throughput(b: Bench, concurrency: int, backends: list[int]) -> dict[str, dict[str, Any]]:
    section = f"{concurrency} concurrent clients (with a session: one 20-message session each)"
    rounds = max(2, b.rounds - 2)
    res = load("request", concurrency,
               [direct(b), *ours(b, b.sessions20, backends=backends), *peers(b)], rounds,
               b.window)
    b.raw[f"throughput_c{concurrency}"] = res
    names = [("direct", "direct upstream")]
    for p in b.proxies:
        names += [(p.name, f"{p.name}, no session"), (f"{p.name}+session", f"{p.name}, session")]
    names += [(peer.name, peer.name) for peer in b.peers]
    for name, label in names:
        s = latency_summary(res[name])
        b.row(section, label, f"{s['rps']:.0f} req/s, p50 {fmt_ms(s['p50_ms'])}, "
              f"p99 {fmt_ms(s['p99_ms'])}" + (f", {s['errors']} errors" if s["errors"] else ""))
    return res


def cpu_per_request(b: Bench, res: dict[str, dict[str, Any]]) -> None:
    section = "server CPU per request (64 clients, one worker)"
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")

    def per(r: dict[str, Any], key: str = "cpu_ticks") -> float:
        return float(r[key] * tick_ms / max(1, r["requests"] - r["errors"]))

    for p in b.proxies:
        for name, label, limit in ((p.name, "no session", 0.5),
                                   (f"{p.name}+session", "20-message session", 1.0)):
            value = per(res[name])
            b.row(section, f"{p.name}, {label}", f"{value:.2f} ms", f"<= {limit} ms",
                  check(value, limit))
            if b.embedded:
                b.row(section, "  PostgreSQL backends for it (not counted above)",
                      f"{per(res[name], 'extra_cpu_ticks'):.2f} ms")
    for peer in b.peers:
        if peer.pid:
            b.row(section, peer.name, f"{per(res[peer.name]):.2f} ms")
    best = max(latency_summary(res[t["name"]])["rps"] for t in ours(b, b.sessions20))
    headroom(b, best)


def headroom(b: Bench, best: float) -> None:
    """The mock's rate on its own core, with the load tool on the (now idle) proxy core."""
    res = load("request", 64, [{**direct(b), "cpu_pids": [b.mock_pid]}], 2, 1.5, cpu=b.proxy_cpu)
    b.raw["mock_headroom"] = res
    r = res["direct"]
    direct_rps = latency_summary(r)["rps"]
    busy = r["cpu_ticks"] / os.sysconf("SC_CLK_TCK") / r["elapsed_s"] if r["elapsed_s"] else 0
    ratio = direct_rps / best if best else math.nan
    b.row("mock upstream", "its rate on one core / chatproxy's best rate (64 clients, same load "
          "tool)", f"{ratio:.1f}x ({direct_rps:.0f} vs {best:.0f} req/s; the mock's core "
          f"{100 * busy:.0f}% busy)", ">= 10x", ratio >= 10)


# --- 3. streaming ---------------------------------------------------------------------------------


def streaming(b: Bench) -> None:
    section = "streaming: 16 chunks 20 ms apart, 4 concurrent streams"
    targets = [direct(b, stream=True), *ours(b, b.sessions20[:8], stream=True),
               *peers(b, stream=True)]
    res = load("stream", 4, targets, max(2, b.rounds - 2), max(2.0, b.window))
    b.raw["streaming"] = res
    d = res["direct"]
    d_ttfb, d_ttlb = ms(pct(d["ttfb_us"], 50)), ms(pct(d["latency_us"], 50))
    d_lags = [x for chunk in d["chunk_lag_us"] for x in chunk]
    b.row(section, "direct: TTFB p50 / TTLB p50 / chunk delay p50",
          f"{fmt_ms(d_ttfb)} / {fmt_ms(d_ttlb)} / {fmt_ms(ms(pct(d_lags, 50)))}")
    names = []
    for p in b.proxies:
        names += [(p.name, f"{p.name}, no session", True),
                  (f"{p.name}+session", f"{p.name}, session", True)]
    names += [(peer.name, peer.name, False) for peer in b.peers]
    for name, label, is_ours in names:
        r = res[name]
        ttfb50 = added_p50(r, d, "round_ttfb_p50_us")
        ttfb99 = ms(pct(r["ttfb_us"], 99)) - ms(pct(d["ttfb_us"], 99))
        ttlb50 = added_p50(r, d)
        b.row(section, f"{label}: added TTFB p50 / p99", f"{fmt_ms(ttfb50)} / {fmt_ms(ttfb99)}",
              "<= 1 ms (p50)" if is_ours else "", check(ttfb50, 1.0) if is_ours else None)
        b.row(section, f"{label}: added time to last byte p50", fmt_ms(ttlb50))
        lags = [x for chunk in r["chunk_lag_us"] for x in chunk]
        held = sum(1 for x in lags if x >= CHUNK_INTERVAL_US)
        b.row(section, f"{label}: chunk delay (arrival - upstream send) p50 / p99 / max",
              f"{fmt_ms(ms(pct(lags, 50)))} / {fmt_ms(ms(pct(lags, 99)))} / "
              f"{fmt_ms(ms(max(lags))) if lags else 'n/a'}")
        expected = 16 * len(r["latency_us"])
        b.row(section, f"{label}: chunks held back (>= 20 ms late) / chunks seen",
              f"{held} / {len(lags)} (of {expected} sent)", "0 held back" if is_ours else "",
              (held == 0 and len(lags) == expected) if is_ours else None)


# --- 4. history cost against session size -----------------------------------------------------


def history_size(b: Bench, groups: dict[str, tuple[list[str], int]]) -> None:
    section = "a turn against session size (10 messages of history injected in each)"
    targets = [direct(b)] + [sessioned(b, b.main, ids, cycle=True, name=label)
                             for label, (ids, _) in groups.items()]
    merged: dict[str, dict[str, Any]] = {}
    for r in range(b.rounds):
        order = targets[r % len(targets):] + targets[:r % len(targets)]
        for name, result in load("request", 1, order, 1, b.window, warmup=0.15).items():
            into = merged.setdefault(name, {"requests": 0, "errors": 0, "elapsed_s": 0.0,
                                            "latency_us": [], "round_p50_us": []})
            for key in ("requests", "errors", "elapsed_s"):
                into[key] += result[key]
            for key in ("latency_us", "round_p50_us"):
                into[key] += result[key] or []
            into["headers_seen"] = result.get("headers_seen", {})
        # Back to the seeded sizes, so every round measures the same sessions.
        asyncio.run(seed.trim_back(b.db.url, list(groups.values())))
    b.raw["history_size"] = merged
    base = latency_summary(merged["direct"])
    labels = list(groups)
    for label in labels:
        s = latency_summary(merged[label])
        header = _history_header(merged[label])
        b.row(section, f"{label}: added p50 / p99 (history header {header})",
              f"{fmt_ms(added_p50(merged[label], merged['direct']))} / "
              f"{fmt_ms(s['p99_ms'] - base['p99_ms'])}")
    small = round_added(merged[labels[0]], merged["direct"])
    big = round_added(merged[labels[-1]], merged["direct"])
    ratios = [x / y for x, y in zip(big, small, strict=False) if y > 0]
    ratio = pct(ratios, 50) if ratios else math.nan
    b.row(section, f"{labels[-1]} / {labels[0]}: added p50, median of the rounds' ratios",
          f"{ratio:.2f}x", "<= 1.2x", check(ratio, 1.2))


# --- 5. MCP against the REST request it stands for -------------------------------------------

# The two eras of the protocol the SDK serves on /mcp: a 2025-11-25 client (initialize
# handshake; the SDK's stateless transport gives each POST a task, memory streams and a
# dispatcher) and a 2026-07-28 one (no handshake; the per-request envelope in `_meta`, served
# in the request's own task). The official `Client` speaks 2026-07-28 when the server does.
HANDSHAKE, MODERN = "2025-11-25", "2026-07-28"


def mcp_call(tool: str, era: str = HANDSHAKE, **arguments: Any) -> tuple[dict[str, str], str]:
    """The headers and body of one `tools/call` POST on /mcp in that era."""
    params: dict[str, Any] = {"name": tool, "arguments": arguments}
    headers = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": era}
    if era == MODERN:
        params["_meta"] = {"io.modelcontextprotocol/protocolVersion": era,
                           "io.modelcontextprotocol/clientCapabilities": {}}
        headers.update({"Mcp-Method": "tools/call", "Mcp-Name": tool})
    return headers, json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                                "params": params})


def _tool_target(b: Bench, name: str, era: str, calls: list[tuple[dict[str, str], str]]
                 ) -> dict[str, Any]:
    """A load target of tool calls (each request the next call); the first is checked to be a
    real result (a tool error is an HTTP 200 too)."""
    p = b.main
    auth = {"Authorization": f"Bearer {b.key}"}
    headers, first = calls[0]
    answer = procs.http_json(f"{p.url}/mcp", json.loads(first), {**auth, **headers})
    assert not answer["result"]["isError"], answer
    return {"name": f"{name} over /mcp ({era})", "url": f"{p.url}/mcp",
            "headers": {**auth, **headers}, "bodies": [body for _, body in calls],
            "cpu_pids": [p.pid], "cycle": True}


def mcp(b: Bench) -> None:
    """Two tools against the REST request each stands for, at concurrency 1, interleaved:
    `list_sessions` (the 20 most recent sessions) against `GET /v1/chat/sessions`, and
    `send_message` (a turn on a 20-message session, going round them) against
    `POST /v1/chat/completions` with the same session, model and message; each tool in both
    protocol eras."""
    section = "MCP: a tool call on /mcp against the same REST request (concurrency 1)"
    p = b.main
    auth = {"Authorization": f"Bearer {b.key}"}
    listed = procs.http_json(f"{p.url}/mcp", json.loads(mcp_call("list_sessions")[1]),
                             {**auth, **mcp_call("list_sessions")[0]})
    assert len(listed["result"]["structuredContent"]["sessions"]) == 20, listed
    rest_list = {"name": "GET /v1/chat/sessions", "method": "GET",
                 "url": f"{p.url}/v1/chat/sessions", "headers": auth, "bodies": [""],
                 "cpu_pids": [p.pid]}
    rest_turn = sessioned(b, p, b.sessions20, cycle=True,
                          name="POST /v1/chat/completions with session_id")
    pairs: list[tuple[dict[str, Any], list[dict[str, Any]]]] = [(rest_list, []), (rest_turn, [])]
    for era in (HANDSHAKE, MODERN):
        pairs[0][1].append(_tool_target(b, "list_sessions", era, [mcp_call("list_sessions", era)]))
        pairs[1][1].append(_tool_target(b, "send_message", era, [
            mcp_call("send_message", era, session_id=s, content=PROMPT, model=MODEL)
            for s in b.sessions20]))
    targets = [t for rest, tools in pairs for t in (rest, *tools)]
    res = load("request", 1, targets, b.rounds, b.window)
    b.raw["mcp"] = res
    for t in targets:
        s = latency_summary(res[t["name"]])
        b.row(section, f"{t['name']}: p50 / p99", f"{fmt_ms(s['p50_ms'])} / {fmt_ms(s['p99_ms'])}")
    for rest, tools in pairs:
        for tool in tools:
            added = added_p50(res[tool["name"]], res[rest["name"]])
            b.row(section, f"{tool['name']}: added p50 over {rest['name']}", fmt_ms(added),
                  "<= 1 ms", check(added, 1.0))


# --- 6. 500 open slow streams ---------------------------------------------------------------


def open_streams(b: Bench, n: int = 500) -> None:
    for p in b.proxies:
        _hold(b, p, n)


def _hold(b: Bench, p: Proxy, n: int) -> None:
    section = f"{n} open slow streams (turns on 20-message sessions)"
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(procs.rss_kib(p.pid))
            time.sleep(0.02)

    def upstream_open() -> int:
        return int(procs.http_json(f"{b.mock}/bench/open")["open"])

    time.sleep(0.5)
    before = upstream_open()  # streams some earlier proxy left open (should be 0)
    baseline = procs.rss_kib(p.pid)
    spec = {"url": f"{p.url}/v1/chat/completions",
            "headers": {"Authorization": f"Bearer {b.key}"},
            "bodies": [body(True, s, SLOW_MODEL) for s in b.sessions20], "n": n,
            "open_at_once": 50}
    hold = subprocess.Popen([str(procs.TOOL), "hold"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert hold.stdin is not None and hold.stdout is not None
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        hold.stdin.write(json.dumps(spec) + "\n")
        hold.stdin.flush()
        opened = json.loads(hold.stdout.readline())
        time.sleep(2.0)
        while_open = upstream_open() - before
        hold.stdin.write("leave\n")
        hold.stdin.flush()
        left_at = time.monotonic()
        after: dict[str, int] = {}
        for seconds in (1.0, 3.0):
            time.sleep(max(0.0, left_at + seconds - time.monotonic()))
            after[f"{seconds:.0f}s"] = upstream_open() - before
        hold.stdout.readline()
    finally:
        stop.set()
        sampler.join()
        if hold.poll() is None:
            hold.kill()
        hold.wait()
    peak = max(samples) if samples else 0
    per_stream_kb = (peak - baseline) * 1024 / 1000 / max(1, opened["opened"])
    b.raw.setdefault("open_streams", {})[p.name] = {
        "baseline_kib": baseline, "peak_kib": peak, "opened": opened,
        "upstream_while_open": while_open, "upstream_open_after": after,
        "rss_samples_kib": samples}
    b.row(section, f"{p.name}: streams open through it / at the upstream",
          f"{opened['opened']} / {while_open}"
          + (f" ({opened['failed']} failed: {opened['error_sample'][:60]})"
             if opened["failed"] else ""))
    b.row(section, f"{p.name}: server RSS before / peak",
          f"{baseline / 1024:.1f} MiB / {peak / 1024:.1f} MiB")
    b.row(section, f"{p.name}: server memory per open stream", f"{per_stream_kb:.1f} KB",
          "<= 50 KB", per_stream_kb <= 50)
    for mark in ("1s", "3s"):
        b.row(section, f"{p.name}: upstream streams still open {mark[:-1]} s after the clients "
              "left", f"{after[mark]} of {while_open}", "0", after[mark] == 0)
