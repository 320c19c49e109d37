"""`run.py --profile KIND`: py-spy on the server while one kind of request runs under load.

KIND is `session` (non-streamed turns on 20-message sessions), `plain` (no session) or `stream`
(streamed turns); with `--variant NAME` the variant is profiled instead of chatproxy. py-spy
(`.venv/bin/pip install py-spy`) samples the server process without pausing it while the load
tool keeps it busy; the collapsed stacks go to results/, and a summary of where the samples
fall (inclusive by package and by proxy function, and the hottest frames, exclusive) is printed.
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import phases
import procs

GROUPS = (
    ("proxy/routes/chat.py", "proxy.routes.chat"),
    ("proxy/routes/fastpath.py", "proxy.routes.fastpath"),
    ("proxy/routes/passthrough.py", "proxy.routes.passthrough"),
    ("proxy/chatbody.py", "proxy.chatbody"),
    ("proxy/reading.py", "proxy.reading"),
    ("proxy/access.py", "proxy.access"),
    ("proxy/turns/", "proxy.turns"),
    ("proxy/upstream.py", "proxy.upstream"),
    ("proxy/store/", "proxy.store"),
    ("proxy/tokens.py", "proxy.tokens"),
    ("proxy/history.py", "proxy.history"),
    ("proxy/db.py", "proxy.db"),
    ("proxy/app.py", "proxy.app"),
    (f"{procs.ROOT}/proxy/", "proxy (other)"),
    ("/litestar/", "litestar"),
    ("/httpx/", "httpx"),
    ("/httpcore/", "httpcore"),
    ("/anyio/", "anyio"),
    ("/asyncpg/", "asyncpg"),
    ("/uvicorn/", "uvicorn"),
    ("/tiktoken", "tiktoken"),
    ("/msgspec/", "msgspec"),
    ("/h11/", "h11"),
    ("/asyncio/", "asyncio"),
    ("/contextlib.py", "contextlib"),
    ("/hashlib", "hashlib"),
)


def _group(frame: str) -> str | None:
    for needle, name in GROUPS:
        if needle in frame:
            return name
    return None


def _strip_line(frame: str) -> str:
    """`fn (/path/file.py:12)` -> `fn (file.py)`: samples of one function add up."""
    head, _, where = frame.rpartition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    short = "/".join(path.split("/")[-2:])
    return f"{head} ({short})"


def summarize(collapsed: Path, top: int = 30) -> str:
    """Inclusive share per package / proxy module, and the hottest frames (exclusive)."""
    total = 0
    inclusive: collections.Counter[str] = collections.Counter()
    proxy_funcs: collections.Counter[str] = collections.Counter()
    exclusive: collections.Counter[str] = collections.Counter()
    idle = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        frames = stack.split(";")
        total += count
        leaf = frames[-1]
        if leaf.startswith("Runner.run ("):
            idle += count  # uvloop's own (native) work: callbacks, transports, the poll
        exclusive[_strip_line(leaf)] += count
        for name in {g for g in map(_group, frames) if g is not None}:
            inclusive[name] += count
        for name in {_strip_line(f) for f in frames if f"{procs.ROOT}/proxy/" in f}:
            proxy_funcs[name] += count
    if not total:
        return "no samples"

    def share(n: int) -> str:
        return f"{100 * n / total:5.1f}%"

    lines = [f"{total} samples (in uvloop's native code, under Runner.run: {share(idle)})",
             "", "inclusive, by package / proxy module:"]
    lines += [f"  {share(n)}  {name}" for name, n in inclusive.most_common()]
    lines += ["", "inclusive, proxy functions:"]
    lines += [f"  {share(n)}  {name}" for name, n in proxy_funcs.most_common(top)]
    lines += ["", "exclusive (self), hottest frames:"]
    lines += [f"  {share(n)}  {name}" for name, n in exclusive.most_common(top)]
    return "\n".join(lines)


def profile(b: phases.Bench, kind: str, seconds: float, out: Path) -> str:
    spy = shutil.which("py-spy") or str(procs.VENV_BIN / "py-spy")
    if not Path(spy).exists():
        raise SystemExit("bench: --profile needs py-spy: .venv/bin/pip install py-spy")
    proxy = b.proxies[-1]  # with --variant, the (last) variant
    target: dict[str, Any] = {
        "session": phases.sessioned(b, proxy, b.sessions20),
        "plain": phases.plain(b, proxy),
        "stream": phases.sessioned(b, proxy, b.sessions20, stream=True),
    }[kind]
    mode = "stream" if kind == "stream" else "request"
    concurrency = 64 if kind == "stream" else 16
    result: dict[str, Any] = {}

    def drive() -> None:
        result.update(phases.load(mode, concurrency, [target], 1, seconds + 2, warmup=0))

    driver = threading.Thread(target=drive)
    driver.start()
    subprocess.run([spy, "record", "--pid", str(proxy.pid), "--duration", str(int(seconds)),
                    "--rate", "1000", "--nonblocking", "--full-filenames", "--format", "raw",
                    "--output", str(out)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    driver.join()
    r = result[target["name"]]
    rate = r["requests"] / r["elapsed_s"]
    header = (f"profile of {proxy.name} under {kind!r}: {r['requests']} requests in "
              f"{r['elapsed_s']:.1f}s ({rate:.0f}/s, {r['errors']} errors), {concurrency} "
              f"clients; collapsed stacks in {out}")
    return header + "\n" + summarize(out)
