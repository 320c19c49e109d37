"""The `response` object (OpenAI's Responses API), made from one turn's reply. Pure.

The same function renders a response as it is answered, as it is stored and retrieved, and
as it stands while it streams (`in_progress`, no output yet), so the three agree: output item
ids come from the response id (`msg_<stem>` for the reply's message item, `fc_<stem>_<i>` for
its i-th call, `stem` being the id after `resp_`), and the echoed settings are the request's.

Status, from the chat completion's `finish_reason` and the stored reply's status:
`length` → `incomplete` (`max_output_tokens`), `content_filter` → `incomplete`
(`content_filter`), a reply cut short (the upstream broke off, the client went away) →
`incomplete` with no reason, a turn that failed before anything was stored → `failed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.errors import BadRequest
from proxy.ids import new_id
from proxy.responses.items import ItemIds, to_items
from proxy.store.responses import StoredResponse
from proxy.tokens import TOKENS_PER_MESSAGE

PREFIX = "resp_"
INCOMPLETE_REASONS = {"length": "max_output_tokens", "content_filter": "content_filter"}


def new_response_id() -> str:
    return new_id(PREFIX)


def stem(response_id: str) -> str:
    return response_id.removeprefix(PREFIX)


@dataclass(frozen=True, slots=True)
class Reply:
    """What a turn's reply says about its response: the assistant message as stored, its
    status (`complete` / `incomplete`), and the upstream's finish reason and usage."""

    message: dict[str, Any]
    status: str
    finish_reason: str | None
    usage: Any
    prompt_tokens: int  # counted: for a usage the upstream did not give
    reply_tokens: int


def response_object(
    response_id: str,
    created_at: int,
    settings: dict[str, Any],
    *,
    reply: Reply | None = None,
    previous_response_id: str | None = None,
    conversation: str | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The response; without a `reply`, as it stands before the first output (`in_progress`),
    or, with an `error`, failed."""
    status, details = _status(reply, error)
    output = to_items(reply.message, ItemIds(stem(response_id)), reply.status) if reply else []
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "error": error,
        "incomplete_details": details,
        "output": output,
        "previous_response_id": previous_response_id,
        "conversation": {"id": conversation} if conversation is not None else None,
        **settings,
        "max_tool_calls": None,
        "usage": usage(reply) if reply is not None else None,
    }


def logprobs_of(choice: Any) -> list[Any]:
    """A chat choice's (or a chunk's choice's) token log probabilities: `logprobs.content`, the
    same objects a Responses `output_text` part carries (`token`, `logprob`, `bytes`,
    `top_logprobs`); [] when it has none."""
    found = choice.get("logprobs") if isinstance(choice, dict) else None
    content = found.get("content") if isinstance(found, dict) else None
    return [p for p in content if isinstance(p, dict)] if isinstance(content, list) else []


def with_logprobs(response: dict[str, Any], logprobs: list[Any]) -> dict[str, Any]:
    """`response` with the reply's log probabilities on its message's `output_text` part (the
    upstream gave them: the request asked for `top_logprobs`). They are part of the answer, not
    of the history: a stored response is shown without them."""
    if not logprobs:
        return response
    output = []
    for item in response.get("output") or ():
        if item.get("type") == "message":
            item = {**item, "content": [
                {**part, "logprobs": logprobs} if part.get("type") == "output_text" else part
                for part in item["content"]]}
        output.append(item)
    return {**response, "output": output}


def _status(reply: Reply | None, error: dict[str, Any] | None) -> tuple[str, Any]:
    if error is not None:
        return "failed", None
    if reply is None:
        return "in_progress", None
    reason = INCOMPLETE_REASONS.get(reply.finish_reason or "")
    if reason is not None:
        return "incomplete", {"reason": reason}
    if reply.status == "incomplete":
        return "incomplete", {"reason": None}
    return "completed", None


def usage(reply: Reply) -> dict[str, Any]:
    """Responses' usage from the upstream's chat usage, or counted when it gave none."""
    given: dict[str, Any] = reply.usage if isinstance(reply.usage, dict) else {}
    prompt: Any = given.get("prompt_tokens")
    completion: Any = given.get("completion_tokens")
    if _count(prompt) and _count(completion):
        total = given.get("total_tokens")
        total = total if _count(total) else prompt + completion
    else:
        prompt, completion = reply.prompt_tokens, max(0, reply.reply_tokens - TOKENS_PER_MESSAGE)
        total = prompt + completion
    details = given.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    details = given.get("completion_tokens_details")
    reasoning = details.get("reasoning_tokens") if isinstance(details, dict) else None
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached if _count(cached) else 0,
                                 "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning if _count(reasoning) else 0},
        "total_tokens": total,
    }


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# --- stored responses ---------------------------------------------------------------------------


def stored_response(stored: StoredResponse) -> dict[str, Any]:
    """A stored response, exactly as it was answered."""
    last = stored.messages[-1]
    reply = Reply(last.message, stored.status, stored.finish_reason, stored.usage,
                  stored.prompt_tokens, last.tokens)
    return response_object(
        stored.id, int(stored.created_at.timestamp()), stored.settings, reply=reply,
        previous_response_id=stored.previous_response_id, conversation=stored.session_id,
    )


def input_items(stored: StoredResponse) -> list[dict[str, Any]]:
    """A stored response's input, as items in order (what it keeps as history)."""
    base = stem(stored.id)
    return [item for order, m in enumerate(stored.messages[:-1])
            for item in to_items(m.message, ItemIds(f"{base}_{order}"), m.status)]


def item_page(
    items: list[dict[str, Any]], limit: int, descending: bool, after: str | None
) -> dict[str, Any]:
    """OpenAI's item list: `limit` items after the item `after`, in order (400 when `after`
    names none of them)."""
    ordered = after_item(items[::-1] if descending else items, after)
    return list_of(ordered[:limit], has_more=len(ordered) > limit)


def after_item(items: list[dict[str, Any]], after: str | None) -> list[dict[str, Any]]:
    """The items after the one whose id is `after` (all of them for None; 400 when it is not
    one of them)."""
    if after is None:
        return items
    ids = [item["id"] for item in items]
    if after not in ids:
        raise BadRequest("after names no item of this list", param="after")
    return items[ids.index(after) + 1:]


def list_of(data: list[dict[str, Any]], *, has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }
