"""``/v1/responses`` end to end with the openai SDK (``responses.create`` / ``responses.stream`` / ``retrieve``):
the same greedy answers as chat completions for the same conversation, OpenAI's event order with gapless sequence
numbers, function calls and their outputs, structured output, the bounded store, and 400s naming the field."""

from __future__ import annotations

import json
import time

import httpx
import jsonschema
import openai
import pytest

from minimind_course.engine.engine import Engine
from minimind_course.launch import BackgroundServer
from minimind_course.serving.app import create_app
from scripted_model import ScriptedLM, byte_tokens
from tool_models import minimind3_tokenizer

MODEL = "minimind"
WEATHER = {"type": "function", "name": "get_weather", "description": "当前天气", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["东京", "北京"]}}, "required": ["city"]}}
CALL = '好的。\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "东京"}}\n</tool_call>'
VERDICT = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "mood": {"enum": ["calm", "glad"]}},
           "required": ["answer", "mood"], "additionalProperties": False}
GREEDY = {"temperature": 0, "max_output_tokens": 40}


@pytest.fixture
def scripted(engine):
    """A server whose model writes a given text (one UTF-8 byte per token, so every tag is split) then stops."""
    running = []

    def start(text: str, tokenizer=None, **app_kwargs) -> tuple[openai.OpenAI, str]:
        tokenizer = tokenizer or engine.tokenizer
        model = ScriptedLM(byte_tokens(tokenizer, text) + [tokenizer.eos_token_id], len(tokenizer))
        scripted_engine = Engine(model, tokenizer, max_num_batched_tokens=4096)  # one prefill chunk (ScriptedLM)
        server = BackgroundServer(create_app(scripted_engine, **app_kwargs)).start()
        running.append((server, scripted_engine))
        url = server.base_url + "/v1"
        return openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60), url

    yield start
    for server, scripted_engine in running:
        server.stop()
        scripted_engine.close()


def chat_answer(client: openai.OpenAI, messages: list[dict], max_tokens: int = 40):
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=max_tokens)


def stream_events(client: openai.OpenAI, **fields):
    """The parsed events and the final response (openai 2.x's accumulator only knows ``response.completed``: an
    incomplete stream's final response is its last event's)."""
    with client.responses.stream(model=MODEL, **fields) as stream:
        events = list(stream)
        final = events[-1].response if events[-1].type == "response.incomplete" else stream.get_final_response()
    return events, final


def bad_request(url: str, body: dict) -> dict:
    response = httpx.post(url + "/responses", json={"model": MODEL, **body}, timeout=60)
    assert response.status_code == 400, response.text
    return response.json()["error"]


# ---- plain answers ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("question", ["Who are you?", "请介绍一下你自己。"])
def test_a_string_input_answers_like_chat_completions(client, question):
    response = client.responses.create(model=MODEL, input=question, **GREEDY)
    chat = chat_answer(client, [{"role": "user", "content": question}])
    assert response.object == "response" and response.id.startswith("resp_") and response.model == MODEL
    assert response.output_text == chat.choices[0].message.content and response.output_text
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    message = response.output[-1]
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.content[0].type == "output_text"
    if question.startswith("请"):
        assert any("\u4e00" <= char <= "\u9fff" for char in response.output_text)


def test_instructions_and_developer_messages_become_one_system_prompt(client):
    items = [{"role": "developer", "content": "Answer briefly."},
             {"role": "user", "content": [{"type": "input_text", "text": "我叫小明。"}]},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "你好，小明！",
                                                                    "annotations": []}]},
             {"role": "user", "content": "我叫什么名字？"}]
    response = client.responses.create(model=MODEL, instructions="You are MiniMind.", input=items, **GREEDY)
    chat = chat_answer(client, [{"role": "system", "content": "You are MiniMind.\n\nAnswer briefly."},
                                {"role": "user", "content": "我叫小明。"}, {"role": "assistant", "content": "你好，小明！"},
                                {"role": "user", "content": "我叫什么名字？"}])
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.instructions == "You are MiniMind."


# ---- streaming ----------------------------------------------------------------------------------------------
def test_the_stream_follows_openais_event_order_and_matches_the_whole_response(client, base_url):
    events, final = stream_events(client, input="请介绍一下你自己。", temperature=0, max_output_tokens=300)
    whole = client.responses.create(model=MODEL, input="请介绍一下你自己。", temperature=0, max_output_tokens=300)
    types = [event.type for event in events]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    head = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    tail = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert types[:4] == head and types[-4:-1] == tail and types[-1] == "response.completed"
    assert set(types[4:-4]) == {"response.output_text.delta"}
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert deltas == final.output_text == whole.output_text
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert final.id == events[0].response.id and final.usage == whole.usage
    raw = httpx.post(base_url + "/responses", timeout=60,
                     json={"model": MODEL, "input": "hi", "stream": True, "max_output_tokens": 4})
    frames = [frame for frame in raw.text.split("\n\n") if frame]
    assert all(frame.startswith("event: ") for frame in frames)  # every frame names its event, as OpenAI's
    assert json.loads(frames[0].split("data: ", 1)[1])["type"] == frames[0].split("\n")[0][7:]


def test_max_output_tokens_makes_the_response_incomplete(client):
    response = client.responses.create(model=MODEL, input="请介绍一下你自己。", temperature=0, max_output_tokens=3)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 3 and response.output[-1].status == "incomplete"
    events, final = stream_events(client, input="请介绍一下你自己。", temperature=0, max_output_tokens=3)
    assert events[-1].type == "response.incomplete" and final.status == "incomplete"
    assert final.output_text == response.output_text


def test_an_error_after_streaming_began_is_response_failed(scripted, engine):
    _, url = scripted("ok")
    fail = engine.tokenizer.decode([ScriptedLM.FAIL_TOKEN])  # a prompt token that makes the model raise
    with httpx.stream("POST", url + "/responses", json={"input": fail, "stream": True}, timeout=30) as response:
        frames = [frame for frame in response.read().decode().split("\n\n") if frame]
    assert response.status_code == 200
    events = [json.loads(frame.split("data: ", 1)[1]) for frame in frames]
    assert [event["type"] for event in events] == ["response.created", "response.in_progress", "error",
                                                   "response.failed"]
    assert "scripted failure" in events[2]["message"] and events[3]["response"]["status"] == "failed"
    assert events[3]["response"]["error"]["code"] == "server_error"
    assert [event["sequence_number"] for event in events] == [0, 1, 2, 3]


# ---- tools --------------------------------------------------------------------------------------------------
def test_function_call_round_trip(scripted):
    client, _ = scripted(CALL)
    question = [{"role": "user", "content": "东京天气怎么样？"}]
    response = client.responses.create(model=MODEL, input=question, tools=[WEATHER])
    message, call = response.output
    assert message.type == "message" and message.content[0].text == "好的。"
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    assert json.loads(call.arguments) == {"city": "东京"} and call.status == "completed"
    events, final = stream_events(client, input=question, tools=[WEATHER])
    types = [event.type for event in events]
    assert types.index("response.function_call_arguments.delta") < types.index(
        "response.function_call_arguments.done") < len(types) - 1
    done = next(event for event in events if event.type == "response.function_call_arguments.done")
    assert done.name == "get_weather" and done.arguments == call.arguments
    assert [item.type for item in final.output] == ["message", "function_call"]
    follow_up = question + [item.model_dump(exclude_none=True) for item in response.output] + [
        {"type": "function_call_output", "call_id": call.call_id, "output": "晴，25°C"}]
    answered = client.responses.create(model=MODEL, input=follow_up, tools=[WEATHER])
    assert answered.status == "completed"
    unknown = follow_up[:1] + [{"type": "function_call_output", "call_id": "call_nowhere", "output": "1"}]
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=MODEL, input=unknown, tools=[WEATHER])
    assert err.value.body["param"] == "input.1.call_id"


def test_required_tool_choice_forces_a_parseable_call_on_the_bundled_model(client):
    response = client.responses.create(model=MODEL, input="东京天气怎么样？", tools=[WEATHER], tool_choice="required",
                                       temperature=0, max_output_tokens=200, parallel_tool_calls=False)
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather"
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])
    named = client.responses.create(model=MODEL, input="几点了？", tools=[WEATHER, {**WEATHER, "name": "get_time"}],
                                    tool_choice={"type": "function", "name": "get_time"}, temperature=0,
                                    max_output_tokens=200)
    assert [item.name for item in named.output if item.type == "function_call"][:1] == ["get_time"]
    assert named.tool_choice.name == "get_time"


def test_reasoning_items_for_a_thinking_model(scripted):
    client, _ = scripted("<think>\n用户问天气，我调用工具。\n</think>\n\n" + CALL.split("\n", 1)[1],
                         tokenizer=minimind3_tokenizer())
    response = client.responses.create(model=MODEL, input="东京天气怎么样？", tools=[WEATHER])
    reasoning, call = response.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text == "用户问天气，我调用工具。\n"
    assert call.type == "function_call" and response.usage.output_tokens_details.reasoning_tokens > 0
    events, final = stream_events(client, input="东京天气怎么样？", tools=[WEATHER])
    assert "response.reasoning_text.delta" in [event.type for event in events]
    assert [item.type for item in final.output] == ["reasoning", "function_call"]
    assert final.output[0].content == reasoning.content
    again = client.responses.create(model=MODEL, tools=[WEATHER], input=[
                                    {"role": "user", "content": "东京天气怎么样？"},
                                    *[item.model_dump(exclude_none=True) for item in response.output],
                                    {"type": "function_call_output", "call_id": call.call_id, "output": "晴"}])
    assert again.status == "completed"  # reasoning items sent back are accepted


# ---- structured output --------------------------------------------------------------------------------------
def test_text_format_json_schema_is_followed(client):
    fmt = {"type": "json_schema", "name": "verdict", "schema": VERDICT, "strict": True}
    response = client.responses.create(model=MODEL, input="Are you happy? Answer in JSON.", text={"format": fmt},
                                       temperature=0, max_output_tokens=60)
    jsonschema.validate(json.loads(response.output_text), VERDICT)
    assert response.text.format.type == "json_schema" and response.text.format.name == "verdict"
    anything = client.responses.create(model=MODEL, input="JSON please", text={"format": {"type": "json_object"}},
                                       temperature=0, max_output_tokens=60)
    if anything.status == "completed":
        assert isinstance(json.loads(anything.output_text), dict)
    else:
        assert anything.output_text.startswith("{")


# ---- state --------------------------------------------------------------------------------------------------
def test_previous_response_id_continues_the_conversation(client):
    first = client.responses.create(model=MODEL, input="我叫小明。", instructions="Be kind.", **GREEDY)
    assert client.responses.retrieve(first.id) == first
    second = client.responses.create(model=MODEL, input="我叫什么名字？", previous_response_id=first.id, **GREEDY)
    chat = chat_answer(client, [{"role": "user", "content": "我叫小明。"},  # instructions are not carried over
                                {"role": "assistant", "content": first.output_text},
                                {"role": "user", "content": "我叫什么名字？"}])
    assert second.previous_response_id == first.id
    assert second.output_text == chat.choices[0].message.content
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    client.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(second.id)


def test_unknown_ids_are_404_in_openais_shape(client, base_url):
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.retrieve("resp_nothing")
    assert err.value.body["message"] == "Response with id 'resp_nothing' not found."
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(model=MODEL, input="hi", previous_response_id="resp_nothing")
    assert err.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(model="no-such-model", input="hi")
    assert err.value.body["param"] == "model"
    raw = httpx.delete(base_url + "/responses/resp_nothing", timeout=10)
    assert raw.status_code == 404 and set(raw.json()["error"]) == {"message", "type", "param", "code"}


def test_store_false_is_stateless(client):
    response = client.responses.create(model=MODEL, input="hi", store=False, max_output_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="hi", previous_response_id=response.id)


def test_the_store_is_bounded(engine):
    app = create_app(engine, max_stored_responses=2)
    with BackgroundServer(app) as server, \
            openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0) as client:
        ids = [client.responses.create(model=MODEL, input=f"hi {i}", max_output_tokens=2).id for i in range(3)]
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(ids[0])  # the least recently used is evicted
        assert [client.responses.retrieve(i).id for i in ids[1:]] == ids[1:]
        assert len(app.state.response_store) == 2


# ---- refusals -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields,param", [
    ({}, "input"),
    ({"input": [{"type": "computer_call", "id": "x"}]}, "input.0.type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]},
     "input.0.content.0.type"),
    ({"input": [{"role": "robot", "content": "hi"}]}, "input.0.role"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{"},
                {"role": "user", "content": "hi"}]}, "input.0.arguments"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"input": "hi", "tools": [{"type": "function", "name": "f", "parameters": {"type": "objekt"}}]},
     "tools.0.parameters"),
    ({"input": "hi", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"input": "hi", "tool_choice": "required"}, "tool_choice"),
    ({"input": "hi", "tools": [WEATHER], "tool_choice": {"type": "file_search"}}, "tool_choice"),
    ({"input": "hi", "text": {"format": {"type": "xml"}}}, "text.format"),
    ({"input": "hi", "temperature": 3}, "temperature"),
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "hi", "conversation": "conv_1"}, "conversation"),
    ({"input": "hi", "background": True}, "background"),
    ({"input": "hi", "truncation": "auto"}, "truncation"),
    ({"input": "hi", "include": ["file_search_call.results"]}, "include"),
    ({"input": "hi", "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"input": "hi", "reasoning": {"effort": "high"}}, "reasoning.effort"),  # the bundled template cannot think
    ({"input": "hi", "top_logprobs": 5}, "top_logprobs"),
    ({"input": "hi", "reasoning": {"context": "all_turns"}}, "reasoning.context"),
])
def test_bad_requests_are_400_naming_the_field(base_url, fields, param):
    error = bad_request(base_url, fields)
    assert error["param"] == param, error
    assert error["type"] == "BadRequestError" and error["message"]


def test_fields_the_sdk_knows_are_honoured_or_refused(client):
    response = client.responses.create(model=MODEL, input="hi", max_output_tokens=4, metadata={"lesson": "08"},
                                       include=["reasoning.encrypted_content"], truncation="disabled",
                                       reasoning={"effort": "none"}, user="learner-1", parallel_tool_calls=False)
    assert response.metadata == {"lesson": "08"} and response.user == "learner-1"
    assert client.responses.retrieve(response.id).metadata == {"lesson": "08"}


def test_a_client_that_hangs_up_stops_its_generation(engine):
    """The shared path's disconnect handling: streamed or not, the engine stops a Responses request whose client
    is gone, and nothing is stored for it."""
    endless = ScriptedLM(byte_tokens(engine.tokenizer, "好"), len(engine.tokenizer), step_delay=0.01)
    slow = Engine(endless, engine.tokenizer, max_num_batched_tokens=4096)
    app = create_app(slow)
    body = {"input": "写一首很长的诗。", "max_output_tokens": 3000}
    try:
        with BackgroundServer(app) as server:
            url = server.base_url + "/v1/responses"
            with httpx.stream("POST", url, json={**body, "stream": True}, timeout=30) as response:
                for line in response.iter_lines():
                    if line.startswith("data: ") and '"response.output_text.delta"' in line:
                        break  # hang up after the first delta
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url, json=body, timeout=0.5)
            for _ in range(500):
                if len(slow.traces()) == 2:
                    break
                time.sleep(0.01)
    finally:
        slow.close()
    assert [trace.outcome for trace in slow.traces()] == ["cancelled", "cancelled"]
    assert all(trace.completion_tokens < 3000 for trace in slow.traces())
    assert len(app.state.response_store) == 0
