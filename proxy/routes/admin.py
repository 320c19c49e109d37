"""The admin API: users and their keys, behind `CHATPROXY_ADMIN_KEY` (404 when unset)."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, delete, get, post
from pydantic import BaseModel, ConfigDict, Field

from proxy import auth, db, keylease, schemas
from proxy.errors import Conflict, NotFound, unknown_route
from proxy.ids import is_object_id
from proxy.openapi import documented
from proxy.reading import read_json
from proxy.runtime import runtime
from proxy.store import users
from proxy.validation import parse_model


class NewUser(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")


class NewKey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(default=None, max_length=200, pattern=r"^[^\x00-\x1f\x7f]*$")


def _admin(request: Request[Any, Any, Any]) -> Any:
    rt = runtime(request)
    if rt.settings.admin_key is None:
        # Disabled: exactly what a path the proxy does not serve answers.
        raise unknown_route(request.method, request.url.path)
    auth.check_admin(request.headers.get("authorization"), rt.settings.admin_key)
    return rt


def _check_id(value: str, what: str, param: str) -> None:
    """A path id that cannot be one of ours (a NUL, a control character, a lone surrogate, which
    PostgreSQL could not even take) names nothing: 404 before any query, the text not echoed."""
    if not is_object_id(value):
        raise NotFound(f"{what} not found", param=param)


TAGS = ["admin"]


def _doc(status: int, answer: Any, description: str, *errors: int, **more: Any) -> Any:
    return documented(status, answer, description, 401, 403, 404, 503, *errors, admin=True,
                      not_found="admin", **more)


@post("/admin/users", status_code=201, tags=TAGS, summary="Create a user", **_doc(
    201, schemas.User, "The new user", 400, 409, 413, body=NewUser, body_required=True))
async def create_user(request: Request[Any, Any, Any]) -> dict[str, Any]:
    rt = _admin(request)
    body = parse_model(NewUser, await read_json(request))
    async with db.connection(rt.pool, rt.settings.db_acquire_timeout) as conn:
        user = await users.create_user(conn, body.name)
    if user is None:
        raise Conflict(f"A user named {body.name!r} already exists", param="name")
    return user


@get("/admin/users", tags=TAGS, summary="List users", **_doc(200, schemas.UserList, "Every user"))
async def list_users(request: Request[Any, Any, Any]) -> dict[str, Any]:
    rt = _admin(request)
    async with db.connection(rt.pool, rt.settings.db_acquire_timeout) as conn:
        everyone = await users.list_users(conn)
    return {"object": "list", "data": everyone}


@post("/admin/users/{user_id:str}/keys", status_code=201, tags=TAGS, summary="Issue a key",
      **_doc(201, schemas.NewApiKey, "The new key; `key` is shown here only, never again", 400,
             413, body=NewKey))
async def create_key(request: Request[Any, Any, Any], user_id: str) -> dict[str, Any]:
    rt = _admin(request)
    body = parse_model(NewKey, await read_json(request, empty={}))
    _check_id(user_id, "User", "user_id")
    async with db.connection(rt.pool, rt.settings.db_acquire_timeout) as conn:
        key = await auth.issue_key(conn, user_id, body.name)
    if key is None:
        raise NotFound(f"User {user_id} not found", param="user_id")
    return {k: key[k] for k in ("id", "object", "key", "prefix", "name", "user_id", "created_at")}


@get("/admin/users/{user_id:str}/keys", tags=TAGS, summary="List a user's keys",
     **_doc(200, schemas.ApiKeyList, "The user's keys, without their secrets"))
async def list_keys(request: Request[Any, Any, Any], user_id: str) -> dict[str, Any]:
    rt = _admin(request)
    _check_id(user_id, "User", "user_id")
    async with db.connection(rt.pool, rt.settings.db_acquire_timeout) as conn:
        user = await users.find_user(conn, user_id)
        if user is None or user["id"] != user_id:
            raise NotFound(f"User {user_id} not found", param="user_id")
        keys = await users.list_keys(conn, user_id)
    return {"object": "list", "data": keys}


@delete("/admin/keys/{key_id:str}", status_code=204, tags=TAGS, summary="Revoke a key",
        **_doc(204, None, "Revoked: the key is refused from the next request on. The answer "
               "comes about 1.2 s after the revocation commits, once no chatproxy process can "
               "still trust a cached copy of the key"))
async def revoke_key(request: Request[Any, Any, Any], key_id: str) -> Response[None]:
    rt = _admin(request)
    _check_id(key_id, "Key", "key_id")
    async with db.connection(rt.pool, rt.settings.db_acquire_timeout) as conn:
        found = await users.revoke_key(conn, key_id)
    if not found:
        raise NotFound(f"Key {key_id} not found", param="key_id")
    await keylease.settle()  # until no server can still trust a cached copy (proxy/keylease.py)
    return Response(None, status_code=204)


handlers = [create_user, list_users, create_key, list_keys, revoke_key]
