"""Tools and structured output on our server, end to end over HTTP with the openai SDK: parsed tool calls,
OpenAI-shaped streaming deltas that the SDK accumulates into exactly the non-streamed message, forced calls and JSON
through grammar-constrained decoding, and 400s naming the parameter."""

import json

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from minimind_course.launch import BackgroundServer
from minimind_course.engine.engine import Engine
from minimind_course.serving.app import create_app
from scripted_model import ScriptedLM, byte_tokens
from tool_models import minimind3_tokenizer

USER = [{"role": "user", "content": "东京和北京的天气怎么样？"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "当前天气", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "现在几点"}}
TWO_CALLS = ('我来查一下。\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "东京", "unit": "celsius"}}\n'
             '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')


@pytest.fixture
def scripted(engine):
    """A server whose model writes a given text (one UTF-8 byte per token, so every tag is split) then stops."""
    running = []

    def start(text: str, tokenizer=None, tool_grammar: str = "lazy") -> openai.OpenAI:
        tokenizer = tokenizer or engine.tokenizer
        model = ScriptedLM(byte_tokens(tokenizer, text) + [tokenizer.eos_token_id], len(tokenizer))
        scripted_engine = Engine(model, tokenizer, max_num_batched_tokens=4096)  # one prefill chunk: ScriptedLM
        # counts generated tokens from the end of the first chunk, and the tools block is longer than the default 256
        server = BackgroundServer(create_app(scripted_engine, tool_grammar=tool_grammar)).start()
        running.append((server, scripted_engine))
        return openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=60)

    yield start
    for server, scripted_engine in running:
        server.stop()
        scripted_engine.close()


def without_ids(message) -> dict:
    """A message without what must differ between two requests (call ids), nor the ``index`` the SDK's stream
    accumulator leaves on each call."""
    data = message.model_dump(exclude_none=True)
    for call in data.get("tool_calls", []):
        assert call.pop("id").startswith("call_")
        call.pop("index", None)
    return data


def test_tool_calls_are_parsed_and_streamed_as_openai_deltas(scripted):
    client = scripted(TWO_CALLS)
    answer = client.chat.completions.create(model="minimind", messages=USER, tools=[WEATHER, TIME])
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "我来查一下。"
    calls = choice.message.tool_calls
    assert [(c.type, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("function", "get_weather", {"city": "东京", "unit": "celsius"}), ("function", "get_time", {})]
    assert len({c.id for c in calls}) == 2

    chunks = list(client.chat.completions.create(model="minimind", messages=USER, tools=[WEATHER, TIME], stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert all("<tool" not in (d.content or "") and "</tool" not in (d.content or "") for d in deltas)
    parts = [part for d in deltas for part in d.tool_calls or []]
    firsts = [p for p in parts if p.id]
    assert [(p.index, p.type, p.function.name) for p in firsts] == [(0, "function", "get_weather"),
                                                                     (1, "function", "get_time")]
    for index in (0, 1):  # later deltas: argument pieces under the same index, no id or name
        rest = [p for p in parts if p.index == index and not p.id]
        assert rest and all(p.function.name is None and p.type is None for p in rest)
        arguments = "".join(p.function.arguments or "" for p in parts if p.index == index)
        assert arguments == calls[index].function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]

    with client.chat.completions.stream(model="minimind", messages=USER, tools=[WEATHER, TIME]) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    assert without_ids(final.choices[0].message) == without_ids(choice.message)  # the SDK's accumulation


def test_malformed_call_is_returned_as_content(scripted, caplog):
    """Without the lazy grammar a model can write a broken call: the text comes back as content."""
    client = scripted('<tool_call>\n{"name": "get_weather", "arguments": {"city": 东京}}\n</tool_call>',
                      tool_grammar="off")
    answer = client.chat.completions.create(model="minimind", messages=USER, tools=[WEATHER])
    assert answer.choices[0].finish_reason == "stop" and answer.choices[0].message.tool_calls is None
    assert answer.choices[0].message.content.startswith("<tool_call>")
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="minimind", messages=USER, tools=[WEATHER], stream=True) if c.choices)
    assert streamed == answer.choices[0].message.content


@pytest.mark.parametrize("tool_grammar", ["lazy", "off"])
def test_auto_call_the_model_starts_is_made_valid_by_the_lazy_grammar(scripted, tool_grammar):
    """The model starts a call but misspells the function and a value: with the lazy grammar the server still
    returns a valid call of the offered function (the mask left only the right letters); without it, the call
    names a function that was never offered."""
    city = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Oslo", "东京"]}}, "required": ["city"]}}}
    text = '好的。\n<tool_call>\n{"name": "get_wxather", "arguments": {"city": "Osl0"}}\n</tool_call>'
    client = scripted(text, tool_grammar=tool_grammar)
    for stream in (False, True):
        kwargs = dict(model="minimind", messages=USER, tools=[city], temperature=0, parallel_tool_calls=False)
        if stream:
            with client.chat.completions.stream(**kwargs) as events:
                answer = events.get_final_completion()
        else:
            answer = client.chat.completions.create(**kwargs)
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "好的。"
        [call] = choice.message.tool_calls
        if tool_grammar == "lazy":
            assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Oslo"})
        else:
            assert call.function.name == "get_wxather"


def test_without_tools_the_text_is_left_alone(scripted):
    client = scripted(TWO_CALLS)
    for choice in ("none", None):
        extra = {"tools": [WEATHER], "tool_choice": choice} if choice else {}
        answer = client.chat.completions.create(model="minimind", messages=USER, **extra)
        assert answer.choices[0].message.content == TWO_CALLS and answer.choices[0].message.tool_calls is None


def test_minimind3_reasoning_and_tool_calls_together(scripted):
    text = "<think>\n用户问天气，我调用工具。\n</think>\n\n" + TWO_CALLS.split("\n", 1)[1]
    client = scripted(text, tokenizer=minimind3_tokenizer())
    answer = client.chat.completions.create(model="minimind", messages=USER, tools=[WEATHER, TIME])
    message = answer.choices[0].message
    assert message.reasoning_content == "用户问天气，我调用工具。\n"  # as ThinkParser keeps it
    assert message.content is None and [c.function.name for c in message.tool_calls] == ["get_weather", "get_time"]
    with client.chat.completions.stream(model="minimind", messages=USER, tools=[WEATHER, TIME]) as stream:
        final = stream.get_final_completion()
    assert without_ids(final.choices[0].message) == without_ids(message)


def test_a_tool_conversation_is_rendered_and_answered(client):
    history = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "东京"}'}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": '{"temperature": "12°C"}'}]
    answer = client.chat.completions.create(model="minimind", messages=history, tools=[WEATHER], max_tokens=8,
                                            temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert answer.usage.prompt_tokens > 100  # the tools block and the tool response are in the prompt


@pytest.mark.parametrize("tool_choice,reason", [("required", "tool_calls"),
                                                ({"type": "function", "function": {"name": "get_weather"}}, "stop")])
def test_forced_calls_on_the_bundled_model_always_parse(client, tool_choice, reason):
    for stream in (False, True):
        kwargs = dict(model="minimind", messages=USER, tools=[WEATHER, TIME], tool_choice=tool_choice, seed=7,
                      max_tokens=200, parallel_tool_calls=False)
        if stream:
            with client.chat.completions.stream(**kwargs) as events:
                answer = events.get_final_completion()
        else:
            answer = client.chat.completions.create(**kwargs)
        choice = answer.choices[0]
        assert choice.finish_reason == reason, choice
        assert len(choice.message.tool_calls) == 1 and not choice.message.content
        call = choice.message.tool_calls[0].function
        if isinstance(tool_choice, dict):
            assert call.name == "get_weather"
        schema = {"get_weather": WEATHER, "get_time": TIME}[call.name]["function"].get("parameters", {})
        jsonschema.validate(json.loads(call.arguments), schema)


class Person(BaseModel):
    name: str = Field(max_length=6)
    age: int = Field(ge=0, le=120)


def test_structured_output_on_the_bundled_model(client):
    parsed = client.chat.completions.parse(model="minimind", messages=USER, response_format=Person, seed=3,
                                           max_tokens=100)
    assert parsed.choices[0].finish_reason == "stop"
    assert isinstance(parsed.choices[0].message.parsed, Person)
    obj = client.chat.completions.create(model="minimind", messages=USER, response_format={"type": "json_object"},
                                         seed=3, max_tokens=100)
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    with client.chat.completions.stream(model="minimind", messages=USER, response_format=Person, seed=3,
                                        max_tokens=100) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.parsed == parsed.choices[0].message.parsed  # same seed, same answer


@pytest.mark.parametrize("fields,param", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
     "tools.0.function.parameters"),
    ({"messages": USER + [{"role": "tool", "tool_call_id": "call_x", "content": "1"}]}, "messages.1.tool_call_id"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}], "tool_choice": "required"},
     "tools.0.function.parameters"),
    ({"tools": [WEATHER, {"type": "function", "function": {"name": "f", "parameters": {  # auto: the lazy grammar
        "type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}]}, "tools.1.function.parameters"),
])
def test_bad_tool_requests_are_400_naming_the_param(base_url, fields, param):
    response = httpx.post(base_url + "/chat/completions", json={"messages": USER, "max_tokens": 4, **fields})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert response.json()["error"]["type"] == "BadRequestError"


def test_minimind3_checkpoint_served_with_forced_and_streamed_calls(tmp_path):
    """A random-weight MiniMind-3 folder (upstream layout, tool tokens as single tokens, its own template) behind the
    server: forced calls come back as tool_calls that follow the schema, streamed and not."""
    from minimind_course.model.loading import load_model
    from tool_models import build_minimind3_folder

    engine = Engine(*load_model(build_minimind3_folder(tmp_path / "minimind3")), max_num_batched_tokens=4096)
    try:
        with BackgroundServer(create_app(engine)) as server, openai.OpenAI(
                base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=120) as client:
            kwargs = dict(model="minimind", messages=USER, tools=[WEATHER, TIME], tool_choice="required", seed=2,
                          parallel_tool_calls=False,
                          max_tokens=200)
            answer = client.chat.completions.create(**kwargs)
            with client.chat.completions.stream(**kwargs) as events:
                streamed = events.get_final_completion()
    finally:
        engine.close()
    for choice in (answer.choices[0], streamed.choices[0]):
        assert choice.finish_reason == "tool_calls", choice
        for made in choice.message.tool_calls:
            schema = {"get_weather": WEATHER, "get_time": TIME}[made.function.name]["function"].get("parameters", {})
            jsonschema.validate(json.loads(made.function.arguments), schema)
    assert without_ids(streamed.choices[0].message) == without_ids(answer.choices[0].message)  # same seed
