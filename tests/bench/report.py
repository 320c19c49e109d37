"""Statistics over raw samples, and the one table the benchmark prints.

Percentiles are nearest-rank over every sample a target collected in all of its windows.
"Added" figures are differences between a proxy target and the direct upstream in the same
interleaved run (p50 minus p50, p99 minus p99).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


def pct(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[rank - 1])


def ms(us: float) -> float:
    return us / 1000.0


@dataclass
class Row:
    section: str
    measurement: str
    value: str
    target: str = ""
    ok: bool | None = None  # None: no target, information only

    @property
    def verdict(self) -> str:
        return "" if self.ok is None else ("pass" if self.ok else "MISS")


def fmt_ms(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.2f} ms" if abs(value) < 100 else f"{value:.0f} ms"


def check(value: float, limit: float) -> bool | None:
    return None if math.isnan(value) else value <= limit


def latency_summary(result: dict[str, Any]) -> dict[str, float]:
    lat = result["latency_us"] or []
    elapsed = result["elapsed_s"] or math.nan
    return {
        "requests": result["requests"],
        "errors": result["errors"],
        "rps": result["requests"] / elapsed if elapsed else math.nan,
        "p50_ms": ms(pct(lat, 50)),
        "p99_ms": ms(pct(lat, 99)),
        "mean_ms": ms(sum(lat) / len(lat)) if lat else math.nan,
    }


def render(rows: Sequence[Row]) -> str:
    headers = ("measurement", "result", "target", "")
    width = [len(h) for h in headers]
    for row in rows:
        cells = (row.measurement, row.value, row.target, row.verdict)
        width = [max(w, len(c)) for w, c in zip(width, cells, strict=True)]
    line = "  ".join("-" * w for w in width)
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, width, strict=True)), line]
    section = None
    for row in rows:
        if row.section != section:
            section = row.section
            out.append(f"[{section}]")
        cells = (row.measurement, row.value, row.target, row.verdict)
        out.append("  ".join(c.ljust(w) for c, w in zip(cells, width, strict=True)).rstrip())
    return "\n".join(out)


def markdown(rows: Sequence[Row]) -> str:
    out = ["| | measurement | result | target | |", "|---|---|---|---|---|"]
    section = None
    for row in rows:
        shown = row.section if row.section != section else ""
        section = row.section
        verdict = {"pass": "pass", "MISS": "**miss**", "": ""}[row.verdict]
        out.append(f"| {shown} | {row.measurement} | {row.value} | {row.target} | {verdict} |")
    return "\n".join(out)
