"""The turn engine (proxy/turns/engine.py draws a turn's states): what every door calls.

A door imports what it needs from here; the modules below are the engine's own.
"""

from proxy.turns.claim import Idempotency, check_key, request_hash
from proxy.turns.engine import Caller, HistorySource, TurnRequest, run_turn
from proxy.turns.outcome import Answered, Event, Outcome, Passthrough, Replayed, Streaming
from proxy.turns.write import ExtraWrite, StoredTurn, finish_reason

__all__ = [
    "Answered",
    "Caller",
    "Event",
    "ExtraWrite",
    "HistorySource",
    "Idempotency",
    "Outcome",
    "Passthrough",
    "Replayed",
    "StoredTurn",
    "Streaming",
    "TurnRequest",
    "check_key",
    "finish_reason",
    "request_hash",
    "run_turn",
]
