"""The new routes in the access log and the metrics: route templates, the caller, the
conversation; never a key or message text."""

from __future__ import annotations

import io
from typing import Any

import httpx
import respx

from tests.conftest import User
from tests.test_logs import access, access_lines, without_timing
from tests.test_metrics import scrape, value
from tests.turns import Client, completion

TEXT = "msg-text-77e1"
REPLY = "reply-text-2b9f"


async def test_access_lines_and_metrics_name_the_route_templates_and_no_text(
    client: Client, upstream: respx.Router, alice: User, captured: io.StringIO
) -> None:
    upstream.post("/chat/completions").mock(
        return_value=httpx.Response(200, json=completion(REPLY)))
    before = await scrape(client)

    def call(method: str, path: str, rid: str, body: Any = None) -> Any:
        return client.request(method, path, json=body,
                              headers={**alice.headers, "X-Request-Id": rid})

    cid = (await call("POST", "/v1/conversations", "r-1", {
        "items": [{"role": "user", "content": TEXT}]})).json()["id"]
    answered = await call("POST", "/v1/responses", "r-2", {
        "model": "gpt-4o", "input": TEXT, "conversation": cid})
    rid = answered.json()["id"]
    await call("POST", "/v1/responses", "r-3", {"model": "gpt-4o", "input": TEXT,
                                                "previous_response_id": rid})
    items = (await call("GET", f"/v1/conversations/{cid}/items", "r-4")).json()["data"]
    await call("GET", f"/v1/conversations/{cid}/items/{items[0]['id']}", "r-5")
    await call("GET", f"/v1/responses/{rid}/input_items", "r-6")
    await call("GET", "/v1/responses/resp_missing", "r-7")

    def line(method: str, route: str, status: int, rid: str, session: str | None,
             upstream_status: int | None = None) -> dict[str, Any]:
        expected = {**access(method, route, status, rid, alice.id), "session_id": session}
        if upstream_status is not None:
            expected.update(upstream="default", upstream_status=upstream_status)
        return expected

    lines = [line for line in access_lines(captured) if line["route"] != "/metrics"]
    for entry in lines:
        entry["upstream_latency_ms"] = None
    assert [without_timing(entry) for entry in lines] == [
        line("POST", "/v1/conversations", 200, "r-1", cid),
        line("POST", "/v1/responses", 200, "r-2", cid, 200),
        line("POST", "/v1/responses", 200, "r-3", None, 200),
        line("GET", "/v1/conversations/{conversation_id}/items", 200, "r-4", cid),
        line("GET", "/v1/conversations/{conversation_id}/items/{item_id}", 200, "r-5", cid),
        line("GET", "/v1/responses/{response_id}/input_items", 200, "r-6", None),
        line("GET", "/v1/responses/{response_id}", 404, "r-7", None),
    ]
    for secret in (alice.key, TEXT, REPLY):
        assert secret not in captured.getvalue()

    after = await scrape(client)
    total = "chatproxy_requests_total"
    assert value(after, total, route="/v1/responses", method="POST", status="200") - value(
        before, total, route="/v1/responses", method="POST", status="200") == 2
    assert value(after, total, route="/v1/responses/{response_id}", method="GET",
                 status="404") == value(before, total, route="/v1/responses/{response_id}",
                                        method="GET", status="404") + 1
