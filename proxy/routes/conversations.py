"""The Conversations API (contract §10): a conversation is a session, its items its messages.

A thin door onto proxy/responses/conversations.py. Another user's conversation (and a deleted
one) is the same 404 as a missing one; `DELETE` is the sessions API's soft delete, so
`POST /v1/chat/sessions/{id}/restore` brings a conversation back.
"""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, delete, get, post

from proxy import codec
from proxy.access import addressed, authenticate
from proxy.openapi import documented, query
from proxy.reading import ChoiceQuery, IntQuery, TextQuery, read_json
from proxy.responses import conversations
from proxy.responses.shapes import (
    Conversation,
    ConversationCreate,
    ConversationUpdate,
    DeletedConversation,
    ItemList,
    ItemsCreate,
)
from proxy.runtime import runtime
from proxy.validation import parse_model

TAGS = ["conversations"]
ONE = "/v1/conversations/{conversation_id:str}"
LIMIT = IntQuery("limit", 20, 1, 100, "page size")
ORDER = ChoiceQuery("order", ("desc", "asc"), "`desc`: newest first")
AFTER = TextQuery("after", "an item id: the items after it, in this order")
INCLUDE = TextQuery("include", "accepted; changes nothing (repeatable)")
Item = dict[str, Any]


def _json(value: Any, request: Request[Any, Any, Any], conversation_id: str) -> Response[Any]:
    addressed(request, conversation_id)  # found: its id goes in the access log line
    return Response(codec.dumps(value), status_code=200, media_type="application/json")


@post("/v1/conversations", status_code=200, tags=TAGS, summary="Create a conversation",
      description="A new session; its items (at most 20) are stored as its first turn.",
      **documented(200, Conversation, "The conversation", 400, 401, 413, 503,
                   body=ConversationCreate, body_description="Both fields are optional."))
async def create_conversation(request: Request[Any, Any, Any]) -> Response[Any]:
    user_id = await authenticate(request)
    body = parse_model(ConversationCreate, await read_json(request, empty={}))
    made = await conversations.create(runtime(request), user_id, body.items, body.metadata)
    return _json(made, request, made["id"])


@get(ONE, tags=TAGS, summary="Get a conversation", **documented(
    200, Conversation, "The conversation", 401, 404, 503, not_found="conversation"))
async def get_conversation(request: Request[Any, Any, Any], conversation_id: str) -> Response[Any]:
    user_id = await authenticate(request)
    found = await conversations.get(runtime(request), user_id, conversation_id)
    return _json(found, request, conversation_id)


@post(ONE, status_code=200, tags=TAGS, summary="Update a conversation's metadata",
      **documented(200, Conversation, "The conversation", 400, 401, 404, 413, 503,
                   not_found="conversation", body=ConversationUpdate, body_required=True))
async def update_conversation(
    request: Request[Any, Any, Any], conversation_id: str
) -> Response[Any]:
    user_id = await authenticate(request)
    body = parse_model(ConversationUpdate, await read_json(request))
    updated = await conversations.update(runtime(request), user_id, conversation_id,
                                         body.metadata)
    return _json(updated, request, conversation_id)


@delete(ONE, status_code=200, tags=TAGS, summary="Delete a conversation",
        description="A soft delete, as the sessions API's: 404 everywhere until restored "
        "(`POST /v1/chat/sessions/{id}/restore`) or purged.", **documented(
            200, DeletedConversation, "Deleted", 401, 404, 503, not_found="conversation"))
async def delete_conversation(
    request: Request[Any, Any, Any], conversation_id: str
) -> Response[Any]:
    user_id = await authenticate(request)
    gone = await conversations.delete(runtime(request), user_id, conversation_id)
    return _json(gone, request, conversation_id)


@get(ONE + "/items", tags=TAGS, summary="List a conversation's items", **documented(
    200, ItemList, "A page of items", 400, 401, 404, 503, not_found="conversation",
    parameters=(query(LIMIT), query(ORDER), query(AFTER), query(INCLUDE))))
async def list_items(request: Request[Any, Any, Any], conversation_id: str) -> Response[Any]:
    user_id = await authenticate(request)
    page = await conversations.list_items(
        runtime(request), user_id, conversation_id, LIMIT.read(request),
        ORDER.read(request) == "desc", request.query_params.get("after"))
    return _json(page, request, conversation_id)


@post(ONE + "/items", status_code=200, tags=TAGS, summary="Add items to a conversation",
      description="Stored as one turn, after the conversation's messages.",
      **documented(200, ItemList, "The items created", 400, 401, 404, 413, 503,
                   not_found="conversation", body=ItemsCreate, body_required=True,
                   parameters=(query(INCLUDE),)))
async def add_items(request: Request[Any, Any, Any], conversation_id: str) -> Response[Any]:
    user_id = await authenticate(request)
    body = parse_model(ItemsCreate, await read_json(request))
    made = await conversations.add_items(runtime(request), user_id, conversation_id, body.items)
    return _json(made, request, conversation_id)


@get(ONE + "/items/{item_id:str}", tags=TAGS, summary="Get a conversation item",
     **documented(200, Item, "The item", 401, 404, 503, not_found="item",
                  parameters=(query(INCLUDE),)))
async def get_item(
    request: Request[Any, Any, Any], conversation_id: str, item_id: str
) -> Response[Any]:
    user_id = await authenticate(request)
    item = await conversations.get_item(runtime(request), user_id, conversation_id, item_id)
    return _json(item, request, conversation_id)


@delete(ONE + "/items/{item_id:str}", status_code=200, tags=TAGS,
        summary="Delete a conversation item",
        description="The item leaves the history. A `function_call` and the "
        "`function_call_output` answering it go together (deleting either removes both), so "
        "that the history sent upstream stays valid.", **documented(
            200, Conversation, "The conversation", 401, 404, 503, not_found="item"))
async def delete_item(
    request: Request[Any, Any, Any], conversation_id: str, item_id: str
) -> Response[Any]:
    user_id = await authenticate(request)
    found = await conversations.delete_item(runtime(request), user_id, conversation_id, item_id)
    return _json(found, request, conversation_id)


handlers = [create_conversation, get_conversation, update_conversation, delete_conversation,
            list_items, add_items, get_item, delete_item]
