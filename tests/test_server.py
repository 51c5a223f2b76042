"""Behaviour specific to our server: concurrency, disconnects, UTF-8 splitting, reasoning, auth, limits, errors."""

from __future__ import annotations

import asyncio
import copy
import json
import time

import httpx
import openai
import pytest

from minimind_course.launch import BackgroundServer
from minimind_course.engine.engine import Engine
from minimind_course.serving.app import create_app
from scripted_model import ScriptedLM, byte_tokens

CHINESE = [{"role": "user", "content": "请介绍一下你自己。"}]
PREFLIGHT = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization,content-type"}


def wait_idle(engine: Engine, timeout: float = 5.0) -> float:
    """Seconds until the worker has nothing running (fails the test after ``timeout``)."""
    start = time.monotonic()
    while engine.active is not None or engine.queued:
        assert time.monotonic() - start < timeout, "the engine is still generating"
        time.sleep(0.005)
    return time.monotonic() - start


@pytest.fixture
def scripted_server(engine):
    """Start a server whose model emits a given text (as single UTF-8 bytes) then end-of-sequence."""
    running = []

    def start(text: str, *, step_delay: float = 0.0, eos: bool = True, max_queue: int = 8, max_num_seqs: int = 32,
              tokenizer=None) -> str:
        tokenizer = tokenizer or engine.tokenizer
        script = byte_tokens(tokenizer, text) + ([tokenizer.eos_token_id] if eos else [])
        model = ScriptedLM(script, len(tokenizer), step_delay=step_delay)
        scripted = Engine(model, tokenizer, max_queue=max_queue, max_num_seqs=max_num_seqs)
        server = BackgroundServer(create_app(scripted)).start()
        running.append((server, scripted))
        return server.base_url + "/v1"

    yield start
    for server, scripted in running:
        server.stop()
        scripted.close()


# ---- concurrency and disconnects --------------------------------------------------------------------------
@pytest.mark.asyncio(loop_scope="session")
async def test_twenty_concurrent_greedy_requests_match_the_solo_answers(base_url):
    prompts = [f"第{i}个问题：你好吗？" for i in range(20)]
    async with openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=300) as client:
        async def ask(prompt):
            answer = await client.chat.completions.create(
                model="minimind", messages=[{"role": "user", "content": prompt}], max_tokens=24, temperature=0)
            return answer.choices[0].message.content

        solo = [await ask(p) for p in prompts]
        together = await asyncio.gather(*[ask(p) for p in prompts])
    assert together == solo


def long_request(engine: Engine, **extra) -> dict:
    """A request that would generate for many seconds if nobody stopped it."""
    return {"messages": CHINESE, "max_tokens": min(engine.max_model_len - 64, 8000), "ignore_eos": True, **extra}


def test_closing_a_stream_frees_the_engine(engine, base_url):
    body = long_request(engine, stream=True)
    with httpx.Client(timeout=60) as client, client.stream("POST", base_url + "/chat/completions",
                                                           json=body) as response:
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]
    assert any(line.startswith("data: ") for line in received)
    wait_idle(engine)  # well before max_tokens could have been generated
    started = time.monotonic()
    answer = httpx.post(base_url + "/chat/completions", json={"messages": CHINESE, "max_tokens": 4}, timeout=60)
    assert answer.status_code == 200 and time.monotonic() - started < 5


def test_a_non_streaming_client_that_gives_up_frees_the_engine(engine, base_url):
    body = long_request(engine)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base_url + "/chat/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
    wait_idle(engine)


# ---- UTF-8 and reasoning (scripted model: exact outputs whatever the bundled model learned) --------------
def test_split_chinese_and_emoji_stream_without_replacement_characters(scripted_server):
    text = "你好，世界！我喜欢🍜和🚀。"
    url = scripted_server(text, step_delay=0.005)  # slow enough that chunks are not merged on the way
    with openai.OpenAI(base_url=url, api_key="x", max_retries=0) as client:
        whole = client.chat.completions.create(model="minimind", messages=CHINESE, max_tokens=200)
        chunks = list(client.chat.completions.create(model="minimind", messages=CHINESE, max_tokens=200,
                                                     stream=True))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert whole.choices[0].message.content == text
    assert "".join(deltas).encode("utf-8") == text.encode("utf-8")
    assert all("\ufffd" not in d for d in deltas) and len(deltas) > 5
    assert whole.usage.completion_tokens == len(text.encode("utf-8")) + 1  # one byte per token, plus EOS


def test_logprob_bytes_of_split_characters_add_up_to_the_text(scripted_server):
    text = "好🍜"
    url = scripted_server(text)
    with openai.OpenAI(base_url=url, api_key="x", max_retries=0) as client:
        answer = client.chat.completions.create(model="minimind", messages=CHINESE, max_tokens=20, logprobs=True,
                                                top_logprobs=1)
    entries = answer.choices[0].logprobs.content
    assert len(entries) == len(text.encode("utf-8")) + 1  # one byte per token, then end-of-sequence
    assert bytes(b for entry in entries[:-1] for b in entry.bytes) == text.encode("utf-8")
    assert entries[-1].token == "<|im_end|>"
    assert all(entry.logprob == pytest.approx(0.0, abs=1e-3) for entry in entries)  # the script is certain


def test_think_block_goes_to_reasoning_content_streamed_and_not(scripted_server):
    url = scripted_server("<think>\n先想一想：用户在打招呼。\n</think>\n\n你好！")
    with openai.OpenAI(base_url=url, api_key="x", max_retries=0) as client:
        message = client.chat.completions.create(model="minimind", messages=CHINESE, max_tokens=200).choices[0].message
        chunks = list(client.chat.completions.create(model="minimind", messages=CHINESE, max_tokens=200,
                                                     stream=True))
    assert message.reasoning_content == "先想一想：用户在打招呼。\n" and message.content == "你好！"
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == message.reasoning_content
    assert "".join(d.content or "" for d in deltas) == message.content
    assert not any("<think>" in (d.content or "") or "</think>" in (d.content or "") for d in deltas)


def test_open_thinking_reaches_the_template_and_a_prefilled_think_starts_in_reasoning(scripted_server, engine):
    thinking_template = copy.deepcopy(engine.tokenizer)  # MiniMind-3 style: open_thinking pre-fills "<think>\n"
    thinking_template.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% if open_thinking %}<think>\n{% endif %}{% endif %}")
    url = scripted_server("想一想。\n</think>\n\n你好！", tokenizer=thinking_template)
    with openai.OpenAI(base_url=url, api_key="x", max_retries=0) as client:
        thought = client.chat.completions.create(model="minimind", messages=CHINESE, max_tokens=100,
                                                 extra_body={"chat_template_kwargs": {"open_thinking": True}})
        plain = client.chat.completions.create(model="minimind", messages=CHINESE, max_tokens=100)
    assert (thought.choices[0].message.reasoning_content, thought.choices[0].message.content) == ("想一想。\n", "你好！")
    assert thought.usage.prompt_tokens > plain.usage.prompt_tokens  # the template added "<think>\n"
    assert plain.choices[0].message.content == "想一想。\n</think>\n\n你好！"  # no opening tag: plain content
    assert getattr(plain.choices[0].message, "reasoning_content", None) is None


def test_an_error_after_streaming_began_is_an_sse_error_event(scripted_server, engine):
    url = scripted_server("ok")
    fail = engine.tokenizer.decode([ScriptedLM.FAIL_TOKEN])  # a prompt token that makes the model raise
    body = {"prompt": fail, "stream": True, "max_tokens": 5}
    with httpx.stream("POST", url + "/completions", json=body, timeout=30) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert response.status_code == 200 and events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert "scripted failure" in error["message"] and error["code"] == 500
    with openai.OpenAI(base_url=url, api_key="x", max_retries=0) as client, pytest.raises(openai.APIError):
        list(client.completions.create(model="minimind", prompt=fail, max_tokens=5, stream=True))


def test_reserved_template_arguments_are_refused(base_url):
    body = {"messages": CHINESE, "chat_template_kwargs": {"tokenize": True}}
    response = httpx.post(base_url + "/chat/completions", json=body, timeout=30)
    assert response.status_code == 400 and "tokenize" in response.json()["error"]["message"]


# ---- auth, CORS, limits -----------------------------------------------------------------------------------
def test_api_key_is_required_on_v1_but_not_on_health_or_preflight(make_server):
    server = make_server(api_key="sesame")
    v1 = server.base_url + "/v1"
    assert httpx.get(server.base_url + "/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
        response = httpx.get(v1 + "/models", headers=headers)
        assert response.status_code == 401 and response.json()["error"]["type"] == "AuthenticationError"
    assert httpx.options(v1 + "/chat/completions", headers=PREFLIGHT).status_code == 200
    with openai.OpenAI(base_url=v1, api_key="sesame", max_retries=0) as client:
        assert client.models.list().data[0].id == "minimind"
    with openai.OpenAI(base_url=v1, api_key="wrong", max_retries=0) as client, pytest.raises(
            openai.AuthenticationError):
        client.models.list()


def test_cors_origins_are_configurable(make_server):
    server = make_server(cors_origins=["http://classroom.local"])
    url = server.base_url + "/v1/chat/completions"
    allowed = httpx.options(url, headers={**PREFLIGHT, "Origin": "http://classroom.local"})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "http://classroom.local"
    assert httpx.options(url, headers=PREFLIGHT).status_code == 400  # starlette refuses unknown origins


def test_bodies_above_the_limit_are_413_with_or_without_content_length(make_server):
    server = make_server(max_body_bytes=1000)
    url = server.base_url + "/v1/chat/completions"
    big = {"messages": [{"role": "user", "content": "长" * 2000}]}
    response = httpx.post(url, json=big)
    assert response.status_code == 413 and response.json()["error"]["code"] == 413

    def chunked():
        yield json.dumps(big).encode("utf-8")

    response = httpx.post(url, content=chunked(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert httpx.post(url, json={"messages": CHINESE, "max_tokens": 2}).status_code == 200


@pytest.mark.asyncio(loop_scope="session")
async def test_a_full_queue_answers_429(scripted_server):
    # endless and slow, one seat in the batch: the second request waits in the queue, the third is refused
    url = scripted_server("慢", step_delay=0.01, eos=False, max_queue=1, max_num_seqs=1) + "/chat/completions"
    body = {"messages": CHINESE, "max_tokens": 1000, "stream": True}
    async with httpx.AsyncClient(timeout=60) as client:
        async with client.stream("POST", url, json=body) as running:
            lines = running.aiter_lines()
            while '"content":"慢' not in await lines.__anext__():  # the role chunk comes before generation
                pass  # now generating: it holds the only seat
            waiting = asyncio.ensure_future(client.post(url, json={**body, "stream": False}))
            for _ in range(100):  # until the second request sits in the queue
                await asyncio.sleep(0.02)
                response = await client.post(url, json={"messages": CHINESE, "max_tokens": 1})
                if response.status_code == 429:
                    break
            waiting.cancel()
    assert response.status_code == 429 and response.json()["error"]["type"] == "RateLimitError"
    assert "busy" in response.json()["error"]["message"]


# ---- user errors are never 500 ---------------------------------------------------------------------------
@pytest.mark.parametrize("body", [
    b"", b"null", b"[]", b'"text"', b"{}", b'{"messages": null}', b'{"messages": [{"content": "no role"}]}',
    b'{"messages": [{"role": "user", "content": 5}]}', b'{"messages": [{"role": "user", "content": [{"type": "x"}]}]}',
    b'{"messages": [{"role": "user", "content": "hi"}], "stream_options": "yes"}',
    b'{"messages": [{"role": "user", "content": "hi"}], "n": 100}',
    b'{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": []}',
    b'{"messages": [{"role": "user", "content": "hi"}], "seed": "abc"}',
    '{"messages": [{"role": "user", "content": "\\ud800"}]}'.encode(),
    b"\xff\xfe not utf-8",
])
def test_malformed_chat_bodies_are_400(base_url, body):
    response = httpx.post(base_url + "/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == 400


@pytest.mark.parametrize("body", [{"prompt": ""}, {"prompt": [10**7]}, {"prompt": ["a", "b"]}, {"prompt": "a", "echo": True},
                                  {}])
def test_malformed_completion_bodies_are_400(base_url, body):
    response = httpx.post(base_url + "/completions", json=body)
    assert response.status_code == 400, response.text


def test_unknown_routes_and_methods_use_the_envelope(base_url):
    missing = httpx.get(base_url + "/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == 404
    wrong_method = httpx.get(base_url + "/chat/completions")
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


def test_retrieve_model(base_url):
    assert httpx.get(base_url + "/models/minimind").json()["id"] == "minimind"
    assert httpx.get(base_url + "/models/other").status_code == 404
