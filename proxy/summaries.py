"""Summaries of what long sessions leave out (contract §11): the job that writes them.

`schedule` is called by the turn engine once a stored turn's answer is done, when the turn left
out messages its session's summary does not cover (proxy/turns/summary.py decides). It starts a
task and returns: nothing of the job is awaited on any request's path. The task waits a moment
(so that the answer that scheduled it goes out first), then runs `run`:

    take the session's job lock ──(held elsewhere)──> busy: that job will do it
      │ (a session-level advisory lock on a hash of the session id: one job per session at a
      │  time across every process on the database, released when this one ends or dies)
    read where the summary stands ──(backing off after a failure)──> skipped
      │
    repeat, oldest first, until the summary covers `up_to` (at most MAX_CALLS times):
      the next messages that fit one call, rendered as plain text (tool calls and results
      included), with the summary so far, to the summary model (routed like any model, through
      the same client) ──(an error, a timeout, no text)──> failed: the row's back-off doubles
      store the new summary, unless the session changed meanwhile (a clear): then stop

`compact` is the same job run now, for `POST .../compact`: everything older than the session's
current window, however many calls that takes, with the upstream's error passed back.

Per process at most MAX_JOBS jobs run at once (each holds a database connection while its model
answers) and one per session; a turn that finds the summary behind while none can start
schedules it again later. Shutdown cancels running jobs (`stop`); a later turn redoes them.
Logs never carry message or summary text.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any

import asyncpg

from proxy import codec, db, metrics
from proxy import upstream as up
from proxy.document import Summary, summary_message
from proxy.errors import DatabaseUnavailable, UpstreamBusy, UpstreamError, UpstreamTimeout
from proxy.runtime import Runtime
from proxy.store import database
from proxy.store import summaries as store
from proxy.store.summaries import Earlier

log = logging.getLogger("chatproxy.summaries")

START_DELAY = 0.05  # seconds a scheduled job waits, so that the turn's answer goes out first
MAX_JOBS = 4  # jobs one process runs at once
MAX_CALLS = 4  # summary calls one background job makes; a longer backlog goes on next time
FIRST_BACKOFF = 30.0  # seconds before a job runs again after a failure, doubled each time
MAX_BACKOFF = 3600.0
CALL_TOKENS = 24_000  # at most this much of the conversation per summary call
MIN_CALL_TOKENS = 512
ROWS = 500  # messages read per step
CHARS_PER_TOKEN = 3  # for cutting one message too long for a call on its own
_LOCK_NAMESPACE = b"chatproxy summary job\0"
_UPSTREAM_FAILURES = (UpstreamError, UpstreamTimeout, UpstreamBusy)


class SummaryFailed(Exception):
    """The summary model gave no summary. `answer` is its HTTP error (status, headers, body)
    when it sent one; `reason` says what happened, without any text of it."""

    def __init__(self, reason: str, answer: tuple[int, dict[str, str], bytes] | None = None):
        super().__init__(reason)
        self.reason = reason
        self.answer = answer


def lock_key(session_id: str) -> int:
    """The session's job lock: a signed 64-bit advisory lock key from its id."""
    digest = hashlib.blake2b(_LOCK_NAMESPACE + session_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def schedule(rt: Runtime, session_id: str, up_to: int, model: Any) -> None:
    """Start a job bringing the session's summary up to `up_to`, unless one runs here already
    or this process runs MAX_JOBS (a later turn schedules it again); `model` counts its tokens."""
    jobs = rt.summary_jobs
    if (rt.settings.summary_model is None or jobs is None or session_id in jobs
            or len(jobs) >= MAX_JOBS):
        return
    task = rt.track(asyncio.create_task(_background(rt, session_id, up_to, model)))
    jobs[session_id] = task
    task.add_done_callback(lambda _: jobs.pop(session_id, None))


async def stop(rt: Runtime) -> None:
    """Cancel the running jobs and wait for them, and start none after (shutdown: a later turn
    redoes them)."""
    running = list((rt.summary_jobs or {}).values())
    rt.summary_jobs = None
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)


async def _background(rt: Runtime, session_id: str, up_to: int, model: Any) -> None:
    await asyncio.sleep(START_DELAY)
    try:
        outcome, _ = await run(rt, session_id, up_to, model)
    except (SummaryFailed, *_UPSTREAM_FAILURES):
        outcome = "failed"  # logged, and the back-off recorded, by `run`
    except DatabaseUnavailable:
        log.warning("summary job for session %s skipped: the database is unavailable",
                    session_id)
        outcome = "failed"
    except Exception:
        log.exception("summary job for session %s failed", session_id)
        outcome = "failed"
    metrics.summary_job(outcome)


async def compact(rt: Runtime, session_id: str, model: Any) -> tuple[str, Summary | None]:
    """`POST .../compact`: everything older than the session's window summarised now."""
    outcome, summary = await run(rt, session_id, None, model, forced=True)
    metrics.summary_job(outcome)
    return outcome, summary


async def run(
    rt: Runtime, session_id: str, up_to: int | None, model: Any, *, forced: bool = False
) -> tuple[str, Summary | None]:
    """One job: (outcome, the summary as it stands after it). `up_to` None means everything
    older than the current window; `forced` (compaction) ignores the back-off, records none,
    and makes as many calls as it takes. Raises SummaryFailed or the upstream's error."""
    key = lock_key(session_id)
    # Every statement of a job is small (a lock, ROWS rows, one summary), so each gets the
    # request's timeout: a database that hangs while the summary model writes is a 503 for
    # `POST .../compact` in seconds, not after the bulk timeout.
    async with rt.connection() as conn:
        if not await database.try_lock(conn, key):
            return "busy", None
        try:
            return await _fold(rt, conn, session_id, up_to, model, forced)
        finally:
            unlocked = False
            try:
                await database.unlock(conn, key)
                unlocked = True
            except (*db.UNAVAILABLE, asyncpg.PostgresError):
                pass
            finally:
                # A lock that may still be held (a failed or cancelled unlock) must not go
                # on to the pool's next borrower: that connection is closed, not reused.
                if not unlocked:
                    rt.pool.discard_on_release(conn)


async def _fold(
    rt: Runtime, conn: asyncpg.Connection, session_id: str, up_to: int | None, model: Any,
    forced: bool,
) -> tuple[str, Summary | None]:
    state = await store.job_state(conn, session_id)
    if state is None:
        return "skipped", None
    if state.backing_off and not forced:
        return "skipped", state.summary
    if up_to is None:  # compaction: what lies before the window (all of it for a window of 0)
        up_to = state.window_start - 1 if state.window_start is not None else state.newest or 0
    summary, covered, calls = state.summary, state.up_to_seq, 0
    while covered < up_to and (forced or calls < MAX_CALLS):
        rows = await store.messages_between(conn, session_id, covered, up_to, ROWS)
        if not rows:
            break
        batch, room = _batch(rt, rows, summary)
        try:
            text = await _summarise(rt, material(summary, batch, room))
        except (SummaryFailed, *_UPSTREAM_FAILURES) as exc:
            if not forced:
                await _failed(conn, session_id, exc)
            raise
        tokens = (await rt.tokens.counts(model, [summary_message(text)]))[0]
        fresh = Summary(text, batch[-1].seq, tokens, rt.settings.summary_model,
                        datetime.now(UTC))
        if not await store.save(conn, session_id, covered, fresh):
            return "skipped", None  # the session changed meanwhile (cleared, deleted)
        summary, covered, calls = fresh, fresh.up_to_seq, calls + 1
    return ("stored" if calls else "skipped"), summary


async def _failed(conn: asyncpg.Connection, session_id: str, exc: Exception) -> None:
    reason = exc.reason if isinstance(exc, SummaryFailed) else f"the upstream: {exc}"
    delay = await store.failed(conn, session_id, FIRST_BACKOFF, MAX_BACKOFF)
    log.warning("summary job for session %s failed (%s); next try in %.0f s at the earliest",
                session_id, reason, delay)


def _batch(
    rt: Runtime, rows: list[Earlier], summary: Summary | None
) -> tuple[list[Earlier], int]:
    """The oldest rows that fit one call, and the call's room in tokens: the summary model's
    window, less its reply reserve, the prompt and the summary so far, and at most CALL_TOKENS.
    At least one row (cut to the room when it is longer on its own)."""
    model = rt.settings.summary_model
    info = rt.tokens.table.lookup(model)
    window = info.context_window  # the table's: a window a refusal stated is one user's
    overhead = len(rt.settings.summary_prompt) // CHARS_PER_TOKEN + 64
    previous = summary.tokens if summary is not None else 0
    room = max(MIN_CALL_TOKENS, min(CALL_TOKENS, window - info.reserve_output_tokens
                                    - overhead - previous))
    taken: list[Earlier] = []
    used = 0
    for row in rows:
        if taken and used + row.tokens > room:
            break
        taken.append(row)
        used += row.tokens
    return taken, room


async def _summarise(rt: Runtime, text: str) -> str:
    """The summary model's answer to `text` (`material`) under the summary prompt."""
    model = rt.settings.summary_model
    target = rt.settings.upstream_for(model)
    body = {"model": model, "messages": [
        {"role": "system", "content": rt.settings.summary_prompt},
        {"role": "user", "content": text},
    ]}
    response = await up.open_stream(
        rt.http, "POST", up.url_for(target, "/chat/completions"), up.request_headers(target, ()),
        codec.dumps(body), name=target.name,
    )
    raw = await up.read_body(response)
    if response.status_code != 200:
        answer = (response.status_code, up.response_headers(response.headers), raw)
        raise SummaryFailed(f"the summary model answered {response.status_code}", answer)
    summary: str | None = None
    with suppress(codec.InvalidJSON):
        summary = _answer_text(codec.loads(raw))
    if not summary:
        raise SummaryFailed("the summary model's answer holds no text")
    return summary


def _answer_text(answer: Any) -> str | None:
    try:
        content = answer["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    text = content_text(content).strip()
    return text or None


# --- what the summary model reads ---------------------------------------------------------------


def material(summary: Summary | None, batch: list[Earlier], room: int) -> str:
    """The summary so far and the messages to fold into it, as plain text: one system message
    comes out of it whatever the messages held (tool calls, tool results, parts). A message
    longer than the call's `room` (tokens) on its own is cut to it."""
    chars = room * CHARS_PER_TOKEN
    lines = [line(codec.loads(row.body))[:chars] for row in batch]
    previous = summary.text if summary is not None else "(none yet)"
    return ("The summary so far:\n" + previous + "\n\nNew messages, oldest first:\n"
            + "\n".join(lines))


def line(message: dict[str, Any]) -> str:
    """One message as a line of the transcript the summary model reads."""
    role = str(message.get("role"))
    name = message.get("name")
    who = f"{role} ({name})" if isinstance(name, str) and name else role
    parts = [content_text(message.get("content"))]
    if isinstance(message.get("refusal"), str):
        parts.append(f"[refused: {message['refusal']}]")
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else []:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            parts.append(f"[calls {function.get('name')}({function.get('arguments')})]")
    legacy = message.get("function_call")
    if isinstance(legacy, dict):
        parts.append(f"[calls {legacy.get('name')}({legacy.get('arguments')})]")
    if role == "tool":
        who = f"tool result for {message.get('tool_call_id')}"
    return f"{who}: " + " ".join(p for p in parts if p)


def content_text(content: Any) -> str:
    """A message's content as text: a string as it is, an array's text parts joined (other
    parts named by type)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    texts = []
    for part in content:
        if isinstance(part, dict) and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(part, dict):
            texts.append(f"[{part.get('type', 'part')}]")
    return " ".join(texts)
