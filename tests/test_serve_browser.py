"""The web chat page of a live `gptmini serve`, in headless Chromium (Debian's, driven by Playwright)."""

from __future__ import annotations

import pytest
from chromium import CHROMIUM, launch
from test_serve import BASE_CKPT, serve, wait_for

sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium")


@pytest.fixture(scope="module")
def page_of_server():
    """The base model: its replies (plain template) end only at max_tokens or "\nUser:", so Stop has time."""
    with serve("-c", str(BASE_CKPT), "--parallel", "2") as server, sync_api.sync_playwright() as pw:
        browser = launch(pw)
        page = browser.new_page()
        requested = []
        page.on("request", lambda r: requested.append(r.url))
        page.goto(server.url + "/")
        yield server, page, requested
        browser.close()


def test_page_streams_a_reply(page_of_server):
    server, page, requested = page_of_server
    page.wait_for_function("document.getElementById('model').textContent.includes('default')")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "40")
    page.fill("#input", "Who goes there? <b>bold</b>")
    page.press("#input", "Enter")
    page.wait_for_selector(".meta")  # written when the reply has finished
    user = page.inner_text(".msg.user")
    assert user == "Who goes there? <b>bold</b>"  # shown as text, not HTML
    assert page.locator(".msg.user b").count() == 0
    reply = page.inner_text(".msg.assistant")
    ref = server.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": user}], temperature=0, max_tokens=40
    )
    assert reply == ref.choices[0].message.content and reply
    assert "tokens" in page.inner_text(".meta")
    assert all(url.startswith(server.url) for url in requested)  # nothing from outside: no CDN


def test_stop_button_cancels_the_request(page_of_server):
    server, page, _ = page_of_server
    # A sampled reply may end (at "\nUser:") before Stop can be clicked, even after Stop was seen: then ask again.
    stopped = False
    for _ in range(6):
        page.click("#new")
        page.fill("#temperature", "0.8")
        page.fill("#max_tokens", "5000")
        page.fill("#input", "Tell me a very long tale.")
        page.press("#input", "Enter")
        page.wait_for_function(
            "(document.body.classList.contains('busy') && document.querySelector('.msg.assistant') &&"
            " document.querySelector('.msg.assistant').textContent.length > 5) || document.querySelector('.meta')"
        )
        try:
            page.click("#stop", timeout=2000)
        except sync_api.TimeoutError:  # the reply finished first: Stop is hidden again
            page.wait_for_selector(".meta")
            continue
        page.wait_for_selector(".meta")
        if "stopped" in page.inner_text(".meta"):  # else the reply ended as the click landed
            stopped = True
            break
    assert stopped, "every reply ended before Stop could be clicked"
    assert page.is_visible("#send")
    # the server noticed the aborted fetch and freed the row
    assert wait_for(lambda: server.metrics()["gptmini_requests_running"] == 0, 2.0)
    assert server.metrics()["gptmini_requests_cancelled_total"] >= 1


def test_tokens_per_second_counts_from_the_request(page_of_server):
    """Chunks that arrive together (a proxy buffering the stream, here a route that answers after a second, all at
    once) must not read as thousands of tokens a second: 5 tokens over >= 1 s is at most 5 tokens/s."""
    import json
    import time

    _, page, _ = page_of_server
    chunks = [{"choices": [{"index": 0, "delta": {"content": w}}]} for w in ["To", " be", ",", " or", " not"]]
    chunks.append({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}})
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"

    def slow(route):
        time.sleep(1.0)
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)

    page.route("**/v1/chat/completions", slow)
    try:
        page.click("#new")
        page.fill("#input", "Hello")
        page.press("#input", "Enter")
        page.wait_for_selector(".meta")
        meta = page.inner_text(".meta")
    finally:
        page.unroute("**/v1/chat/completions")
    assert "5 tokens" in meta
    rate = float(meta.split("·")[-1].split("tokens/s")[0])
    assert 0 < rate <= 5.0
