"""Variant: upstream requests sent through `httpx.AsyncClient.send`, as before.

For measurement only: it shows what sending through the transport directly (proxy/upstream.py
`_send`) saves, side by side with the shipped server.
"""

from __future__ import annotations

from typing import Any

import _base

if __name__ == "__main__":
    from proxy import upstream

    async def _send(client: Any, method: str, url: Any, headers: Any, content: Any) -> Any:
        request = client.build_request(method, url, headers=headers, content=content)
        return await client.send(request, stream=True)

    upstream._send = _send
    _base.serve()
