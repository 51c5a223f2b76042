"""Tool calls in a model's text: the request fields and their 400s, the prompt format, and the text parser."""

import json
import random

import pytest
from pydantic import ValidationError

from minimind_course.serving.protocol import ChatCompletionRequest, ParamError
from minimind_course.serving.tool_parser import ToolCallParser, extract_tool_calls
from tool_models import minimind3_tokenizer

USER = [{"role": "user", "content": "东京天气怎么样？"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "当前天气",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "东京"}'}}
HISTORY = USER + [{"role": "assistant", "content": None, "tool_calls": [CALL]},
                  {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": "12°C"}'}]


def param_of(err: ValidationError) -> str:
    """The ``param`` the server reports: a ParamError's own, else the error's location."""
    item = err.errors()[0]
    cause = item.get("ctx", {}).get("error")
    return cause.param if isinstance(cause, ParamError) else ".".join(str(p) for p in item["loc"])


@pytest.mark.parametrize("fields,param", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
     "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"required": "city"}}}]},
     "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
     "response_format.json_schema.json_schema.schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema.json_schema"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": USER + [{"role": "tool", "tool_call_id": "call_9", "content": "x"}]}, "messages.1.tool_call_id"),
    ({"messages": USER + [{"role": "tool", "content": "x"}]}, "messages.1"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [CALL]}]}, "messages.0"),
])
def test_bad_tool_fields_name_their_param(fields, param):
    with pytest.raises(ValidationError) as err:
        ChatCompletionRequest(**{"messages": USER, **fields})
    assert param_of(err.value) == param


def test_tool_fields_are_read():
    req = ChatCompletionRequest(messages=HISTORY, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
    assert [t.function.name for t in req.forced_tools()] == ["get_weather"]
    assert req.active_tools()[0]["function"]["parameters"]["required"] == ["city"]
    assert req.template_messages()[1]["tool_calls"] == [CALL]
    assert req.template_messages()[2]["tool_call_id"] == "call_1"
    assert ChatCompletionRequest(messages=USER, tools=[WEATHER], tool_choice="none").active_tools() == []
    assert ChatCompletionRequest(messages=USER, tools=[WEATHER]).forced_tools() == []  # auto: the model decides
    assert ChatCompletionRequest(messages=USER, tool_choice="none").tools is None  # none without tools is fine
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "array"}, "strict": True}}
    assert ChatCompletionRequest(messages=USER, response_format=fmt).json_format() == {"type": "array"}
    assert ChatCompletionRequest(messages=USER, response_format={"type": "json_object"}).json_format() == {
        "type": "object"}
    assert ChatCompletionRequest(messages=USER, response_format={"type": "text"}).json_format() is None


EXPECTED_PROMPT = """<|im_start|>system
简短回答。

# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{"type": "function", "function": {"name": "get_weather", "description": "当前天气", "parameters": {"type": "object", \
"properties": {"city": {"type": "string"}}, "required": ["city"]}}}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
<|im_start|>user
东京天气怎么样？<|im_end|>
<|im_start|>assistant
<tool_call>
{"name": "get_weather", "arguments": {"city": "东京"}}
</tool_call>
<tool_call>
{"name": "get_weather", "arguments": {"city": "Paris"}}
</tool_call><|im_end|>
<|im_start|>user
<tool_response>
{"temperature": "12°C"}
</tool_response>
<tool_response>
9°C
</tool_response><|im_end|>
<|im_start|>assistant
"""


def test_bundled_template_renders_minimind3_tool_format(engine):
    second = {**CALL, "id": "call_2", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [{"role": "system", "content": "简短回答。"}, USER[0],
                {"role": "assistant", "content": None, "tool_calls": [CALL, second]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": "12°C"}'},
                {"role": "tool", "tool_call_id": "call_2", "content": "9°C"}]
    req = ChatCompletionRequest(messages=messages, tools=[WEATHER])
    prompt = engine.tokenizer.apply_chat_template(req.template_messages(), tools=req.active_tools(), tokenize=False,
                                                  add_generation_prompt=True)
    assert prompt == EXPECTED_PROMPT
    plain = engine.tokenizer.apply_chat_template([{"role": "system", "content": "s"}, USER[0]], tokenize=False,
                                                 add_generation_prompt=True)
    assert plain == "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\n东京天气怎么样？<|im_end|>\n<|im_start|>assistant\n"


def test_minimind3_format_template_adds_think_blocks_and_single_tool_tokens():
    tokenizer = minimind3_tokenizer()
    req = ChatCompletionRequest(messages=HISTORY, tools=[WEATHER])
    prompt = tokenizer.apply_chat_template(req.template_messages(), tools=req.active_tools(), tokenize=False,
                                           add_generation_prompt=True)
    assert "<|im_start|>assistant\n<think>\n\n</think>\n\n<tool_call>\n" in prompt
    assert prompt.endswith("<|im_start|>user\n<tool_response>\n{\"temperature\": \"12°C\"}\n</tool_response><|im_end|>\n"
                           "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert len(tokenizer.encode("<tool_call>", add_special_tokens=False)) == 1
    assert tokenizer.decode(tokenizer.encode("<tool_call>x</tool_call>", add_special_tokens=False),
                            skip_special_tokens=True) == "<tool_call>x</tool_call>"


ANSWER = ('我来查一下。\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "东京"}}\n</tool_call>\n'
          '<tool_call>\n{"name": "list_cities"}\n</tool_call>\n<tool_call>{broken</tool_call>\n好的 <tool_ca')


def test_calls_become_tool_calls_text_stays_content():
    content, calls = extract_tool_calls(ANSWER)
    assert content == '我来查一下。<tool_call>{broken</tool_call>好的 <tool_ca'  # malformed/cut calls stay content
    assert [(c.index, c.name, json.loads(c.arguments)) for c in calls] == [(0, "get_weather", {"city": "东京"}),
                                                                            (1, "list_cities", {})]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    assert extract_tool_calls("plain answer  \n") == ("plain answer  \n", [])  # answers without calls are untouched
    assert extract_tool_calls('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>')[1][0].arguments == (
        '{"a": 1}')  # arguments written as a JSON string are unpacked
    assert extract_tool_calls('<tool_call>{"name": "f", "arguments": [1]}</tool_call>')[1] == []


@pytest.mark.parametrize("seed", range(50))
def test_streamed_pieces_give_the_same_message(seed):
    rng = random.Random(seed)
    parser, content, calls, i = ToolCallParser(), "", [], 0
    while i < len(ANSWER):
        j = i + rng.randint(1, 6)
        piece_content, done = parser.push(ANSWER[i:j])
        assert "<tool_call>\n{" not in piece_content and "</tool_call>\n" not in piece_content
        content, calls, i = content + piece_content, calls + done, j
    content += parser.flush()
    expected_content, expected_calls = extract_tool_calls(ANSWER)
    assert content == expected_content
    assert [(c.index, c.name, c.arguments) for c in calls] == [(c.index, c.name, c.arguments) for c in expected_calls]
