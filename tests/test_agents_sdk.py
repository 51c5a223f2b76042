"""The OpenAI Agents SDK's default ``Agent`` (Responses API) with one function tool, against our server.

The bundled model is too small to be a good agent, so this asserts what is real: every request the SDK sends is
accepted (200), the run completes, and when the model does call the tool its output goes back as a
``function_call_output``. Runs where ``openai-agents`` is installed (the ``agents`` extra; it needs openai 3)."""

from __future__ import annotations

import httpx
import openai
import pytest

agents = pytest.importorskip("agents")


@pytest.mark.asyncio(loop_scope="session")
async def test_the_default_agent_with_one_tool_runs(base_url):
    sent: list[tuple[str, int]] = []

    async def record(response: httpx.Response) -> None:
        sent.append((response.request.url.path, response.status_code))

    http = httpx.AsyncClient(event_hooks={"response": [record]}, timeout=120)
    client = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0, http_client=http)
    agents.set_default_openai_client(client, use_for_tracing=False)
    agents.set_tracing_disabled(True)
    calls: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"{city}: 晴，25°C"

    agent = agents.Agent(name="MiniMind", instructions="You answer questions about the weather.",
                         model="minimind", tools=[get_weather],
                         model_settings=agents.ModelSettings(temperature=0, max_tokens=64))
    try:
        result = await agents.Runner.run(agent, "东京天气怎么样？", max_turns=4)
    finally:
        await http.aclose()
    assert sent and all(path == "/v1/responses" and status == 200 for path, status in sent), sent
    assert isinstance(result.final_output, str)
    assert (len(sent) > 1) == bool(calls)  # a tool call answered means one more model turn
