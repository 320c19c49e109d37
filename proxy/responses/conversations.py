"""The Conversations API's work (contract §10), free of HTTP: a conversation is a session.

Its id is the session's, its metadata the session's, its items views of the session's stored
messages (proxy/responses/items.py maps them; proxy/store/items.py holds the SQL). Creating a
conversation with items, or adding items, stores them as one turn. Deleting an item removes it
from the history and keeps every tool exchange whole: a `function_call` and the
`function_call_output` answering it go together (deleting either removes both); deleting an
assistant's `message` item that also carries calls keeps the calls; an assistant message left
with neither content nor calls is removed. Another user's conversation is the same 404 as a
missing one, and nothing is changed by a request that fails.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import asyncpg

from proxy.errors import BadRequest, ObjectNotFound
from proxy.ids import is_session_id
from proxy.responses.answer import after_item, list_of
from proxy.responses.items import ItemIds, calls_of, parse_item_id, to_items, to_messages
from proxy.responses.request import check_metadata
from proxy.runtime import Runtime
from proxy.store import items as stored_items
from proxy.store import sessions
from proxy.store.items import Row
from proxy.store.messages import NewMessage, store_turn

NEIGHBOURS = 64  # how far from a call its answers (or from an answer its call) are looked for


def not_found(conversation_id: str) -> ObjectNotFound:
    return ObjectNotFound("Conversation", conversation_id, param="conversation_id")


def conversation(session: dict[str, Any]) -> dict[str, Any]:
    created = datetime.fromisoformat(session["created_at"])
    return {"id": session["id"], "object": "conversation",
            "created_at": int(created.timestamp()), "metadata": session["metadata"]}


def row_items(row: Row, descending: bool = False) -> list[dict[str, Any]]:
    shown = to_items(row.message, ItemIds(str(row.id)), row.status)
    return shown[::-1] if descending else shown


async def _counted(rt: Runtime, messages: list[dict[str, Any]]) -> list[NewMessage]:
    counts = await rt.tokens.counts(None, messages)
    return [NewMessage(m, n) for m, n in zip(messages, counts, strict=True)]


async def create(
    rt: Runtime, user_id: str, items: list[Any] | None, metadata: dict[str, str] | None
) -> dict[str, Any]:
    new = await _counted(rt, to_messages(items or [], "items"))
    fields = {"metadata": check_metadata(metadata, "metadata") or {},
              "max_history_messages": rt.settings.default_max_history_messages}
    async with rt.connection() as conn, conn.transaction():
        session = await sessions.create_session(conn, user_id, fields)
        await store_turn(conn, session["id"], new)
    return conversation(session)


async def _session(
    rt: Runtime, conversation_id: str,
    act: Callable[[asyncpg.Connection], Awaitable[dict[str, Any] | None]],
) -> dict[str, Any]:
    """What `act` makes of the caller's session (404 when it answers None, or for an id that
    cannot be a session's)."""
    found = None
    if is_session_id(conversation_id):
        async with rt.connection() as conn:
            found = await act(conn)
    if found is None:
        raise not_found(conversation_id)
    return found


async def get(rt: Runtime, user_id: str, conversation_id: str) -> dict[str, Any]:
    return conversation(await _session(
        rt, conversation_id, lambda conn: sessions.get_session(conn, user_id, conversation_id)))


async def update(
    rt: Runtime, user_id: str, conversation_id: str, metadata: dict[str, str] | None
) -> dict[str, Any]:
    fields = {"metadata": check_metadata(metadata, "metadata") or {}}
    return conversation(await _session(rt, conversation_id, lambda conn: sessions.update_session(
        conn, user_id, conversation_id, fields)))


async def delete(rt: Runtime, user_id: str, conversation_id: str) -> dict[str, Any]:
    async def soft_delete(conn: asyncpg.Connection) -> dict[str, Any] | None:
        if not await sessions.soft_delete_session(conn, user_id, conversation_id):
            return None
        return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}

    return await _session(rt, conversation_id, soft_delete)


async def list_items(
    rt: Runtime, user_id: str, conversation_id: str, limit: int, descending: bool,
    after: str | None,
) -> dict[str, Any]:
    """A page of items, newest first when `descending`; `after` an item id of this list."""
    position = parse_item_id(after) if after is not None else None
    if after is not None and position is None:
        raise BadRequest("after names no item of this conversation", param="after")
    if not is_session_id(conversation_id):
        raise not_found(conversation_id)
    async with rt.connection() as conn:
        async with conn.transaction(isolation="repeatable_read", readonly=True):  # one snapshot
            if await sessions.get_session(conn, user_id, conversation_id) is None:
                raise not_found(conversation_id)
            # every message shows as one item at least: limit + 2 messages say whether more
            rows = await stored_items.page(conn, conversation_id, limit + 2, descending,
                                           position[0] if position is not None else None)
    if rows is None:
        raise BadRequest("after names no item of this conversation", param="after")
    shown = after_item([item for row in rows for item in row_items(row, descending)], after)
    return list_of(shown[:limit], has_more=len(shown) > limit)


async def add_items(
    rt: Runtime, user_id: str, conversation_id: str, items: list[Any]
) -> dict[str, Any]:
    """The items stored as one turn; the items created, as a list."""
    new = await _counted(rt, to_messages(items, "items"))
    if not is_session_id(conversation_id):
        raise not_found(conversation_id)
    async with rt.connection() as conn, conn.transaction():
        base = await stored_items.lock(conn, user_id, conversation_id)
        if base is None:
            raise not_found(conversation_id)
        rows = await stored_items.append(conn, conversation_id, base, new) if new else []
    return list_of([item for row in rows for item in row_items(row)], has_more=False)


async def get_item(
    rt: Runtime, user_id: str, conversation_id: str, item_id: str
) -> dict[str, Any]:
    position = parse_item_id(item_id)
    if not is_session_id(conversation_id):
        raise not_found(conversation_id)
    async with rt.connection() as conn:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            if await sessions.get_session(conn, user_id, conversation_id) is None:
                raise not_found(conversation_id)
            row = await stored_items.one(conn, conversation_id, position[0]) if position else None
    for item in row_items(row) if row is not None else ():
        if item["id"] == item_id:
            return item
    raise ObjectNotFound("Item", item_id, param="item_id")


async def delete_item(
    rt: Runtime, user_id: str, conversation_id: str, item_id: str
) -> dict[str, Any]:
    """The item removed from the history (the module's rules); the conversation."""
    position = parse_item_id(item_id)
    if not is_session_id(conversation_id):
        raise not_found(conversation_id)
    async with rt.connection() as conn, conn.transaction():
        if await stored_items.lock(conn, user_id, conversation_id) is None:
            raise not_found(conversation_id)
        row = await stored_items.one(conn, conversation_id, position[0]) if position else None
        item = next((i for i in row_items(row) if i["id"] == item_id), None) if row else None
        if row is None or item is None:
            raise ObjectNotFound("Item", item_id, param="item_id")
        deleted, changed = await _removal(conn, conversation_id, row, item, position)
        counted = await _counted(rt, [message for _, message in changed])
        edits = [(old.id, new.message, new.tokens)
                 for (old, _), new in zip(changed, counted, strict=True)]
        await stored_items.rewrite(
            conn, conversation_id, deleted, edits,
            sum(new.tokens for new in counted) - sum(old.tokens for old, _ in changed),
        )
        session = await sessions.get_session(conn, user_id, conversation_id)
    assert session is not None
    return conversation(session)


Removal = tuple[list[int], list[tuple[Row, dict[str, Any]]]]  # rows deleted, rows rewritten


async def _removal(
    conn: asyncpg.Connection, conversation_id: str, row: Row, item: dict[str, Any],
    position: tuple[int, int | None] | None,
) -> Removal:
    message = row.message
    if item["type"] == "message":
        if row.role == "assistant" and calls_of(message):  # the calls stay
            kept = {k: v for k, v in message.items() if k != "refusal"}
            kept["content"] = None
            return [], [(row, kept)]
        return [row.id], []
    if item["type"] == "function_call":
        return await _without_call(conn, conversation_id, row, item["call_id"],
                                   position[1] if position is not None else None)
    call_id = message.get("tool_call_id")  # a function_call_output: its call goes with it
    earlier = await stored_items.near(conn, conversation_id, row.seq, before=True,
                                      count=NEIGHBOURS)
    for candidate in earlier:
        if candidate.role == "assistant" and any(
            c.get("id") == call_id for c in calls_of(candidate.message)
        ):
            return await _without_call(conn, conversation_id, candidate, call_id, None)
    return [row.id], []


async def _without_call(
    conn: asyncpg.Connection, conversation_id: str, row: Row, call_id: Any, index: int | None
) -> Removal:
    """The assistant message `row` without the call (its `index`, or every one with
    `call_id`), and the tool messages just after it that answer that call."""
    calls = calls_of(row.message)
    kept = [c for i, c in enumerate(calls)
            if not (i == index if index is not None else c.get("id") == call_id)]
    deleted = []
    if isinstance(call_id, str):
        for later in await stored_items.near(conn, conversation_id, row.seq, before=False,
                                             count=NEIGHBOURS):
            if later.role != "tool":
                break
            if later.message.get("tool_call_id") == call_id:
                deleted.append(later.id)
    message = {k: v for k, v in row.message.items() if k != "tool_calls"}
    if kept:
        message["tool_calls"] = kept
    elif not message.get("content") and not message.get("refusal"):
        return [row.id, *deleted], []
    return deleted, [(row, message)]
