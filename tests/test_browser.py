"""A real browser (headless Chromium) chats through ``minimind_course/web/chat.html`` with our server and vLLM.

The page is served from another port (another origin) and sends ``Authorization: Bearer`` with a JSON body, so
Chromium must pass a CORS preflight before every request, then reads the SSE answer with ``response.body.getReader()``.
Chromium comes from Debian (``apt-get install -y chromium``); Playwright only drives it (no ``playwright install``).
"""

import functools
import os
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlencode

import openai
import pytest

import minimind_course

CHROMIUM = os.environ.get("MINIMIND_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WEB_DIR = Path(minimind_course.__file__).parent / "web"
API_KEY = "browser-key"
MAX_TOKENS = 32
QUESTIONS = ["请介绍一下你自己。", "What is an OpenAI-compatible API?"]


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep test output clean
        pass


@pytest.fixture(scope="module")
def page_origin():
    """``http://127.0.0.1:PORT``: the package's web folder on a static server of its own (a different origin)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(WEB_DIR)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def browser():
    if not (shutil.which(CHROMIUM) or Path(CHROMIUM).is_file()):
        pytest.skip(f"no Chromium at {CHROMIUM}: install it with `apt-get install -y chromium` "
                    "(or set MINIMIND_CHROMIUM to a Chromium binary)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_page_streams_a_two_turn_chat_across_origins(browser, page_origin, backend):
    base_url, model = backend
    settings = {"base": base_url, "model": model, "key": API_KEY, "temperature": 0, "max_tokens": MAX_TOKENS}
    page = browser.new_page()
    posts = []
    page.on("request", lambda request: posts.append(request) if request.method == "POST" else None)
    page.goto(f"{page_origin}/chat.html?{urlencode(settings)}")

    answers = []
    for turn, question in enumerate(QUESTIONS, start=1):
        page.fill("#message", question)
        page.press("#message", "Enter")
        page.wait_for_function("document.getElementById('status').dataset.state !== 'streaming'", timeout=120_000)
        status = page.text_content("#status")
        assert page.get_attribute("#status", "data-state") == "idle", status
        reply = page.locator(".turn.assistant").nth(turn - 1)
        answers.append(reply.text_content())
        assert int(reply.get_attribute("data-chunks")) > 1, "the answer arrived in one piece, not streamed"
        assert "completion tokens" in status  # the usage chunk was read
    page.close()

    # Each request carried the bearer key and the whole conversation so far (so a preflight was needed).
    assert len(posts) == 2
    for request in posts:
        assert request.headers["authorization"] == f"Bearer {API_KEY}"
        assert request.headers["content-type"] == "application/json"
    sent = posts[1].post_data_json["messages"]
    assert sent == [{"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": answers[0]},
                    {"role": "user", "content": QUESTIONS[1]}]

    # What the browser assembled is exactly what the openai SDK gets for the same conversation.
    with openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=120) as sdk:
        for index in range(len(QUESTIONS)):
            messages = sent[: 2 * index + 1]
            expected = sdk.chat.completions.create(model=model, messages=messages, temperature=0,
                                                   max_tokens=MAX_TOKENS)
            assert answers[index] == expected.choices[0].message.content


def test_server_error_is_shown_on_the_page(browser, page_origin, backend):
    base_url, _ = backend
    page = browser.new_page()
    page.goto(f"{page_origin}/chat.html?{urlencode({'base': base_url, 'model': 'no-such-model', 'key': API_KEY})}")
    page.fill("#message", "hello")
    page.press("#message", "Enter")
    page.wait_for_function("document.getElementById('status').dataset.state === 'error'", timeout=60_000)
    assert "404" in page.text_content(".turn.error")
    assert "no-such-model" in page.text_content(".turn.error")
    page.close()
