"""The web chat page of a live `gptmini serve`, in headless Chromium (Debian's, driven by Playwright)."""

from __future__ import annotations

import json

import pytest
from chromium import CHROMIUM, launch
from test_serve import BASE_CKPT, serve, wait_for

sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium"),
    pytest.mark.slow,  # a browser: run by .ci/run's second step
]


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
    # the meta line says when max_tokens cut the reply, exactly when the server says so
    assert ("cut at max tokens" in page.inner_text(".meta")) == (ref.choices[0].finish_reason == "length")
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


# A small bounded schema: the reply is checked against it with the jsonschema package, not with the server's grammar.
SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}, "w": {"enum": ["a", "b"]}},
    "required": ["n", "w"],
    "additionalProperties": False,
}


@pytest.fixture
def fresh_page(page_of_server):
    """The module's page, reloaded before and after: the sidebar as it starts (text replies, no stop sequences)."""
    server, page, requested = page_of_server
    page.goto(server.url + "/")
    yield server, page, requested
    page.goto(server.url + "/")


def _send(page, text: str) -> dict:
    """Send `text`, wait for the reply to finish; the request body the page sent."""
    page.fill("#input", text)
    with page.expect_request("**/v1/chat/completions") as sent:
        page.press("#input", "Enter")
    # .meta is written when the reply has finished (empty, so not visible, after an error)
    page.wait_for_selector(".meta", state="attached")
    return sent.value.post_data_json


def _chat_requests(page):
    """The chat requests the page makes from now on (a list that fills as they go)."""
    out = []
    page.on("request", lambda r: out.append(r) if "/v1/chat/completions" in r.url else None)
    return out


def test_json_schema_mode_reply_validates_and_matches_the_api(fresh_page):
    jsonschema = pytest.importorskip("jsonschema")
    server, page, requested = fresh_page
    assert page.is_hidden("#schema")
    page.select_option("#format", "json_schema")
    page.fill("#schema", json.dumps(SCHEMA, indent=2))
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "40")
    body = _send(page, "Who goes there?")
    fmt = {"type": "json_schema", "json_schema": {"name": "page", "schema": SCHEMA}}
    assert body["response_format"] == fmt and "stop" not in body
    reply = page.inner_text(".msg.assistant")
    jsonschema.validate(json.loads(reply), SCHEMA)
    ref = server.client().chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "Who goes there?"}],
        temperature=0,
        max_tokens=40,
        response_format=fmt,
    )
    assert reply == ref.choices[0].message.content
    assert page.locator(".msg.error").count() == 0
    assert all(url.startswith(server.url) for url in requested)


def test_json_object_mode_sends_response_format(fresh_page):
    _, page, _ = fresh_page
    page.select_option("#format", "json_object")
    assert page.is_hidden("#schema")  # only "JSON schema" asks for one
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "8")
    body = _send(page, "Hello")
    assert body["response_format"] == {"type": "json_object"}
    assert page.inner_text(".msg.assistant").startswith("{")
    page.select_option("#format", "text")  # and back: no response_format at all
    body = _send(page, "Hello")
    assert "response_format" not in body


def test_stop_sequences_are_sent_and_stop_the_reply(fresh_page):
    server, page, _ = fresh_page
    # commas and new lines separate; spaces around are trimmed; \n is a new line and \, a comma
    page.fill("#stops", "zzqq,\n \\n\\n , PAGE, x\\,y\n\n")
    stops = ["zzqq", "\n\n", "PAGE", "x,y"]
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "40")
    body = _send(page, "Who goes there?")
    assert body["stop"] == stops
    reply = page.inner_text(".msg.assistant")
    client, messages = server.client(), [{"role": "user", "content": "Who goes there?"}]
    ref = client.chat.completions.create(
        model="m", messages=messages, temperature=0, max_tokens=40, stop=stops
    )
    assert reply == ref.choices[0].message.content and reply
    whole = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=40)
    assert whole.choices[0].message.content.startswith(reply + "\n\n")  # the stop cut this reply short


def test_unparsable_schema_is_refused_in_the_page(fresh_page):
    _, page, _ = fresh_page
    chats = _chat_requests(page)
    page.select_option("#format", "json_schema")
    page.fill("#schema", '{"type": "object",')
    page.fill("#input", "Hello")
    page.press("#input", "Enter")
    error = page.wait_for_selector("#schema_error:not(:empty)")
    assert "not valid JSON" in error.inner_text() and "Nothing was sent" in error.inner_text()
    page.fill("#schema", "[1, 2]")  # JSON, but no schema
    page.click("#send")
    assert "is an object" in page.inner_text("#schema_error")
    page.wait_for_timeout(300)
    assert chats == [] and page.locator(".msg").count() == 0
    assert page.input_value("#input") == "Hello"  # kept, to send once the schema is fixed
    page.fill("#schema", json.dumps(SCHEMA))
    assert page.is_hidden("#schema_error")  # editing clears the message
    body = _send(page, "Hello")
    assert body["response_format"]["json_schema"]["schema"] == SCHEMA


def test_more_than_16_stop_sequences_are_refused_in_the_page(fresh_page):
    _, page, _ = fresh_page
    chats = _chat_requests(page)
    page.fill("#stops", ",".join(f"s{i}" for i in range(17)))
    page.fill("#max_tokens", "1")
    page.fill("#input", "Hello")
    page.press("#input", "Enter")
    assert "At most 16" in page.wait_for_selector("#stops_error:not(:empty)").inner_text()
    page.wait_for_timeout(300)
    assert chats == [] and page.locator(".msg").count() == 0
    page.fill("#stops", "\n".join(f"s{i}" for i in range(16)))  # 16 are fine
    assert _send(page, "Hello")["stop"] == [f"s{i}" for i in range(16)]


def test_a_schema_the_server_refuses_shows_its_message(fresh_page):
    """Valid JSON the server cannot decode under: its 400 is shown as the error it sends, as for any failed request."""
    import openai

    server, page, _ = fresh_page
    bad = {"type": "object", "properties": {"n": {"type": "string", "pattern": "("}}}
    page.select_option("#format", "json_schema")
    page.fill("#schema", json.dumps(bad))
    page.fill("#max_tokens", "5")
    _send(page, "Hello")
    with pytest.raises(openai.BadRequestError) as refused:
        server.client().chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "Hello"}],
            max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {"name": "page", "schema": bad}},
        )
    assert page.inner_text(".msg.error") == "error: " + refused.value.body["message"]
