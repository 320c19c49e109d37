"""Statistics over raw samples, and the one table the benchmark prints.

Percentiles are nearest-rank over every sample a target collected in all of its windows.
"Added" figures are differences between a proxy target and the direct upstream in the same
interleaved run: an added p50 is the median, over rounds, of (the target's p50 in that round
minus the direct upstream's p50 in that round); an added p99 is the p99 over all of the
target's samples minus the direct upstream's.
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


def round_added(result: dict[str, Any], base: dict[str, Any],
                key: str = "round_p50_us") -> list[float]:
    """Per round: the target's p50 minus the direct upstream's p50 in the same round, in ms."""
    return [ms(a - b) for a, b in zip(result.get(key) or [], base.get(key) or [], strict=False)
            if a >= 0 and b >= 0]


def added_p50(result: dict[str, Any], base: dict[str, Any], key: str = "round_p50_us") -> float:
    """The median over rounds of the per-round added p50: a noise burst that hit one round's
    window (other work on the machine) moves one value, not the result."""
    values = round_added(result, base, key)
    return pct(values, 50) if values else math.nan


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
