"""Search over the caller's stored messages (contract §12), under `/v1/chat/search` and
`/chat/search` like the sessions API.

The words, the tsquery and the snippet are `proxy.searchtext`'s; the SQL is
`proxy.searchstore`'s. Only the caller's active sessions are searched; a `session_id` that is
not theirs is the same 404 as everywhere.
"""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get
from litestar.openapi.spec import OpenAPIType

from proxy import codec, db, listing, searchstore, store, wire
from proxy.app import runtime
from proxy.errors import SessionNotFound
from proxy.openapi import documented, query
from proxy.routes.parsing import MAX_OFFSET, authenticate, is_session_id, query_int

PATHS = ["/v1/chat/search", "/chat/search"]


@get(PATHS, tags=["search"], summary="Search the caller's messages",
     description="The caller's stored messages whose text (text content and tool call "
     "arguments) holds every word of `q`, case-insensitively, each word matched as a prefix "
     "(`deploy` finds `deployment`), newest first. A word is a run of letters and digits.",
     **documented(
         200, wire.SearchList, "Matching messages, newest first", 400, 401, 404, 503,
         parameters=(
             query("q", OpenAPIType.STRING, "the words to find (required)", min_length=1,
                   max_length=1000),
             query("limit", OpenAPIType.INTEGER, "page size", minimum=1, maximum=100),
             query("offset", OpenAPIType.INTEGER, "how many to skip", minimum=0,
                   maximum=MAX_OFFSET),
             query("after", OpenAPIType.STRING, "a cursor: the `next_cursor` of the page "
                   "before"),
             query("session_id", OpenAPIType.STRING, "search this session only"),
         ),
     ))
async def search(request: Request[Any, Any, Any]) -> Response[bytes]:
    user_id = await authenticate(request)
    rt = runtime(request)
    items = list(request.query_params.multi_items())
    words = listing.search_words(items)
    assert words is not None
    limit = query_int(request, "limit", 20, 1, 100)
    offset = query_int(request, "offset", 0, 0, MAX_OFFSET)
    after = listing.message_position(items)
    session_id = request.query_params.get("session_id")
    if session_id is not None and not is_session_id(session_id):
        raise SessionNotFound(session_id)
    async with db.connection(rt.pool, rt.settings.db_acquire_timeout) as conn:
        if session_id is not None and await store.get_session(conn, user_id, session_id) is None:
            raise SessionNotFound(session_id)
        found, positions = await searchstore.search_messages(
            conn, user_id, words, limit + 1, offset, session_id=session_id, after=after
        )
    answer = {
        "object": "list",
        "data": found[:limit],
        "has_more": len(found) > limit,
        "next_cursor": listing.next_search_cursor(positions, limit),
    }
    # Encoded here: a snippet may hold a lone surrogate, which only codec.dumps writes.
    return Response(codec.dumps(answer), media_type="application/json")


handlers = [search]
