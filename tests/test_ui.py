"""The session browser (`/ui`, contract §12) in a real headless Chromium, against a live
`chatproxy serve` and the streaming fake upstream.

Debian's `chromium` and `chromium-driver`, driven by Selenium with the driver's path given, so
Selenium Manager never downloads anything (`.ci/run` installs both packages). With
CHATPROXY_UI_SCREENSHOT=path the transcript's screenshot is also written there (how
docs/session-browser.png is made).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.conftest import User, make_user
from tests.fake_upstream import FakeUpstream
from tests.fault_helpers import Serve, serve_env

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
HOSTILE = '<img src=x onerror="window.__pwned=1"> and <b>not bold</b>'

if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)) and not os.environ.get("CI"):
    pytest.skip("chromium and chromium-driver are not installed (.ci/run installs them)",
                allow_module_level=True)

from selenium import webdriver  # noqa: E402 (after the skip: only where Chromium is)
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream()
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def server(database_url: str, upstream: FakeUpstream, tmp_path: Path) -> Iterator[Serve]:
    proxy = Serve(serve_env(database_url, upstream.url + "/v1", tmp_path),
                  tmp_path / "serve.log")
    try:
        yield proxy.start()
    finally:
        proxy.stop()


@pytest.fixture
def downloads(tmp_path: Path) -> Path:
    path = tmp_path / "downloads"
    path.mkdir()
    return path


@pytest.fixture
def browser(downloads: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WebDriver]:
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager: never fetch a driver
    profile = tempfile.mkdtemp(prefix="chatproxy-chromium-")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,800",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {
        "download.default_directory": str(downloads), "download.prompt_for_download": False})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.execute_cdp_cmd("Browser.setDownloadBehavior",
                               {"behavior": "allow", "downloadPath": str(downloads)})
        # A laptop's screen: the page itself gets 1280 x 800.
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False})
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait(driver: WebDriver, condition: Callable[[WebDriver], Any], timeout: float = 15) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.05,
                         ignored_exceptions=[StaleElementReferenceException]).until(condition)


def visible(driver: WebDriver, css: str) -> list[WebElement]:
    return [e for e in driver.find_elements(By.CSS_SELECTOR, css) if e.is_displayed()]


def click_text(driver: WebDriver, css: str, text: str) -> None:
    element = wait(driver, lambda d: next(
        (e for e in visible(d, css) if text in e.text), None))
    element.click()


def open_listed(driver: WebDriver, name: str) -> None:
    """Click the session named `name` in the list, loading further pages until it is there."""
    def found(d: WebDriver) -> WebElement | None:
        for item in visible(d, ".item:not(.hit)"):
            if item.find_element(By.CSS_SELECTOR, ".name").text == name:
                return item
        more = visible(d, "#more")
        if more:
            more[0].click()
        return None

    wait(driver, lambda d: visible(d, ".item"))
    wait(driver, found).click()


def messages(driver: WebDriver) -> list[str]:
    return [e.text for e in visible(driver, "#messages > li")]


def _json_file(path: Path) -> Any:
    """The file's JSON once it is there whole (a download is renamed into place at the end)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def api(server: Serve, user: User, method: str, path: str, **kwargs: Any) -> Any:
    r = httpx.request(method, server.url + path, headers=user.headers, timeout=30, **kwargs)
    assert r.status_code < 300, r.text
    return r.json() if r.content else None


def test_the_page_is_one_origin_and_locked_down(server: Serve) -> None:
    page = httpx.get(server.url + "/ui")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "no-referrer"
    assert "http://" not in page.text and "https://" not in page.text and "<style" not in page.text
    assert " style=" not in page.text and "<script>" not in page.text
    for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css"),
                       ("icon.svg", "image/svg+xml")):
        asset = httpx.get(f"{server.url}/ui/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
        assert asset.headers["content-security-policy"] == csp
        assert "http://" not in asset.text.replace("http://www.w3.org/2000/svg", "")
        assert "https://" not in asset.text
    assert "innerHTML" not in httpx.get(server.url + "/ui/app.js").text


async def test_browse_search_read_send_rename_fork_export_delete_restore_clear(
    server: Serve, upstream: FakeUpstream, browser: WebDriver, db: asyncpg.Connection,
    downloads: Path, tmp_path: Path,
) -> None:
    alice = await make_user(db)
    bob = await make_user(db)
    # Alice's sessions: one with a tool exchange, one holding HTML, a few more to list.
    weather = api(server, alice, "POST", "/v1/chat/sessions",
                  json={"session_name": "Weather desk", "model": "fake-tools"})["id"]
    for content in ("Lisbon", "sunny"):
        role = "user" if content == "Lisbon" else "tool"
        body: dict[str, Any] = {"model": "fake-tools", "session_id": weather, "messages": [
            {"role": role, "content": content}]}
        if role == "tool":
            stored = api(server, alice, "GET", f"/v1/chat/sessions/{weather}/messages")
            body["messages"][0]["tool_call_id"] = stored["data"][-1]["tool_calls"][0]["id"]
        api(server, alice, "POST", "/v1/chat/completions", json=body)
    chat = api(server, alice, "POST", "/v1/chat/sessions",
               json={"session_name": "Release notes", "model": "fake-gated"})["id"]
    api(server, alice, "POST", "/v1/chat/completions", json={
        "model": "fake-echo", "session_id": chat,
        "messages": [{"role": "user", "content": HOSTILE}]})
    for i in range(30):  # more than a page of the list (30)
        api(server, alice, "POST", "/v1/chat/sessions", json={"session_name": f"Scratch {i}"})
    api(server, alice, "POST", "/v1/chat/sessions/import", json={
        "format": "chatproxy.session.v1", "session": {"session_name": "Cut short"},
        "messages": [{"role": "user", "content": "Say hello"},
                     {"role": "assistant", "content": "Hello, wor", "status": "incomplete"}]})
    for name, text in (("Trip planning", "Find me a quiet hotel in Lisbon near the river."),
                       ("Team offsite", "Lisbon or Porto for a team offsite in May?")):
        sid = api(server, alice, "POST", "/v1/chat/sessions",
                  json={"session_name": name, "model": "fake-echo"})["id"]
        api(server, alice, "POST", "/v1/chat/completions", json={
            "model": "fake-echo", "session_id": sid, "messages": [
                {"role": "user", "content": text}]})
    api(server, bob, "POST", "/v1/chat/sessions", json={"session_name": "Bob's secret"})

    # Sign in: a wrong key is refused; the right one is kept in this tab only.
    browser.get(server.url + "/ui")
    wait(browser, lambda d: visible(d, "#key"))
    browser.find_element(By.ID, "key").send_keys("sk-cp-" + "x" * 43 + Keys.ENTER)
    wait(browser, lambda d: "not valid" in d.find_element(By.ID, "sign-in-error").text)
    browser.find_element(By.ID, "key").send_keys(alice.key + Keys.ENTER)
    wait(browser, lambda d: visible(d, "#list .item"))
    names = [e.find_element(By.CSS_SELECTOR, ".name").text for e in visible(browser, ".item")]
    assert names[:3] == ["Team offsite", "Trip planning", "Cut short"] and len(names) == 30
    browser.find_element(By.ID, "more").click()  # the next page, by cursor
    wait(browser, lambda d: len(visible(d, ".item")) == 35)
    names = [e.find_element(By.CSS_SELECTOR, ".name").text for e in visible(browser, ".item")]
    assert len(set(names)) == 35 and {"Weather desk", "Release notes", "Scratch 0"} <= set(names)
    assert not visible(browser, "#more")

    # An incomplete reply is marked as such.
    open_listed(browser, "Cut short")
    incomplete = wait(browser, lambda d: next(iter(visible(d, ".badge.incomplete")), None))
    assert incomplete.text == "incomplete"
    assert messages(browser)[-1].endswith("Hello, wor")
    assert alice.key not in browser.current_url and browser.get_cookies() == []
    assert browser.execute_script("return sessionStorage.getItem('chatproxy.key')") == alice.key
    assert browser.execute_script("return localStorage.length") == 0

    # Search shows matching messages; a hit opens its session, the tool result under its call.
    browser.find_element(By.ID, "search").send_keys("lisb")
    click_text(browser, ".item.hit", "Weather desk")
    wait(browser, lambda d: d.find_element(By.ID, "title").text == "Weather desk")
    wait(browser, lambda d: visible(d, ".call .result"))
    call = visible(browser, ".call")[0]
    assert "get_weather" in call.text and '"city": "Lisbon"' in call.text
    assert "sunny" in call.find_element(By.CSS_SELECTOR, ".result").text
    assert "The weather is sunny." in "\n".join(messages(browser))
    assert visible(browser, ".msg.highlight")  # the hit's message
    browser.execute_script("document.getElementById('list').scrollTop = 0")
    browser.save_screenshot(str(tmp_path / "transcript.png"))  # the transcript view
    assert (tmp_path / "transcript.png").stat().st_size > 10_000
    if target := os.environ.get("CHATPROXY_UI_SCREENSHOT"):  # docs/session-browser.png
        browser.save_screenshot(target)
    facts = browser.find_element(By.ID, "facts").text
    assert "model fake-tools" in facts and "4 messages" in facts and "tokens" in facts

    # HTML in a message is shown as text, never run or rendered.
    browser.find_element(By.ID, "search").send_keys(Keys.CONTROL + "a", Keys.BACKSPACE)
    wait(browser, lambda d: len(visible(d, ".item")) == 30)
    open_listed(browser, "Release notes")
    wait(browser, lambda d: any(HOSTILE in m for m in messages(d)))
    assert browser.execute_script("return window.__pwned === undefined")
    assert browser.find_elements(By.CSS_SELECTOR, "#messages b, #messages img") == []

    # Send with Enter: the reply streams in (the fake holds it after its first word).
    box = browser.find_element(By.ID, "input")
    box.send_keys("What changed?" + Keys.ENTER)
    partial = wait(browser, lambda d: next(
        (e for e in visible(d, ".text.streaming") if e.text == "first"), None))
    assert partial.text == "first"  # arrived while the stream is still open
    browser.save_screenshot(str(tmp_path / "streaming.png"))
    upstream.gate.set()
    wait(browser, lambda d: not visible(d, ".text.streaming"))
    wait(browser, lambda d: any(m.endswith("first second") for m in messages(d)))
    stored = api(server, alice, "GET", f"/v1/chat/sessions/{chat}/messages")["data"]
    assert [(m["role"], m["content"]) for m in stored[-2:]] == [
        ("user", "What changed?"), ("assistant", "first second")]
    assert upstream.bodies("fake-gated")[-1]["stream"] is True

    browser.save_screenshot(str(tmp_path / "sent.png"))

    # Rename.
    browser.find_element(By.ID, "rename").click()
    field = browser.find_element(By.ID, "rename-input")
    field.clear()
    field.send_keys("Release notes, v2" + Keys.ENTER)
    wait(browser, lambda d: d.find_element(By.ID, "title").text == "Release notes, v2")
    wait(browser, lambda d: any("Release notes, v2" in e.text for e in visible(d, ".item")))
    assert api(server, alice, "GET", f"/v1/chat/sessions/{chat}")["session_name"] == (
        "Release notes, v2")

    # Fork at the first message: a new session with that message only, opened.
    first = visible(browser, "#messages > li")[0]
    ActionChains(browser).move_to_element(first).perform()
    first.find_element(By.CSS_SELECTOR, ".fork-here").click()
    wait(browser, lambda d: len(messages(d)) == 1 and HOSTILE in messages(d)[0])
    forks = [s for s in api(server, alice, "GET", "/v1/chat/sessions?limit=100")["data"]
             if s["id"] not in (chat, weather) and s["message_count"] == 1]
    assert len(forks) == 1 and forks[0]["session_name"] == "Release notes, v2"

    # Export: a file download of the export document.
    open_listed(browser, "Weather desk")
    wait(browser, lambda d: d.find_element(By.ID, "title").text == "Weather desk")
    browser.find_element(By.ID, "export").click()
    exported = downloads / f"{weather}.json"
    document = wait(browser, lambda d: _json_file(exported))
    assert document["format"] == "chatproxy.session.v1"
    assert [m["role"] for m in document["messages"]] == ["user", "assistant", "tool",
                                                           "assistant"]

    # Delete, find it with "Show deleted", restore.
    browser.find_element(By.ID, "delete").click()
    browser.find_element(By.ID, "confirm-yes").click()
    wait(browser, lambda d: visible(d, "#restore"))
    wait(browser, lambda d: not any("Weather desk" in e.text for e in visible(d, ".item")))
    browser.find_element(By.ID, "show-deleted").click()
    open_listed(browser, "Weather desk")
    assert "deleted" in visible(browser, ".item.active")[0].text
    browser.find_element(By.ID, "restore").click()
    wait(browser, lambda d: visible(d, ".call .result"))
    assert api(server, alice, "GET", f"/v1/chat/sessions/{weather}")["is_active"] is True

    # Clear.
    browser.find_element(By.ID, "clear").click()
    browser.find_element(By.ID, "confirm-yes").click()
    wait(browser, lambda d: "No messages yet" in "\n".join(messages(d)))
    assert api(server, alice, "GET", f"/v1/chat/sessions/{weather}")["message_count"] == 0

    # Nothing of Bob's was ever shown; the page broke no rule of its policy.
    assert "Bob's secret" not in browser.page_source
    problems = [e["message"] for e in browser.get_log("browser")
                if "Content Security Policy" in e["message"]
                or (e["level"] == "SEVERE" and "401" not in e["message"])]
    assert problems == []
    # Signing out forgets the key.
    browser.find_element(By.ID, "sign-out").click()
    assert browser.execute_script("return sessionStorage.getItem('chatproxy.key')") is None


def test_the_schema_page_renders_from_this_origin_alone(server: Serve, browser: WebDriver
                                                         ) -> None:
    """`/schema` (contract §12): Swagger UI from chatproxy's own assets, offline."""
    browser.get(server.url + "/schema")
    title = wait(browser, lambda d: next(iter(visible(d, ".swagger-ui .info .title")), None))
    assert title.text.startswith("chatproxy")
    assert wait(browser, lambda d: visible(d, ".opblock-tag-section"))
    loaded = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(url.startswith(server.url) for url in loaded), loaded
