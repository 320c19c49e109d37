"""Timestamps on the wire: ISO 8601 UTC to the second (`2024-12-15T10:30:00Z`)."""

from __future__ import annotations

from datetime import UTC, datetime


def iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
