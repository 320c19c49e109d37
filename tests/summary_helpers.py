"""Helpers for the summary tests: an upstream where the summary model is just another model."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import httpx
import respx

from proxy import codec
from proxy.runtime import Runtime
from proxy.store import messages
from proxy.store.messages import NewMessage
from tests.conftest import UPSTREAM
from tests.turns import completion

SUMMARY_MODEL = "summ-mini"
WITHIN = 20.0  # a hang detector for background jobs, not a benchmark


class Upstream:
    """A respx upstream. The summary model answers `SUMMARY <n>` (its n-th call), or fails with
    a 500 (`failing`), or waits for `gate` first (`gated`); any other model answers
    `r:<the last message's content>`. Bodies are kept per kind."""

    def __init__(self) -> None:
        self.router = respx.Router(base_url=UPSTREAM, assert_all_called=False)
        self.router.post("/chat/completions").mock(side_effect=self._answer)
        self.summary_bodies: list[dict[str, Any]] = []
        self.chat_bodies: list[dict[str, Any]] = []
        self.failing = False
        self.gated = False
        self.gate = asyncio.Event()
        self.started = asyncio.Event()  # a summary call arrived

    async def _answer(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if body["model"] != SUMMARY_MODEL:
            self.chat_bodies.append(body)
            reply = f"r:{body['messages'][-1]['content']}"
            if body.get("stream"):
                return httpx.Response(200, content=_events(reply),
                                      headers={"content-type": "text/event-stream"})
            return httpx.Response(200, json=completion(reply))
        self.summary_bodies.append(body)
        self.started.set()
        if self.gated:
            await self.gate.wait()
        if self.failing:
            return httpx.Response(500, json={"error": {"message": "summary model down",
                                                       "type": "server_error"}})
        return httpx.Response(200, json=completion(f"SUMMARY {len(self.summary_bodies)}"))


def _events(text: str) -> bytes:
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
             "choices": [{"index": 0, "delta": {"role": "assistant", "content": text},
                          "finish_reason": "stop"}]}
    return f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode()


async def jobs_done(rt: Runtime) -> None:
    """Wait until no summary job runs in `rt` (a scheduled one included)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WITHIN
    while rt.summary_jobs:
        assert loop.time() < deadline, "a summary job never ended"
        await asyncio.gather(*list(rt.summary_jobs.values()), return_exceptions=True)
        await asyncio.sleep(0)


async def seed(db: asyncpg.Connection, sid: str, count: int, tokens: int = 100) -> None:
    """`count` alternating user/assistant messages `m0`, `m1`, ... of `tokens` tokens each."""
    await messages.store_turn(db, sid, [
        NewMessage({"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"}, tokens)
        for i in range(count)])


async def put_summary(db: asyncpg.Connection, sid: str, text: str, up_to_seq: int,
                      tokens: int) -> None:
    await db.execute(
        "INSERT INTO chat_summaries (session_id, text, up_to_seq, tokens, model, updated_at) "
        "VALUES ($1, $2, $3, $4, 'hand-made', now())", sid, codec.pack_text(text), up_to_seq,
        tokens)


def summary_in(body: dict[str, Any]) -> list[str]:
    """The summary messages a chat call carried."""
    return [m["content"] for m in body["messages"]
            if m["role"] == "system" and isinstance(m["content"], str)
            and m["content"].startswith("Summary of the earlier conversation:\n")]


def material(body: dict[str, Any]) -> str:
    """What a summary call asked to fold (its user message)."""
    text: str = body["messages"][1]["content"]
    return text
