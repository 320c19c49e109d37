"""Who is calling: a client key verified (by the key lease or the database), for the access log.

`verify_key` is the one check of a client key for every route that does not read it together
with a session (a session turn's own read checks it, proxy/store/messages.py). `authenticate` is
that check for a Litestar route, with the path's session id checked for shape first.
"""

from __future__ import annotations

from typing import Any

from litestar import Request

from proxy import auth, db
from proxy.errors import DatabaseUnavailable, SessionNotFound, Unauthorized
from proxy.ids import is_session_id
from proxy.runtime import Runtime, runtime
from proxy.store import users


async def authenticate(
    request: Request[Any, Any, Any], *, stores_nothing: bool = False
) -> str:
    """The caller's user id; 401 for a missing, malformed, unknown or revoked key.

    With the database down this is a 503, except for a route that `stores_nothing` called with
    a key confirmed moments ago (proxy/keylease.py). A `{session_id}` in the path
    that cannot be a session id is a 404 here, before anything passes it to PostgreSQL.
    """
    key_hash = auth.client_key_hash(request.headers.get("authorization"))
    user_id = await verify_key(runtime(request), key_hash, stores_nothing=stores_nothing)
    path_id = request.path_params.get("session_id")
    if path_id is not None and not is_session_id(path_id):
        raise SessionNotFound(str(path_id))
    # For the access log line (proxy/logs.py): the id only, never the key or the user's name.
    request.scope["state"]["user_id"] = user_id
    return user_id


async def verify_key(rt: Runtime, key_hash: bytes, *, stores_nothing: bool = False) -> str:
    """The user id of the key hashed as `key_hash` (`auth.client_key_hash`; see `authenticate`).

    Answered without the database while the lease vouches for the key (proxy/keylease.py).
    """
    keys = rt.keys
    user_id = keys.user(key_hash)
    if user_id is not None:
        return user_id
    generation = keys.generation
    try:
        async with db.connection(rt.pool, rt.settings.db_acquire_timeout) as conn:
            user_id = await users.user_for_key(conn, key_hash)
    except DatabaseUnavailable:
        user_id = keys.recent(key_hash) if stores_nothing else None
        if user_id is None:
            raise
    else:
        if user_id is None:
            keys.forget(key_hash)
            raise Unauthorized("Invalid API key")
        keys.remember(key_hash, user_id, generation)
    return user_id


def addressed(request: Request[Any, Any, Any], session_id: str) -> None:
    """Name the caller's session this request found (or created) in its access log line.

    Only once found: an id that named no session of the caller's is never logged.
    """
    request.scope["state"]["session_id"] = session_id
