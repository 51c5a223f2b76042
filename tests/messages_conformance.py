"""Backend-agnostic checks of Anthropic's Messages API, driven by the ``anthropic`` SDK: collected against our server
(``test_messages_api.py``) and against real vLLM (``test_messages_vllm.py``).

A test module does ``from messages_conformance import *`` and defines a ``messages_endpoint`` fixture: an
``Endpoint`` whose ``base_url`` is the server root (the SDK adds ``/v1/messages`` itself).
"""

from __future__ import annotations

import anthropic
import httpx
import jsonschema
import pytest
from anthropic.types import Message, TextBlock, ToolUseBlock

WHO = [{"role": "user", "content": "Who are you?"}]
CHINESE = [{"role": "user", "content": "请介绍一下你自己。"}]
WEATHER = {"name": "get_weather", "description": "当前天气", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}
TIME = {"name": "get_time", "description": "现在几点", "input_schema": {"type": "object", "properties": {}}}
GREEDY = {"temperature": 0}  # this SDK release no longer has sampling arguments: they travel in extra_body


@pytest.fixture
def claude(messages_endpoint) -> anthropic.Anthropic:
    """The anthropic SDK pointed at the endpoint (its base URL is the server root)."""
    with anthropic.Anthropic(base_url=messages_endpoint.base_url, api_key=messages_endpoint.api_key, max_retries=0,
                             timeout=120) as sdk:
        yield sdk


def greedy(claude: anthropic.Anthropic, messages, model: str = "minimind", **kwargs) -> Message:
    extra = {**GREEDY, **kwargs.pop("extra_body", {})}
    return claude.messages.create(model=model, max_tokens=kwargs.pop("max_tokens", 48), messages=messages,
                                  extra_body=extra, **kwargs)


def assert_anthropic_error(response: httpx.Response, status: int, kind: str, names: str | None = None) -> str:
    """Anthropic's error shape with this status and type; ``names``: text the message must contain (the field)."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body.get("type") == "error" and set(body) <= {"type", "error", "request_id"}, body
    assert body["error"]["type"] == kind and isinstance(body["error"]["message"], str), body
    if names:
        assert names in body["error"]["message"], body
    return body["error"]["message"]


def _post(messages_endpoint, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(messages_endpoint.base_url + "/v1/messages", json=body, timeout=60,
                      headers={"x-api-key": messages_endpoint.api_key, **(headers or {})})


def test_messages_text_answer_is_a_message(claude, messages_endpoint):
    message = greedy(claude, WHO, model=messages_endpoint.model)
    assert isinstance(message, Message) and message.type == "message" and message.role == "assistant"
    assert message.model == messages_endpoint.model
    assert isinstance(message.content[0], TextBlock) and message.content[0].text
    assert message.stop_reason in ("end_turn", "max_tokens") and message.stop_sequence is None
    assert message.usage.input_tokens > 0 and 0 < message.usage.output_tokens <= 48


def test_messages_max_tokens_ends_with_stop_reason_max_tokens(claude, messages_endpoint):
    message = greedy(claude, WHO, model=messages_endpoint.model, max_tokens=3)
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 3


def test_messages_stop_sequences_end_with_stop_reason_stop_sequence(claude, messages_endpoint):
    text = greedy(claude, WHO, model=messages_endpoint.model).content[0].text
    stop = next(text[i:i + 3] for i in range(4, len(text) - 3) if text[i:i + 3].strip() == text[i:i + 3])
    message = greedy(claude, WHO, model=messages_endpoint.model, stop_sequences=["never-written-zzz", stop])
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == stop
    assert message.content[0].text == text[:text.index(stop)]
    with claude.messages.stream(model=messages_endpoint.model, max_tokens=48, messages=WHO, extra_body=GREEDY,
                                stop_sequences=[stop]) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence, final.content[0].text) == ("stop_sequence", stop,
                                                                               text[:text.index(stop)])


def test_messages_streaming_accumulates_into_the_whole_message(claude, messages_endpoint):
    whole = greedy(claude, CHINESE, model=messages_endpoint.model, system="你是一个乐于助人的助手。")
    with claude.messages.stream(model=messages_endpoint.model, max_tokens=48, messages=CHINESE, extra_body=GREEDY,
                                system="你是一个乐于助人的助手。") as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text == whole.content[0].text
    assert (final.stop_reason, final.usage.input_tokens, final.usage.output_tokens) == (
        whole.stop_reason, whole.usage.input_tokens, whole.usage.output_tokens)


def test_messages_count_tokens_matches_usage_input_tokens(claude, messages_endpoint):
    kwargs = dict(system="简短回答。", messages=[{"role": "user", "content": "东京的天气怎么样？"}], tools=[WEATHER])
    counted = claude.messages.count_tokens(model=messages_endpoint.model, **kwargs)
    used = greedy(claude, model=messages_endpoint.model, max_tokens=4, **kwargs).usage.input_tokens
    assert counted.input_tokens == used
    assert claude.messages.count_tokens(model=messages_endpoint.model, messages=WHO).input_tokens < used


def test_messages_tool_choice_any_forces_a_call_that_follows_the_schema(claude, messages_endpoint):
    choice = {"type": "any", "disable_parallel_tool_use": True}  # one call: a 4 M-parameter model would loop
    message = greedy(claude, [{"role": "user", "content": "东京的天气怎么样？"}], model=messages_endpoint.model,
                     tools=[WEATHER, TIME], tool_choice=choice, max_tokens=200)
    calls = [block for block in message.content if isinstance(block, ToolUseBlock)]
    assert message.stop_reason == "tool_use" and len(calls) == 1, message
    if calls[0].name == "get_weather":
        jsonschema.validate(calls[0].input, WEATHER["input_schema"])


def test_messages_missing_max_tokens_is_400_in_anthropic_shape(messages_endpoint):
    response = _post(messages_endpoint, {"model": messages_endpoint.model, "messages": WHO})
    assert_anthropic_error(response, 400, "invalid_request_error", "max_tokens")


def test_messages_unknown_fields_are_400_naming_them(messages_endpoint):
    body = {"model": messages_endpoint.model, "max_tokens": 4, "messages": WHO, "speed": "fast"}
    assert_anthropic_error(_post(messages_endpoint, body), 400, "invalid_request_error", "speed")


def test_messages_unknown_model_is_404_in_anthropic_shape(messages_endpoint):
    response = _post(messages_endpoint, {"model": "claude-opus-9", "max_tokens": 4, "messages": WHO})
    assert_anthropic_error(response, 404, "not_found_error", "claude-opus-9")


__all__ = ["claude", "WHO", "CHINESE", "WEATHER", "TIME", "GREEDY", "greedy", "assert_anthropic_error",
           *(name for name in list(globals()) if name.startswith("test_messages_"))]
