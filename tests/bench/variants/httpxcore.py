"""Variant: keep httpx, but send through its transport directly (no AsyncClient layer).

`AsyncClient.send` adds, per request: URL merging (`build_request` parses the URL again), the
auth and redirect generators, cookie extraction into the client's jar (`Cookies.extract_cookies`
builds a urllib request), event hooks and elapsed-time bookkeeping. The proxy uses none of
them (redirects are refused, no auth, no cookies). This variant builds `httpx.Request` from a
cached `httpx.URL` and awaits `client._transport.handle_async_request`, which returns the same
streaming `httpx.Response` the routes already use. httpcore's connection pool stays as it is.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import _base
import httpx

_URLS: dict[str, httpx.URL] = {}


async def open_stream(client: httpx.AsyncClient, method: str, url: str,
                      headers: Mapping[str, str],
                      content: bytes | AsyncIterator[bytes] | None, **extra: Any) -> Any:
    from proxy import upstream
    from proxy.errors import UpstreamError, UpstreamTimeout

    parsed = _URLS.get(url)
    if parsed is None:
        parsed = httpx.URL(url)
        if len(_URLS) < 1024:
            _URLS[url] = parsed
    request = httpx.Request(method, parsed, headers=headers, content=content,
                            extensions={"timeout": client.timeout.as_dict()})
    started = time.perf_counter()
    try:
        response = await client._transport.handle_async_request(request)
    except httpx.TimeoutException as exc:
        if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
            raise UpstreamError("The upstream could not be reached") from None
        raise UpstreamTimeout("The upstream did not answer in time") from None
    except httpx.HTTPError:
        raise UpstreamError("The upstream could not be reached") from None
    response.request = request
    observed = getattr(upstream, "observed", None)
    if observed is not None:
        observed(extra.get("state"), extra.get("name", "default"), response.status_code,
                 time.perf_counter() - started)
    if response.is_redirect:
        await response.aclose()
        raise UpstreamError("The upstream answered with a redirect, which is not followed")
    return response


def apply() -> None:
    from proxy import upstream

    upstream.open_stream = open_stream


if __name__ == "__main__":
    apply()
    _base.serve()
