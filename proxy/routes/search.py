"""Search over the caller's stored messages (contract §12), under `/v1/chat/search` and
`/chat/search` like the sessions API.

The words, the tsquery and the snippet are `proxy.searchtext`'s; the SQL is
`proxy.store.search`'s. Only the caller's active sessions are searched; a `session_id` that is
not theirs is the same 404 as everywhere.
"""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get

from proxy import codec, db, listing, schemas
from proxy.access import authenticate
from proxy.errors import SessionNotFound
from proxy.ids import is_session_id
from proxy.openapi import documented, query
from proxy.reading import MAX_OFFSET, IntQuery, TextQuery
from proxy.runtime import runtime
from proxy.store import search as search_store
from proxy.store import sessions

PATHS = ["/v1/chat/search", "/chat/search"]
Q = TextQuery("q", "the words to find (required)", max_length=1000, required=True)
LIMIT = IntQuery("limit", 20, 1, 100, "page size")
OFFSET = IntQuery("offset", 0, 0, MAX_OFFSET, "how many to skip")
AFTER = TextQuery("after", "a cursor: the `next_cursor` of the page before")
SESSION = TextQuery("session_id", "search this session only")


@get(PATHS, tags=["search"], summary="Search the caller's messages",
     description="The caller's stored messages whose text (text content and tool call "
     "arguments) holds every word of `q`, case-insensitively, each word matched as a prefix "
     "(`deploy` finds `deployment`), newest first. A word is a run of letters and digits.",
     **documented(
         200, schemas.SearchList, "Matching messages, newest first", 400, 401, 404, 503,
         parameters=tuple(query(spec) for spec in (Q, LIMIT, OFFSET, AFTER, SESSION)),
     ))
async def search(request: Request[Any, Any, Any]) -> Response[bytes]:
    user_id = await authenticate(request)
    rt = runtime(request)
    items = list(request.query_params.multi_items())
    words = listing.search_words(items)
    assert words is not None
    limit = LIMIT.read(request)
    offset = OFFSET.read(request)
    after = listing.message_position(items)
    session_id = request.query_params.get("session_id")
    if session_id is not None and not is_session_id(session_id):
        raise SessionNotFound(session_id)
    async with db.connection(rt.pool, rt.settings.db_acquire_timeout) as conn:
        if session_id is not None and await sessions.get_session(conn, user_id, session_id) is None:
            raise SessionNotFound(session_id)
        found, positions = await search_store.search_messages(
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
