"""Anthropic's Messages API on our server, driven by the ``anthropic`` SDK (the reference client): the shared checks
of ``messages_conformance`` (text, max_tokens, stop sequences, streaming, count_tokens, forced tools, errors), and
what needs our server: answers equal to chat completions' for the same template, system blocks, prefill, tool use
round trips and parsed calls, thinking blocks, the x-api-key header, and 400s in Anthropic's shape naming the field."""

from __future__ import annotations

import copy
import json

import anthropic
import httpx
import jsonschema
import openai
import pytest
from anthropic.types import Message, TextBlock, ThinkingBlock, ToolUseBlock

from conftest import SERVED_MODEL_NAME, Endpoint
from messages_conformance import *  # noqa: F401,F403  (the backend-agnostic checks, collected here)
from messages_conformance import CHINESE, GREEDY, TIME, WEATHER, WHO, assert_anthropic_error
from messages_conformance import greedy as _greedy
from minimind_course.engine.engine import Engine
from minimind_course.launch import BackgroundServer
from minimind_course.serving.app import create_app
from scripted_model import ScriptedLM, byte_tokens

MODEL = SERVED_MODEL_NAME
TWO_CALLS = ('我来查一下。\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "东京", "unit": "celsius"}}\n'
             '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')


@pytest.fixture(scope="session")
def messages_endpoint(server) -> Endpoint:
    """What the shared checks talk to: our server's root."""
    return Endpoint(base_url=server.base_url, model=MODEL)


@pytest.fixture
def scripted(engine):
    """A server whose model writes a given text (one UTF-8 byte per token) then stops; an optional tokenizer."""
    running = []

    def start(text: str, tokenizer=None) -> anthropic.Anthropic:
        tokenizer = tokenizer or engine.tokenizer
        model = ScriptedLM(byte_tokens(tokenizer, text) + [tokenizer.eos_token_id], len(tokenizer))
        scripted_engine = Engine(model, tokenizer, max_num_batched_tokens=4096)
        server = BackgroundServer(create_app(scripted_engine)).start()
        running.append((server, scripted_engine))
        return anthropic.Anthropic(base_url=server.base_url, api_key="x", max_retries=0, timeout=60)

    yield start
    for server, scripted_engine in running:
        server.stop()
        scripted_engine.close()


def greedy(claude: anthropic.Anthropic, messages, **kwargs) -> Message:
    return _greedy(claude, messages, MODEL, **kwargs)


def chat_greedy(server, messages, max_tokens=48) -> str:
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0) as client:
        answer = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=max_tokens)
    return answer.choices[0].message.content


def post(server, path: str, body, headers=None) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.base_url + path, content=raw, timeout=60,
                      headers={"content-type": "application/json", **(headers or {})})


# ---- text ------------------------------------------------------------------------------------------------------
def test_a_text_answer_is_a_message_and_matches_chat_completions(claude, server):
    message = greedy(claude, WHO)
    assert isinstance(message, Message) and message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg") and message.model == MODEL
    [block] = message.content
    assert isinstance(block, TextBlock) and block.text
    assert message.stop_reason in ("end_turn", "max_tokens") and message.stop_sequence is None
    assert message.usage.input_tokens > 0 and 0 < message.usage.output_tokens <= 48
    assert block.text == chat_greedy(server, WHO)  # the same template and the same greedy decode


def test_chinese_with_a_system_prompt_string_or_blocks(claude, server):
    system = "你是一个乐于助人的助手。"
    as_string = greedy(claude, CHINESE, system=system)
    as_blocks = greedy(claude, CHINESE, system=[{"type": "text", "text": system}])
    assert as_string.content[0].text == as_blocks.content[0].text
    assert as_string.usage.input_tokens == as_blocks.usage.input_tokens
    assert as_string.content[0].text == chat_greedy(server, [{"role": "system", "content": system}, *CHINESE])
    assert as_string.usage.input_tokens > greedy(claude, CHINESE).usage.input_tokens  # the system turn is there


def test_prefill_continues_the_final_assistant_turn(claude, server, engine):
    prefill = "I am"
    message = greedy(claude, [*WHO, {"role": "assistant", "content": prefill}], max_tokens=16)
    prompt = engine.chat_prompt(WHO) + prefill
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0) as client:
        continued = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=16)
    assert message.content[0].text == continued.choices[0].text
    assert message.usage.input_tokens == len(engine.encode(prompt))


def test_sampling_fields_are_honoured(claude):
    first = claude.messages.create(model=MODEL, max_tokens=24, messages=WHO, extra_body={"top_k": 1})
    again = claude.messages.create(model=MODEL, max_tokens=24, messages=WHO, extra_body={"top_k": 1, "top_p": 0.5})
    assert first.content[0].text == again.content[0].text == greedy(claude, WHO, max_tokens=24).content[0].text
    tagged = greedy(claude, WHO, max_tokens=24, metadata={"user_id": "learner-7"}, service_tier="standard_only",
                    extra_headers={"anthropic-version": "2023-06-01", "anthropic-beta": "anything"})
    assert tagged.content[0].text == first.content[0].text and tagged.usage.service_tier == "standard"


# ---- streaming ------------------------------------------------------------------------------------------------
def test_the_raw_stream_is_named_events_in_anthropic_order(server):
    body = {"model": MODEL, "max_tokens": 8, "messages": WHO, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/messages", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        frames = response.read().decode().strip().split("\n\n")
    events = []
    for frame in frames:
        name, data = frame.split("\n")
        assert name.startswith("event: ") and data.startswith("data: ")
        payload = json.loads(data.removeprefix("data: "))
        assert payload["type"] == name.removeprefix("event: ")
        events.append(payload)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds[1] == "content_block_start" and kinds[-3] == "content_block_stop"
    assert set(kinds[2:-3]) == {"content_block_delta"}
    start = events[0]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["output_tokens"] == 0
    assert events[-2]["delta"]["stop_reason"] == "max_tokens" and events[-2]["usage"]["output_tokens"] == 8
    assert all(e["delta"]["type"] == "text_delta" for e in events[2:-3])


# ---- tools ------------------------------------------------------------------------------------------------------
def test_tool_use_round_trip_with_tool_choice_any(claude):
    messages = [{"role": "user", "content": "东京的天气怎么样？"}]
    choice = {"type": "any", "disable_parallel_tool_use": True}  # one call, as a 4 M-parameter model would loop
    first = greedy(claude, messages, tools=[WEATHER, TIME], tool_choice=choice, max_tokens=200)
    assert first.stop_reason == "tool_use"
    calls = [block for block in first.content if isinstance(block, ToolUseBlock)]
    assert len(calls) == 1 and calls[0].id.startswith("toolu_")
    for call in calls:
        assert call.name in ("get_weather", "get_time")
        if call.name == "get_weather":
            jsonschema.validate(call.input, WEATHER["input_schema"])
    with claude.messages.stream(model=MODEL, max_tokens=200, messages=messages, extra_body=GREEDY,
                                tools=[WEATHER, TIME], tool_choice=choice) as stream:
        streamed = stream.get_final_message()
    assert [(b.name, b.input) for b in streamed.content if b.type == "tool_use"] == [(c.name, c.input) for c in calls]
    results = [{"type": "tool_result", "tool_use_id": call.id, "content": "晴，25°C"} for call in calls]
    second = greedy(claude, [*messages, {"role": "assistant", "content": first.content},
                             {"role": "user", "content": results}], tools=[WEATHER, TIME])
    assert second.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert second.usage.input_tokens > first.usage.input_tokens  # the call and its result are in the prompt


def test_tool_choice_by_name_calls_that_tool(claude):
    message = greedy(claude, [{"role": "user", "content": "现在几点？"}], tools=[WEATHER, TIME],
                     tool_choice={"type": "tool", "name": "get_weather"}, max_tokens=200)
    [call] = [block for block in message.content if isinstance(block, ToolUseBlock)]
    assert message.stop_reason == "tool_use" and call.name == "get_weather"
    jsonschema.validate(call.input, WEATHER["input_schema"])


def test_tool_calls_in_text_become_tool_use_blocks_streamed_and_not(scripted):
    client = scripted(TWO_CALLS)
    kwargs = dict(model=MODEL, max_tokens=200, messages=[{"role": "user", "content": "东京的天气和时间？"}],
                  tools=[WEATHER, TIME])
    whole = client.messages.create(**kwargs)
    assert [b.type for b in whole.content] == ["text", "tool_use", "tool_use"] and whole.stop_reason == "tool_use"
    assert whole.content[0].text == "我来查一下。"
    assert [(b.name, b.input) for b in whole.content[1:]] == [("get_weather", {"city": "东京", "unit": "celsius"}),
                                                               ("get_time", {})]
    with client.messages.stream(**kwargs) as stream:
        streamed = stream.get_final_message()
    assert ([b.model_dump(exclude={"id"}, exclude_none=True) for b in streamed.content]
            == [b.model_dump(exclude={"id"}, exclude_none=True) for b in whole.content])
    one = client.messages.create(**kwargs, tool_choice={"type": "auto", "disable_parallel_tool_use": True})
    assert [b.type for b in one.content] == ["text", "tool_use"] and one.content[1].name == "get_weather"
    hidden = client.messages.create(**kwargs, tool_choice={"type": "none"})  # no tools shown, nothing parsed
    assert [b.type for b in hidden.content] == ["text"] and "<tool_call>" in hidden.content[0].text


# ---- thinking -------------------------------------------------------------------------------------------------
def test_thinking_becomes_a_thinking_block_on_a_template_that_can_think(scripted, engine):
    template = copy.deepcopy(engine.tokenizer)  # MiniMind-3 style: open_thinking pre-fills "<think>\n"
    template.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% if open_thinking %}<think>\n{% endif %}{% endif %}")
    client = scripted("想一想。\n</think>\n\n你好！", tokenizer=template)
    kwargs = dict(model=MODEL, max_tokens=2000, messages=CHINESE)  # beyond the context: clamped to it
    thought = client.messages.create(**kwargs, thinking={"type": "enabled", "budget_tokens": 1024})
    assert [type(b) for b in thought.content] == [ThinkingBlock, TextBlock]
    assert (thought.content[0].thinking, thought.content[1].text) == ("想一想。\n", "你好！")
    with client.messages.stream(**kwargs, thinking={"type": "adaptive"}) as stream:
        streamed = stream.get_final_message()
    assert [b.model_dump() for b in streamed.content] == [b.model_dump() for b in thought.content]
    plain = client.messages.create(**kwargs, thinking={"type": "disabled"})
    assert [b.type for b in plain.content] == ["text"]
    assert plain.usage.input_tokens < thought.usage.input_tokens  # the template did not open <think>


def test_thinking_on_a_model_that_cannot_think_is_400(claude, server):
    with pytest.raises(anthropic.BadRequestError) as err:
        claude.messages.create(model=MODEL, max_tokens=2000, messages=WHO,
                               thinking={"type": "enabled", "budget_tokens": 1024})
    assert "thinking" in err.value.body["error"]["message"]
    assert greedy(claude, WHO, thinking={"type": "disabled"}).content[0].text == greedy(claude, WHO).content[0].text


def test_output_config_json_schema_is_followed(claude):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10}}, "required": ["name"],
              "additionalProperties": False}
    message = greedy(claude, WHO, max_tokens=40, output_config={"format": {"type": "json_schema", "schema": schema}})
    jsonschema.validate(json.loads(message.content[0].text), schema)


# ---- count_tokens, auth, errors ------------------------------------------------------------------------------------
def test_x_api_key_or_bearer_and_401_in_anthropic_shape(make_server):
    running = make_server(api_key="workshop-key")
    with anthropic.Anthropic(base_url=running.base_url, api_key="workshop-key", max_retries=0) as good:
        assert good.messages.create(model=MODEL, max_tokens=4, messages=WHO).content[0].text
    with anthropic.Anthropic(base_url=running.base_url, auth_token="workshop-key", api_key=None,
                             max_retries=0) as bearer:
        assert bearer.messages.count_tokens(model=MODEL, messages=WHO).input_tokens > 0
    with anthropic.Anthropic(base_url=running.base_url, api_key="wrong", max_retries=0) as bad:
        with pytest.raises(anthropic.AuthenticationError):
            bad.messages.create(model=MODEL, max_tokens=4, messages=WHO)
    body = {"model": MODEL, "max_tokens": 4, "messages": WHO}
    assert_anthropic_error(post(running, "/v1/messages", body, {"x-api-key": "wrong"}), 401, "authentication_error",
                           "x-api-key")
    assert post(running, "/v1/messages", body, {"x-api-key": "workshop-key"}).status_code == 200
    chat = post(running, "/v1/chat/completions", body, {"x-api-key": "wrong"})
    assert chat.status_code == 401 and "error" in chat.json() and "type" not in chat.json()  # OpenAI's envelope there


def test_a_full_queue_is_429_and_an_unknown_route_404_in_anthropic_shape(claude, make_server):
    with pytest.raises(anthropic.NotFoundError):  # the SDK maps our 404 to its error class
        claude.messages.create(model="claude-opus-9", max_tokens=4, messages=WHO)
    busy = make_server(max_queue=0)
    assert_anthropic_error(post(busy, "/v1/messages", {"model": MODEL, "max_tokens": 4, "messages": WHO}), 429,
                           "rate_limit_error")
    assert_anthropic_error(post(busy, "/v1/messages/nothing", {}), 404, "not_found_error")


BAD_REQUESTS = [
    ({"max_tokens": 0, "messages": WHO}, "max_tokens"),
    ({"max_tokens": 8, "messages": []}, "messages"),
    ({"max_tokens": 8, "messages": WHO, "temperature": 1.5}, "temperature"),
    ({"max_tokens": 8, "messages": WHO, "top_k": 0}, "top_k"),
    ({"max_tokens": 8, "messages": WHO, "frequency_penalty": 1}, "frequency_penalty"),
    ({"max_tokens": 8, "messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
    ({"max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]}, "image"),
    ({"max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, "document"),
    ({"max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x",
                                                                   "content": "42"}]}]}, "toolu_x"),
    ({"max_tokens": 8, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "toolu_a", "name": "f", "input": {}}]}, {"role": "user", "content": "ok"}]},
     "toolu_a"),
    ({"max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "tool_use", "id": "toolu_a", "name": "f", "input": {}}]}]}, "tool_use"),
    ({"max_tokens": 8, "messages": WHO, "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
     "web_search_20250305"),
    ({"max_tokens": 8, "messages": WHO, "tools": [{"name": "f", "input_schema": {"type": "string"}}]},
     "input_schema"),
    ({"max_tokens": 8, "messages": WHO, "tool_choice": {"type": "any"}}, "tool_choice"),
    ({"max_tokens": 8, "messages": WHO, "tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}},
     "nope"),
    ({"max_tokens": 8, "messages": WHO, "thinking": {"type": "enabled", "budget_tokens": 10}}, "budget_tokens"),
    ({"max_tokens": 8, "messages": WHO, "stop_sequences": [""]}, "stop_sequences"),
    ({"max_tokens": 8, "messages": WHO, "output_config": {"effort": "high"}}, "output_config.effort"),
    ({"max_tokens": 8, "messages": [{"role": "user", "content": "\ud800"}]}, "surrogate"),
]


@pytest.mark.parametrize("body,names", BAD_REQUESTS)
def test_bad_requests_are_400_in_anthropic_shape_naming_the_field(server, body, names):
    assert_anthropic_error(post(server, "/v1/messages", {"model": MODEL, **body}), 400, "invalid_request_error",
                           names)


def test_bad_bodies_and_count_tokens_fields_are_400_in_anthropic_shape(server, claude):
    assert_anthropic_error(post(server, "/v1/messages", b'{"model": "minimind", "max_t'), 400, "invalid_request_error",
                           "JSON")
    assert_anthropic_error(post(server, "/v1/messages", b'{"model": "\xff"}'), 400, "invalid_request_error", "UTF-8")
    assert_anthropic_error(post(server, "/v1/messages/count_tokens", {"model": MODEL, "messages": WHO,
                                                                      "max_tokens": 5}), 400,
                           "invalid_request_error", "max_tokens")
    with pytest.raises(anthropic.BadRequestError) as err:
        claude.messages.create(model=MODEL, max_tokens=8, messages=WHO, extra_body={"n": 2})
    assert err.value.body["type"] == "error" and "n" in err.value.body["error"]["message"]


def test_history_blocks_reach_the_prompt_as_the_chat_template_shows_them(claude, engine):
    """Earlier thinking is left out, tool calls and results are rendered like chat's, is_error marks a failure."""
    call = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "东京", "unit": "celsius"}}
    history = [{"role": "user", "content": "东京的天气怎么样？"},
               {"role": "assistant", "content": [{"type": "thinking", "thinking": "查一下。", "signature": "sig"},
                                                 {"type": "text", "text": "我来查。"}, call]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True,
                                             "content": [{"type": "text", "text": "超时"}]}]}]
    chat = [history[0], {"role": "assistant", "content": "我来查。", "tool_calls": [{"id": "toolu_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "东京", "unit": "celsius"}'}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "Error: 超时"}]
    tools = [{"type": "function", "function": {"name": WEATHER["name"], "description": WEATHER["description"],
                                               "parameters": WEATHER["input_schema"]}}]
    counted = claude.messages.count_tokens(model=MODEL, messages=history, tools=[WEATHER])
    assert counted.input_tokens == len(engine.encode(engine.chat_prompt(chat, tools=tools)))


def test_a_failure_after_the_header_is_an_error_event():
    from minimind_course.serving.render_messages import MessagesRenderer
    from minimind_course.serving.rendering import ResponseMeta

    [frame] = MessagesRenderer(ResponseMeta.new("msg", MODEL), 5, False, tools=False).failure("generation failed: X")
    name, data = frame.strip().split("\n")
    assert name == "event: error"
    assert json.loads(data.removeprefix("data: ")) == {"type": "error", "error": {
        "type": "api_error", "message": "generation failed: X"}}
