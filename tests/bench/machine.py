"""What one process-to-process hop costs on this machine, measured beside the proxy's figures.

A request through the proxy crosses more processes than one sent straight to the upstream
(the proxy itself, PostgreSQL). With the proxy on a core of its own, each crossing wakes a
process on the other core. On a VM whose idle cores halt at once (cpuidle `haltpoll` with
`guest_halt_poll_ns=0`), such a wake-up costs several times more after a few milliseconds of
idling than back to back. The latency and streaming figures run in exactly that regime, so the
table shows this cost next to them.

The probe: two processes, each pinned to a core, pass one byte back and forth over a socket
pair; `python machine.py CPU_A CPU_B GAP_S N` prints the round trips' median in µs.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the probe runs this file as a script: it imports nothing of the bench
    from phases import Bench

SAMPLES = 100
IDLE_S = 0.020  # as long as the streaming measurement's gap between chunks


def probe(cpu_a: int, cpu_b: int, gap: float, samples: int) -> float:
    """Median round trip in µs between a process on `cpu_a` and one on `cpu_b`."""
    ours, theirs = socket.socketpair()
    child = os.fork()
    if child == 0:
        os.sched_setaffinity(0, {cpu_b})
        ours.close()
        while (byte := theirs.recv(1)) not in (b"", b"q"):
            theirs.send(byte)
        os._exit(0)
    theirs.close()
    os.sched_setaffinity(0, {cpu_a})
    times = []
    for _ in range(samples):
        if gap:
            time.sleep(gap)
        started = time.perf_counter_ns()
        ours.send(b"x")
        ours.recv(1)
        times.append((time.perf_counter_ns() - started) / 1000)
    ours.send(b"q")
    os.waitpid(child, 0)
    return statistics.median(times)


def _measured(cpu_a: int, cpu_b: int, gap: float) -> float:
    out = subprocess.run(
        [sys.executable, __file__, str(cpu_a), str(cpu_b), str(gap), str(SAMPLES)],
        capture_output=True, text=True, check=True,
    ).stdout
    return float(out)


def _idle_policy() -> str:
    def read(path: str) -> str | None:
        try:
            return Path(path).read_text().strip()
        except OSError:
            return None

    driver = read("/sys/devices/system/cpu/cpuidle/current_driver") or "unknown"
    poll = read("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
    return f"cpuidle driver {driver}" + (f", guest_halt_poll_ns={poll}" if poll else "")


def hops(b: Bench, load_cpu: int) -> None:
    section = "this machine: one round trip between two processes (1 byte, a socket pair)"
    other = b.proxy_cpu if b.proxy_cpu is not None and b.proxy_cpu != load_cpu else None
    results: dict[str, float] = {}
    pairs = [("same core", load_cpu)] + ([("across cores", other)] if other is not None else [])
    for label, cpu in pairs:
        back = _measured(load_cpu, cpu, 0)
        idle = _measured(load_cpu, cpu, IDLE_S)
        results[label] = idle
        b.row(section, f"{label}: back to back / after {IDLE_S * 1000:.0f} ms idle",
              f"{back:.0f} µs / {idle:.0f} µs")
    b.row(section, "idle cores", _idle_policy())
    where = ("its own core" if other is not None
             else "the load tool's core (--share-core or one CPU)")
    b.row(section, "the proxy runs on", where)
    b.raw["hops_us"] = results


if __name__ == "__main__":
    a, b_, gap, n = sys.argv[1:5]
    print(probe(int(a), int(b_), float(gap), int(n)))
