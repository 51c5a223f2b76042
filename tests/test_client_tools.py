"""ChatSession's tool loop: tools from Python functions (signature + docstring, or a pydantic model), the loop
against the running server (forced calls, then an answer), and the window keeping calls with their question."""

import io
import json
from typing import Annotated, Literal

import pytest
from pydantic import BaseModel, Field

from minimind_course.client import ChatSession
from minimind_course.client.history import QAPair, build_window, estimate_tokens, messages_to_pairs
from minimind_course.client.session import function_tool
from minimind_course.client.terminal import answer

CALLS: list[dict] = []


def get_weather(city: Annotated[str, Field(max_length=8)], unit: Literal["celsius", "fahrenheit"] = "celsius") -> dict:
    """Current weather of a city.

    Args:
        city: the city name, e.g. 东京
        unit: temperature unit
    """
    CALLS.append({"city": city, "unit": unit})
    return {"city": city, "temperature": 12, "unit": unit}


class Order(BaseModel):
    """Order a drink."""

    drink: str = Field(max_length=6, description="what to drink")
    cups: int = Field(1, ge=1, le=3)


def order(request: Order) -> str:
    return f"{request.cups} × {request.drink}"


def test_tools_from_signatures_and_pydantic_models():
    weather = function_tool(get_weather).to_openai()["function"]
    assert weather["name"] == "get_weather" and weather["description"] == "Current weather of a city."
    assert weather["parameters"] == {
        "type": "object", "required": ["city"],
        "properties": {"city": {"type": "string", "maxLength": 8, "description": "the city name, e.g. 东京"},
                       "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius",
                                "description": "temperature unit"}}}
    drink = function_tool(order)
    assert drink.to_openai()["function"]["parameters"]["properties"]["drink"]["maxLength"] == 6
    assert drink.run('{"drink": "茶", "cups": 2}') == "2 × 茶"
    assert drink.run('{"drink": "茶", "cups": 9}').startswith("error: invalid arguments for order")
    assert drink.run("not json").startswith("error: invalid arguments")
    assert json.loads(function_tool(get_weather).run('{"city": "东京"}'))["temperature"] == 12

    def broken(x: int) -> int:
        """Always fails."""
        raise ValueError("no")

    assert function_tool(broken).run('{"x": 1}') == "error: broken failed: ValueError: no"
    with pytest.raises(TypeError):
        function_tool(lambda *args: None)


def test_the_window_keeps_calls_with_their_question():
    steps = ({"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "东京"}'}}]},
             {"role": "tool", "tool_call_id": "c1", "content": "12°C"})
    pairs = [QAPair("东京天气？", "12 度。", steps), QAPair("谢谢", "不客气")]
    window = build_window("再见", pairs, max_pairs=2)
    assert [m["role"] for m in window] == ["user", "assistant", "tool", "assistant", "user", "assistant", "user"]
    assert build_window("再见", pairs, max_pairs=1)[0] == {"role": "user", "content": "谢谢"}  # dropped whole
    budget = estimate_tokens(build_window("再见", pairs[1:]))  # room for the last pair only
    assert build_window("再见", pairs, max_tokens=budget) == build_window("再见", pairs[1:])  # call+result dropped whole
    assert estimate_tokens(window) > estimate_tokens(build_window("再见", [QAPair("东京天气？", "12 度。"), pairs[1]]))
    assert messages_to_pairs(window[:-1]) == (None, pairs)  # saved conversations load back with their steps


@pytest.mark.parametrize("stream", [True, False])
def test_tool_loop_against_the_server(base_url, stream):
    CALLS.clear()
    session = ChatSession(base_url, tools=[get_weather], tool_choice="required", max_tool_rounds=1, max_tokens=120,
                          seed=5, max_retries=0)
    runs = []
    reply = session.ask("东京天气怎么样？", stream=stream, on_delta=lambda d: d.tool_run and runs.append(d.tool_run))
    assert [run.name for run in reply.tool_runs] == ["get_weather"] == [run.name for run in runs]
    assert len(CALLS) == 1 and json.loads(reply.tool_runs[0].result)["temperature"] == 12  # our function ran
    assert reply.content and reply.finish_reason in ("stop", "length")  # the last round must answer in text
    assert reply.usage.completion_tokens > 0
    steps = session.pairs[0].steps
    assert steps[0]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert steps[1] == {"role": "tool", "tool_call_id": steps[0]["tool_calls"][0]["id"],
                        "content": reply.tool_runs[0].result}
    sent = session.window("那北京呢？")
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "assistant", "user"]


@pytest.mark.parametrize("stream", [True, False])
def test_terminal_chat_prints_the_calls_it_runs(base_url, stream):
    session = ChatSession(base_url, tools=[get_weather], tool_choice="required", max_tool_rounds=1, max_tokens=120,
                          seed=5, max_retries=0)
    out = io.StringIO()
    answer("东京天气怎么样？", session, stream=stream, interactive=False, out=out)
    lines = out.getvalue().splitlines()
    run = session.last_reply.tool_runs[0]
    assert lines[0] == f"[tool] get_weather({run.arguments}) -> {run.result}"
    assert "".join(lines[1:]).strip() == session.last_reply.content.strip()
