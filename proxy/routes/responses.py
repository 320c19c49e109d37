"""The Responses API (contract §10): `POST /v1/responses` and the stored responses.

A thin door: `create` reads the request and hands it to proxy/responses/turn.py (one turn of
the engine); the other routes read proxy/store/responses.py. A response belongs to its user:
another user's is the same 404 as a missing one.
"""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, delete, get, post

from proxy import auth, codec
from proxy.access import authenticate
from proxy.errors import ObjectNotFound
from proxy.ids import is_object_id
from proxy.openapi import RESPONSES_CREATE, documented, query
from proxy.rawrequest import Incoming
from proxy.reading import BoolQuery, ChoiceQuery, IntQuery, TextQuery, read_json
from proxy.responses import answer, turn
from proxy.responses.shapes import DeletedResponse, ItemList, ResponseObject
from proxy.runtime import Runtime, runtime
from proxy.store import responses
from proxy.streamresponse import ClosingStream
from proxy.turns import Caller, check_key

TAGS = ["responses"]
LIMIT = IntQuery("limit", 20, 1, 100, "page size")
ORDER = ChoiceQuery("order", ("desc", "asc"), "input order (`desc`: newest first)")
AFTER = TextQuery("after", "an item id: the items after it")
STREAM = BoolQuery("stream", "the stored response as Responses events (`true` / `false`)")


@post("/v1/responses", status_code=200, **RESPONSES_CREATE)
async def create_response(request: Request[Any, Any, Any]) -> Response[Any]:
    """Reached through Litestar only for what proxy/routes/fastpath.py leaves to it."""
    rt = runtime(request)
    return await create(rt, Incoming(request.scope, request.receive, rt.settings.max_body_bytes))


async def create(rt: Runtime, request: Incoming) -> Response[Any]:
    """The answer to one `POST /v1/responses` (every route to it ends here)."""
    key_hash = auth.client_key_hash(request.headers.get("authorization"))
    key = check_key(request.headers.get("idempotency-key"))
    body = await read_json(request)
    result = await turn.respond(rt, Caller(key_hash=key_hash), body, await request.body(), key,
                                request.headers.items(), request.state)
    if isinstance(result, turn.Streamed):
        return ClosingStream(result.events, status_code=200, headers=result.headers,
                             media_type=result.headers["content-type"])
    return _sent(result.status, result.headers, result.body)


def _sent(status: int, headers: dict[str, str], body: bytes) -> Response[Any]:
    """An answer with its own headers (an upstream's error, a replay): its type among them."""
    media = next((v for k, v in headers.items() if k.lower() == "content-type"), None)
    rest = {k: v for k, v in headers.items() if k.lower() != "content-type"}
    return Response(body, status_code=status, headers=rest,
                    media_type=media or "application/json")


def _json(value: Any) -> Response[Any]:
    return Response(codec.dumps(value), status_code=200, media_type="application/json")


async def _stored(request: Request[Any, Any, Any], response_id: str) -> responses.StoredResponse:
    user_id = await authenticate(request)
    if is_object_id(response_id):
        async with runtime(request).connection() as conn:
            found = await responses.get_response(conn, user_id, response_id)
        if found is not None:
            return found
    raise ObjectNotFound("Response", response_id, param="response_id")


@get("/v1/responses/{response_id:str}", tags=TAGS, summary="Get a stored response",
     description="The response as it was answered (`store: false`: 404). With `stream=true`, "
     "as the events of a stream.", **documented(
         200, ResponseObject, "The response", 400, 401, 404, 503, not_found="response",
         parameters=(query(STREAM),)))
async def get_response(request: Request[Any, Any, Any], response_id: str) -> Response[Any]:
    stored = await _stored(request, response_id)
    final = answer.stored_response(stored)
    if STREAM.read(request):
        sent = turn.replay(final, streamed=True)
        return _sent(200, sent.headers, sent.body)
    return _json(final)


@get("/v1/responses/{response_id:str}/input_items", tags=TAGS,
     summary="List a stored response's input items",
     description="The input the response keeps as history, as items (system and developer "
     "messages and `instructions` are not kept).", **documented(
         200, ItemList, "The input items", 400, 401, 404, 503, not_found="response",
         parameters=(query(LIMIT), query(ORDER), query(AFTER))))
async def list_input_items(request: Request[Any, Any, Any], response_id: str) -> Response[Any]:
    stored = await _stored(request, response_id)
    limit, order = LIMIT.read(request), ORDER.read(request)
    page = answer.item_page(answer.input_items(stored), limit, order == "desc",
                            request.query_params.get("after"))
    return _json(page)


@delete("/v1/responses/{response_id:str}", status_code=200, tags=TAGS,
        summary="Delete a stored response", description="Later responses that chain to it "
        "keep their own history from it on.", **documented(
            200, DeletedResponse, "Deleted", 401, 404, 503, not_found="response"))
async def delete_response(request: Request[Any, Any, Any], response_id: str) -> Response[Any]:
    user_id = await authenticate(request)
    deleted = False
    if is_object_id(response_id):
        async with runtime(request).connection() as conn:
            deleted = await responses.delete_response(conn, user_id, response_id)
    if not deleted:
        raise ObjectNotFound("Response", response_id, param="response_id")
    return _json({"id": response_id, "object": "response", "deleted": True})


handlers = [create_response, get_response, list_input_items, delete_response]
