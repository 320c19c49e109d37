"""The Responses and Conversations APIs with the database down: 503 before the upstream is asked,
for everything that reads or keeps state; a `store: false` response without history passes, as a
chat request without a session does. On a private cluster (tests/test_faults.py's fixtures)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.config import Settings
from tests.conftest import User
from tests.fault_helpers import PrivateCluster, answering, app_client
from tests.test_faults import (  # noqa: F401  (fixtures)
    UNAVAILABLE,
    WITHIN,
    carol,
    cluster,
    fault_url,
    fdb,
    fsettings,
    running,
)

pytestmark = pytest.mark.timeout(120)


async def test_database_down_is_503_before_the_upstream_and_stateless_passes(
    running: PrivateCluster, fsettings: Settings, carol: User  # noqa: F811
) -> None:
    upstream, route = answering("passed")
    async with app_client(fsettings, upstream) as client:
        made = await client.post("/v1/conversations", json={}, headers=carol.headers)
        cid = made.json()["id"]
        warm = await client.post("/v1/responses", headers=carol.headers,
                                 json={"model": "gpt-4o", "input": "hi"})
        assert warm.status_code == 200, warm.text
        rid = warm.json()["id"]
        await asyncio.to_thread(running.stop)

        requests: list[tuple[str, str, Any]] = [
            ("POST", "/v1/responses", {"model": "gpt-4o", "input": "hi"}),
            ("POST", "/v1/responses", {"model": "gpt-4o", "input": "hi", "stream": True}),
            ("POST", "/v1/responses", {"model": "gpt-4o", "input": "hi",
                                       "previous_response_id": rid, "store": False}),
            ("POST", "/v1/responses", {"model": "gpt-4o", "input": "hi", "conversation": cid}),
            ("GET", f"/v1/responses/{rid}", None),
            ("GET", f"/v1/responses/{rid}/input_items", None),
            ("DELETE", f"/v1/responses/{rid}", None),
            ("POST", "/v1/conversations", {}),
            ("GET", f"/v1/conversations/{cid}", None),
            ("POST", f"/v1/conversations/{cid}", {"metadata": {}}),
            ("GET", f"/v1/conversations/{cid}/items", None),
            ("POST", f"/v1/conversations/{cid}/items",
             {"items": [{"role": "user", "content": "x"}]}),
            ("DELETE", f"/v1/conversations/{cid}", None),
        ]
        for method, path, body in requests:
            r = await asyncio.wait_for(
                client.request(method, path, json=body, headers=carol.headers), WITHIN)
            assert (method, path, r.status_code, r.json()) == (method, path, 503, UNAVAILABLE)
        assert route.call_count == 1  # only the warm-up

        # Nothing to read and nothing to keep: it goes through, as a chat request without a
        # session does, on the strength of the key verified moments ago.
        r = await client.post("/v1/responses", headers=carol.headers,
                              json={"model": "gpt-4o", "input": "hi", "store": False})
        assert r.status_code == 200 and r.json()["output"][0]["content"][0]["text"] == "passed"
        assert route.call_count == 2
        await asyncio.to_thread(running.start)
