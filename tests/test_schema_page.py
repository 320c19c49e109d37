"""`/schema` works offline (issue 14, item 4): every asset the page loads comes from chatproxy."""

from __future__ import annotations

from html.parser import HTMLParser
from urllib.parse import urlsplit

from tests.turns import Client


class References(HTMLParser):
    """Every `src` and `href` in a page, with the tag that carries it."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value is not None:
                self.found.append((tag, value))


async def test_the_page_loads_every_asset_from_its_own_origin(client: Client) -> None:
    page = await client.get("/schema")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "SwaggerUIBundle(" in page.text
    parser = References()
    parser.feed(page.text)
    assert sorted(parser.found) == [
        ("link", "/schema/assets/favicon-32x32.png"),
        ("link", "/schema/assets/swagger-ui.css"),
        ("script", "/schema/assets/swagger-ui-bundle.js"),
        ("script", "/schema/assets/swagger-ui-standalone-preset.js"),
    ]
    types = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}
    for _, reference in parser.found:
        parts = urlsplit(reference)
        assert (parts.scheme, parts.netloc) == ("", ""), reference  # same origin
        r = await client.get(reference)
        assert r.status_code == 200, reference
        assert r.headers["content-type"].startswith(types["." + reference.rsplit(".", 1)[1]])
        assert "attachment" not in r.headers.get("content-disposition", "")
        assert len(r.content) > 500, reference
    bundle = await client.get("/schema/assets/swagger-ui-bundle.js")
    assert b"SwaggerUIBundle" in bundle.content


async def test_only_the_pages_own_assets_are_served(client: Client) -> None:
    # The bundle's demo page (it loads a remote spec) and anything else answer a plain 404.
    for name in ("index.html", "swagger-initializer.js", "..%2F__init__.py", "nope.js"):
        r = await client.get(f"/schema/assets/{name}")
        assert r.status_code == 404, name
        assert r.json()["error"]["code"] == "not_found"


async def test_the_assets_are_not_in_the_openapi_document(client: Client) -> None:
    paths = (await client.get("/schema/openapi.json")).json()["paths"]
    assert not [p for p in paths if p.startswith("/schema")]
