"""The history of a response that is not in a conversation: its `previous_response_id` chain.

`Chain` is the turn engine's `HistorySource` for such a response: the caller's key and the chain's
newest messages in one read (proxy/store/responses.py `read_chain`), trimmed by the engine as a
session's history is (contract §7). Without a previous response there is no history: the key
alone is checked, by the database for a response that will be stored (so that with the database
down it fails closed, before the upstream is asked), else as the chat route checks a request
that stores nothing (the key lease vouches for a key verified moments ago).
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.access import verify_key
from proxy.errors import ObjectNotFound, ProxyError
from proxy.ids import is_object_id
from proxy.runtime import Runtime
from proxy.store import responses, users
from proxy.store.messages import TurnContext
from proxy.turns import Caller


@dataclass(frozen=True, slots=True)
class Chain:
    """`previous_response_id`'s chain (None: no history); `default_limit` is the window when
    the request sets none (`CHATPROXY_DEFAULT_MAX_HISTORY_MESSAGES`); `stores`: whether the
    turn will write anything."""

    previous_response_id: str | None
    default_limit: int
    stores: bool = True

    async def read(self, rt: Runtime, caller: Caller, limit: int | None) -> TurnContext | None:
        assert caller.key_hash is not None, "a Responses caller has a key"
        previous = self.previous_response_id
        if previous is None or not is_object_id(previous):
            if self.stores:
                async with rt.connection() as conn:
                    user_id = await users.user_for_key(conn, caller.key_hash)
                if user_id is None:
                    return None
            else:
                user_id = await verify_key(rt, caller.key_hash, stores_nothing=True)
            # an id that cannot be ours names no response (and is never sent to PostgreSQL)
            return TurnContext(user_id, previous is None, None, 0, None, [])
        window = self.default_limit if limit is None else limit
        async with rt.connection() as conn:
            return await responses.read_chain(conn, caller.key_hash, previous, window)

    def missing(self) -> ProxyError:
        return ObjectNotFound("Response", str(self.previous_response_id),
                              param="previous_response_id")
