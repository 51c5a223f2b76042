"""The endpoint layer (issue 25): /tokenize and /detokenize, reasoning_effort, the CORS default, max_tokens
overflow, the tools note in the context error, 4xx logging, the SSE frame."""

from __future__ import annotations

import copy
import logging

import httpx
import openai
import pytest

from minimind_course.engine.engine import Engine
from minimind_course.launch import BackgroundServer
from minimind_course.serving.sse import sse
from scripted_model import ScriptedLM, byte_tokens

CHINESE = [{"role": "user", "content": "请介绍一下你自己。"}]
THINKING_TEMPLATE = (  # MiniMind-3 style: open_thinking pre-fills "<think>\n"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if open_thinking %}<think>\n{% endif %}{% endif %}")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "查询一个城市的天气。" * 20,
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市名"}},
                   "required": ["city"]}}}


def post(server: BackgroundServer, path: str, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, timeout=120, **kwargs)


# ---- /tokenize and /detokenize --------------------------------------------------------------------------
def test_tokenize_a_chinese_prompt_and_detokenize_it_back(server, engine):
    text = "你好，世界！今天天气怎么样？"
    answer = post(server, "/tokenize", {"prompt": text}).json()
    assert answer["tokens"] == engine.encode(text) and answer["count"] == len(answer["tokens"]) > 0
    assert answer["max_model_len"] == engine.max_model_len
    assert post(server, "/detokenize", {"tokens": answer["tokens"]}).json() == {"prompt": text}
    strs = post(server, "/tokenize", {"prompt": text, "return_token_strs": True}).json()["token_strs"]
    assert len(strs) == answer["count"]


def test_tokenize_messages_counts_what_the_chat_endpoint_feeds_the_model(server, engine):
    counted = post(server, "/tokenize", {"messages": CHINESE, "model": "minimind"}).json()
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0) as client:
        used = client.chat.completions.create(model="minimind", messages=CHINESE, max_tokens=1).usage.prompt_tokens
    assert counted["count"] == used
    bare = post(server, "/tokenize", {"messages": CHINESE, "add_generation_prompt": False}).json()
    assert bare["count"] < counted["count"] and counted["tokens"][:bare["count"]] == bare["tokens"]
    with_tools = post(server, "/tokenize", {"messages": CHINESE, "tools": [WEATHER]}).json()
    assert with_tools["count"] > counted["count"]


@pytest.mark.parametrize("path,body,param", [
    ("/tokenize", {"prompt": "你好", "messages": CHINESE}, "prompt"),
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": "你好", "model": "nope"}, "model"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/detokenize", {"tokens": [10**9]}, "tokens"),
    ("/detokenize", {"tokens": "你好"}, "tokens"),
])
def test_tokenizer_routes_refuse_bad_input_in_openai_shape(server, path, body, param):
    response = post(server, path, body)
    assert response.status_code in (400, 404) and response.json()["error"]["param"] == param


def test_the_api_key_guards_the_tokenizer_routes_too(make_server):
    server = make_server(api_key="芝麻开门".encode().hex())
    assert post(server, "/tokenize", {"prompt": "你好"}).status_code == 401
    assert post(server, "/detokenize", {"tokens": [1]}).status_code == 401
    headers = {"Authorization": "Bearer " + "芝麻开门".encode().hex()}
    assert post(server, "/tokenize", {"prompt": "你好"}, headers=headers).status_code == 200
    assert httpx.get(server.base_url + "/health").status_code == 200


# ---- reasoning_effort -----------------------------------------------------------------------------------
def scripted_engine(engine: Engine, text: str, chat_template: str | None = None) -> Engine:
    tokenizer = copy.deepcopy(engine.tokenizer)
    if chat_template:
        tokenizer.chat_template = chat_template
    script = byte_tokens(tokenizer, text) + [tokenizer.eos_token_id]
    return Engine(ScriptedLM(script, len(tokenizer)), tokenizer)


def test_reasoning_effort_switches_a_thinking_template(make_server, engine):
    server = make_server(own=scripted_engine(engine, "想一想。\n</think>\n\n你好！", THINKING_TEMPLATE))
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0) as client:
        def ask(**extra):
            return client.chat.completions.create(model="minimind", messages=CHINESE, max_tokens=100, **extra)

        thought, off = ask(reasoning_effort="high"), ask(reasoning_effort="none")
        explicit = ask(reasoning_effort="low", extra_body={"chat_template_kwargs": {"open_thinking": False}})
    assert (thought.choices[0].message.reasoning_content, thought.choices[0].message.content) == ("想一想。\n", "你好！")
    assert thought.usage.prompt_tokens > off.usage.prompt_tokens  # the template opened <think>
    assert getattr(off.choices[0].message, "reasoning_content", None) is None
    assert explicit.usage.prompt_tokens == off.usage.prompt_tokens  # chat_template_kwargs win


def test_reasoning_effort_on_a_template_that_cannot_think_is_400_unless_none(server):
    response = post(server, "/v1/chat/completions", {"messages": CHINESE, "max_tokens": 1, "reasoning_effort": "high"})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "reasoning_effort" and "cannot think" in error["message"]
    assert post(server, "/v1/chat/completions",
                {"messages": CHINESE, "max_tokens": 1, "reasoning_effort": "none"}).status_code == 200
    bad = post(server, "/v1/chat/completions", {"messages": CHINESE, "reasoning_effort": "maximum"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "reasoning_effort"


# ---- CORS -----------------------------------------------------------------------------------------------
def preflight(server: BackgroundServer, origin: str, path: str = "/v1/chat/completions") -> httpx.Response:
    return httpx.options(server.base_url + path, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})


@pytest.mark.parametrize("origin", ["chrome-extension://abcdefghijklmnop", "moz-extension://1b2c-3d4e",
                                    "safari-web-extension://ABC-123", "http://localhost:3000", "http://127.0.0.1:8080",
                                    "http://[::1]:5173", "http://localhost"])
def test_cors_default_allows_local_pages_and_browser_extensions(server, origin):
    response = preflight(server, origin)
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == origin


@pytest.mark.parametrize("origin", ["https://evil.example", "http://localhost.evil.example",
                                    "http://127.0.0.1.evil.example:80", "http://192.168.1.20:3000"])
def test_cors_default_refuses_other_websites(server, origin):
    response = preflight(server, origin)
    assert response.status_code == 400 and "access-control-allow-origin" not in response.headers
    simple = httpx.get(server.base_url + "/v1/models", headers={"Origin": origin})
    assert "access-control-allow-origin" not in simple.headers  # the browser will not hand the answer to the page


def test_cors_star_only_when_asked_for(make_server):
    server = make_server(cors_origins=["*"])
    assert preflight(server, "https://evil.example").headers["access-control-allow-origin"] == "*"


# ---- max_tokens overflow and the context error -----------------------------------------------------------
@pytest.fixture
def small_engine(engine):
    small = Engine(engine.model, engine.tokenizer, max_model_len=48)
    yield small
    small.close()


def test_max_tokens_beyond_the_context_is_clamped_by_default(make_server, small_engine):
    server = make_server(own=small_engine)
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0) as client:
        answer = client.chat.completions.create(model="minimind", messages=CHINESE, max_completion_tokens=10**6,
                                                extra_body={"ignore_eos": True})
        streamed = list(client.completions.create(model="minimind", prompt="你好", max_tokens=1000, stream=True,
                                                  stream_options={"include_usage": True},
                                                  extra_body={"ignore_eos": True}))
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.prompt_tokens + answer.usage.completion_tokens == 48
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "length"
    assert streamed[-1].usage.total_tokens == 48


def test_max_tokens_overflow_error_keeps_vllms_400(make_server, small_engine):
    server = make_server(own=small_engine, max_tokens_overflow="error")
    response = post(server, "/v1/chat/completions", {"messages": CHINESE, "max_completion_tokens": 100})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "max_completion_tokens"
    assert "maximum context length is 48 tokens" in error["message"]
    ok = post(server, "/v1/chat/completions", {"messages": CHINESE, "max_tokens": 2})
    assert ok.status_code == 200


def test_a_prompt_that_does_not_fit_is_400_and_names_the_tool_definitions(make_server, small_engine):
    server = make_server(own=small_engine)
    tools = [WEATHER, {**WEATHER, "function": {**WEATHER["function"], "name": "get_time"}}]
    response = post(server, "/v1/chat/completions", {"messages": CHINESE, "tools": tools})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "messages"
    assert "maximum context length is 48 tokens" in error["message"]
    assert "for 2 tool definitions" in error["message"] and "--max-model-len" in error["message"]
    plain = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "长" * 100}]}).json()
    assert "tool definitions" not in plain["error"]["message"]  # no tools: no note


# ---- logging and SSE --------------------------------------------------------------------------------------
def test_every_4xx_is_logged_with_status_param_and_message(server, caplog):
    with caplog.at_level(logging.WARNING, logger="minimind_course.serving"):
        post(server, "/v1/chat/completions", {"messages": CHINESE, "temperature": 9})
        post(server, "/v1/chat/completions", {"messages": CHINESE, "model": "不存在"})
        httpx.get(server.base_url + "/v1/nowhere")
    lines = [r.getMessage() for r in caplog.records if r.name == "minimind_course.serving"]
    assert any(line.startswith("400 param=temperature") for line in lines), lines
    assert any(line.startswith("404 param=model") and "不存在" in line for line in lines), lines
    assert any(line.startswith("404 param=None") for line in lines), lines


def test_sse_frames_data_lines_and_named_events():
    assert sse('{"a": 1}') == 'data: {"a": 1}\n\n'
    assert sse('{"a": 1}', event="response.created") == 'event: response.created\ndata: {"a": 1}\n\n'
    assert sse("第一行\n第二行") == "data: 第一行\ndata: 第二行\n\n"  # a newline in data splits into data lines


def test_logit_bias_bans_and_forces_tokens_over_http(client, engine):
    """OpenAI's logit_bias (string token ids) changes the greedy answer; min_p is honoured; bad values are 400s."""
    ask = {"model": "minimind", "messages": CHINESE, "max_tokens": 4, "temperature": 0}
    plain = client.chat.completions.create(**ask, logprobs=True)
    first = plain.choices[0].logprobs.content[0].token
    answer_ids = set(engine.encode(plain.choices[0].message.content))  # the greedy first token is among them
    banned = client.chat.completions.create(**ask, logprobs=True,
                                            logit_bias={str(token): -100 for token in answer_ids})
    assert banned.choices[0].logprobs.content[0].token != first
    forced_id = engine.encode("好")[0]
    forced = client.chat.completions.create(**{**ask, "max_tokens": 3}, logit_bias={str(forced_id): 100})
    assert forced.choices[0].message.content.startswith(engine.tokenizer.decode([forced_id]))
    sampled = client.chat.completions.create(**ask, extra_body={"min_p": 1.0, "temperature": 1.0, "seed": 7})
    assert sampled.choices[0].message.content == plain.choices[0].message.content  # min_p 1: only the top token
    for bad, param in (({"logit_bias": {"abc": 1}}, "logit_bias"), ({"logit_bias": {"1": 101}}, "logit_bias"),
                       ({"logit_bias": {str(10**9): 1}}, "logit_bias"), ({"min_p": 1.5}, "min_p")):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(**ask, extra_body=bad)
        assert param in (err.value.body.get("param") or "") + err.value.message
